"""Polling one provider: the loops a provider's capabilities (pollers.types.Provider) call for.

- Tracked messages come from the local mirror of the state bucket, onto a pollers.schedule
  Schedule; messages due together go out in batches of the provider's `statuses.batch`. A report
  is published only when it differs from the current state (or its fact is not recorded yet); a
  final one ends polling; an id the provider does not know yet stays tracked. After
  SMSBUS_TRACK_TTL (from `sent_at`, else registration) a message with no final status gets a
  final `unknown` event (`via: "expiry"`).
- Provider-wide work (SMSC's history, inbound SMS) runs every interval; the balance at start and
  every SMSBUS_BALANCE_INTERVAL. Inbound cursors live in the cursor bucket and advance only after
  the events they cover are durable.
- A failed call backs off by one rule (CONTRACT.md section 5): the interval, doubling with each
  failure up to SMSBUS_<P>_MAX_INTERVAL, with jitter, reset by a success, and never less than a
  wait the provider demands (SMSC's error 9, a Retry-After); calls that fail together count
  once, and while the provider is down status requests go one at a time; after an auth
  failure the `*_FILE` secrets are read again. Failures show in /readyz and the metrics, and
  an unparsable answer goes to the dead-letter subject. A NATS problem (a cursor not saved, an
  event not stored) is not the provider's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import structlog

from bus.backoff import Backoff, Calls
from bus.config import ProviderSettings
from bus.core import Bus, ProviderState
from bus.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderPayloadError,
    ProviderRowError,
    PublishError,
    StoreError,
)
from bus.events import (
    Event,
    balance_event,
    deadletter_event,
    inbound_event,
    message_key,
    rfc3339,
    status_event,
    utcnow,
)
from bus.messages import MessageState
from bus.pace import Floor
from bus.statuses import normalise, normalise_error_code
from bus.supervisor import Beat, TaskStatus
from pollers.schedule import Schedule
from pollers.types import Provider, StatusReport

log = structlog.get_logger("smsbus.poller")

# Ids asked about together, and the error of the answer about them that held a row that
# cannot be read (ProviderPoller._fetch).
Unreadable = tuple[list[str], ProviderRowError]

TOLD_KEPT = 10_000  # unreadable rows remembered, so that each is told of once
# Rows that cannot be read in one inbound list (or in a history none of whose rows can be), past
# which the answer's form has changed: its poll fails (and backs off), rather than each row being
# told of at every poll once more of them are listed again (a window held, `Window.take`; the
# history read again at each poll) than TOLD_KEPT remembers.
UNREADABLE_LISTED = 1_000
CONCURRENCY = 8  # status requests in flight to one provider
ROUND_BATCHES = 4 * CONCURRENCY  # batches taken from the schedule at once, at most
PUBLISHED_AT_ONCE = 100  # events published together (expiries, a history's news)
LOAD_SLICE = 500  # messages put on the schedule in one turn of the event loop (a few ms)
# A loop busy with one round or one job for this long is stuck (an await that never ends): the
# poller's term ends and the supervisor starts it again, counted and shown in /readyz
# (pollers.runner.lead). Far above any round that makes progress: a batch narrowed down by
# halving takes 15 requests of up to 60 s each, one after the other (15 minutes), at worst.
STALLED_AFTER = 1800.0

T = TypeVar("T")


def _form_changed(unreadable: list[ProviderRowError], what: str) -> None:
    """ProviderPayloadError, naming `what` and holding the first row, when more rows of one
    answer cannot be read than UNREADABLE_LISTED: its form has changed, and the poll fails."""
    if len(unreadable) > UNREADABLE_LISTED:
        raise ProviderPayloadError(
            f"{len(unreadable)} {what}: {unreadable[0]}", raw=unreadable[0].raw
        )


async def _together(items: Sequence[T], publish: Callable[[T], Awaitable[None]]) -> None:
    """`publish` for each item, PUBLISHED_AT_ONCE at a time: their acks and state writes
    pipelined."""
    for i in range(0, len(items), PUBLISHED_AT_ONCE):
        await asyncio.gather(*(publish(item) for item in items[i : i + PUBLISHED_AT_ONCE]))


class ProviderPoller:
    def __init__(self, provider: Provider, bus: Bus, settings: ProviderSettings):
        self.provider = provider
        self.name = settings.name
        self.settings = settings
        self._prefix = bus.settings.subject_prefix
        self._balance_interval = bus.settings.balance_interval
        self._publisher = bus.publisher
        self._states = bus.states
        self._index = bus.states.mirror
        self._loaded = bus.states.follower.loaded
        self._cursors = bus.cursors
        self._metrics = bus.metrics
        # One per poller (its spacing spans rounds). A crowd of requests holds polls back for
        # up to half an interval (as late as a top-up polls early), then no slower than one pass
        # an interval.
        self._floor = Floor(self._batches_needed, grace=settings.interval / 2)
        self._gate = bus.pace.gate(CONCURRENCY, floor=self._floor)
        self.state: ProviderState = bus.providers.setdefault(self.name, ProviderState())
        per_id = provider.statuses
        self._batch = per_id.batch if per_id is not None else 1  # ids in one status request
        first = (
            bus.settings.smspilot_reconcile_after if self.name == "smspilot" else settings.interval
        )
        self.schedule = Schedule(
            first=first,
            interval=settings.interval,
            cap=settings.max_interval,
            ttl=bus.settings.track_ttl,
            timing=partial(self._index.timing, self.name),
            polled=provider.statuses is not None,
        )
        self._calls = Calls(Backoff(settings.interval, settings.max_interval))
        self._resume_at = 0.0
        # Down: no answer, or the credentials refused, since the last success (as
        # smsbus_provider_up 0); not an answer that could not be read, which may be its
        # request's alone. Status requests then go one at a time (`_asked`).
        self._down = False
        self._probe = asyncio.Lock()
        self._tick = min(1.0, settings.interval / 4)
        self.stopping = False  # loops check it: nats-py can turn a cancellation into its errors
        self._beat: Beat = Beat(TaskStatus(self.name))
        self._told: OrderedDict[bytes, None] = OrderedDict()  # unreadable rows told of
        # Ids whose last answer held a row that cannot be read: asked about alone (one request)
        # until it can be, not found again by halving each batch they are in (up to 15).
        self._alone: set[str] = set()
        # Ids whose tracking has ended and whose last look (`_last_look`) has not happened yet,
        # the provider failing: since when (`_may_wait`).
        self._owed: dict[str, float] = {}
        self._busy: dict[str, float] = {}  # loop: since when it works on one round or job

    def track(self, state: MessageState, now: float | None = None) -> None:
        """Put a tracked message on the schedule (the mirror calls this on every change)."""
        if state.provider != self.name:
            return  # another provider's message; ids are only unique per provider
        if not state.tracked or state.final:
            self.schedule.drop(state.message_id)
            return
        if state.message_id not in self.schedule:
            self.schedule.push(state.message_id, after=now if now is not None else time.time())

    async def _schedule_all(self) -> None:
        """Put every open tracked message of the mirror on the schedule, a slice at a time so
        that a million of them do not hold up the event loop: a callback waits for a dozen of
        its turns, and with slices of 20,000 a million made 50 turns of 80 to 110 ms (and one of
        200 ms, listing them). One the last term took and did not finish polling is due now."""
        now = time.time()
        for n, message_id in enumerate(self._index.held_keys(self.name), 1):
            if not self._index.is_open(self.name, message_id):
                pass  # final, or let go since the keys were copied
            elif message_id not in self.schedule:
                self.schedule.push(message_id, after=now)
            else:
                self.schedule.untake(message_id, now)
            if n % LOAD_SLICE == 0:
                self._beat()
                await asyncio.sleep(0)

    def _batches_needed(self) -> float:
        """Status requests a second that poll every open message once an interval."""
        return len(self.schedule) / (self._batch * self.settings.interval)

    # The loops

    async def run(self, beat: Beat) -> None:
        """Poll until cancelled (or `stopping`); a failing loop ends it, for the supervisor."""
        self._beat = beat
        self.state.enabled = True
        self.state.leader = True
        self._metrics.leader.labels(self.name).set(1)
        await self._loaded.wait()
        self._index.listeners.append(self.track)
        try:
            with self._working("schedule"):
                await self._schedule_all()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._status_loop())  # expiries, and per-id polls if any
                if self.provider.history is not None:
                    group.create_task(
                        self._every(self.settings.interval, self._history, spaced="history")
                    )
                if self.provider.inbound is not None:
                    group.create_task(
                        self._every(self.settings.interval, self._inbound, spaced="inbound")
                    )
                if self.provider.balance is not None:
                    group.create_task(self._every(self._balance_interval, self._balance))
        finally:
            self._index.listeners.remove(self.track)
            self.state.leader = False
            self._metrics.leader.labels(self.name).set(0)

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[None]], spaced: str | None = None
    ) -> None:
        """Run `job` every interval. A `spaced` job also keeps the interval across replicas: its
        last run is recorded in the cursor bucket, and a new leader waits for it (SMSC refuses a
        4th identical request in a minute, whoever sends it)."""
        if spaced:
            last = await self._last_run(spaced)
            if last is not None:
                await asyncio.sleep(max(0.0, last + interval - time.time()))
        while not self.stopping:
            if time.monotonic() >= self._resume_at:
                with self._working(spaced or job.__name__.strip("_")):
                    await self._guard(job)
                    if spaced:
                        await self._mark_run(spaced)
            await asyncio.sleep(max(interval, self._resume_at - time.monotonic(), 0.01))

    @contextlib.contextmanager
    def _working(self, loop: str) -> Iterator[None]:
        self._busy[loop] = time.monotonic()
        try:
            yield
        finally:
            self._busy.pop(loop, None)

    def stuck(self, now: float) -> str | None:
        """What is stuck, if a loop has been busy with one round or job for longer than
        STALLED_AFTER; sleeping between them, however long, is not being stuck."""
        for loop, since in self._busy.items():
            if now - since > STALLED_AFTER:
                return f"{self.name}'s {loop} loop has been on one round for {now - since:.0f} s"
        return None

    async def _last_run(self, job: str) -> float | None:
        try:
            value = await self._cursor(f"ran.{job}")
        except StoreError:
            return time.time()  # not knowing, assume it just ran: waiting costs one interval
        return float(value) if value else None

    async def _mark_run(self, job: str) -> None:
        try:
            await self._save_cursor(f"ran.{job}", repr(time.time()))
        except StoreError as exc:
            log.warning("run time not recorded", provider=self.name, error=str(exc))

    async def _status_loop(self) -> None:
        while not self.stopping:
            # A tick, or to the end of a back-off when that comes sooner: the status loop takes
            # its turn then, beside the loops that wake at it (inbound, balance), and not a tick
            # after them, when their calls to a provider that fails fast have backed it off
            # again; so a message whose tracking ends is looked at, and ends, in an outage too.
            left = self._resume_at - time.monotonic()
            await asyncio.sleep(left if 0 < left < self._tick else self._tick)
            self._beat()
            # Round after round while there is more due than one round takes.
            while time.monotonic() >= self._resume_at:
                with self._working("status"):
                    more = await self._status_round(time.time())
                if not more:
                    break
                self._beat()

    async def _status_round(self, now: float) -> bool:
        """Poll (or expire) what is due, up to ROUND_BATCHES batches; True when that was not
        all."""
        per_id = self.provider.statuses
        size = self._batch
        limit = size * ROUND_BATCHES
        due = self.schedule.take(now, size, horizon=now + self.settings.interval / 2, limit=limit)
        waiting: set[str] = set()
        if per_id is not None and (looked := self._expiring(due.expired)):
            read = await self._last_look([state.message_id for state in looked])
            for state in looked:
                if state.message_id not in read and self._may_wait(state.message_id, now):
                    waiting.add(state.message_id)
                    self._due_again(state, now)
        for message_id in set(due.expired) - waiting:
            self._owed.pop(message_id, None)
        # Read from the mirror again: a last look may have found a final status.
        expiring = [s for s in self._expiring(due.expired) if s.message_id not in waiting]
        await _together(expiring, partial(self._expire_or_retry, now=now))
        polled = [m for m in due.poll if self._index.is_open(self.name, m)]
        for message_id in set(due.poll).difference(polled):
            self.schedule.drop(message_id)
            self._alone.discard(message_id)
        if polled and per_id is not None:
            self._floor.due_since = due.since
            try:
                await asyncio.gather(
                    *(self._poll_batch(batch, now) for batch in self._batches(polled))
                )
            finally:
                self._floor.due_since = None
        return len(due.poll) + len(due.expired) >= limit

    def _expiring(self, message_ids: list[str]) -> list[MessageState]:
        """The states of those of `message_ids` still tracked and not final."""
        return [
            state
            for message_id in message_ids
            if (state := self._index.get(self.name, message_id)) is not None
            and state.tracked
            and not state.final
        ]

    def _batches(self, message_ids: list[str]) -> list[list[str]]:
        """The status requests that ask about `message_ids`: one for each id whose last answer
        held a row that cannot be read (`_alone`), the rest batched."""
        size = self._batch
        rest = [m for m in message_ids if m not in self._alone]
        batches = [[m] for m in message_ids if m in self._alone]
        return batches + [rest[i : i + size] for i in range(0, len(rest), size)]

    async def _last_look(self, message_ids: list[str]) -> set[str]:
        """One more poll of messages whose tracking ends, before their `unknown`: the status
        the provider has is published instead, be it one reached since the last poll (up to
        SMSBUS_<P>_MAX_INTERVAL before) or that of a message registered after its TTL had
        passed (a late registration, a backfill), never polled. The ids asked about; those
        not (the provider backed off, or failing) wait for it a while (`_may_wait`)."""
        read: set[str] = set()

        async def look(batch: list[str]) -> None:
            if await self._asked(batch, set()):
                read.update(batch)

        await asyncio.gather(*(look(batch) for batch in self._batches(message_ids)))
        return read

    def _may_wait(self, message_id: str, now: float) -> bool:
        """Whether a message whose last look could not be made waits for the provider once
        more: for up to twice SMSBUS_<P>_MAX_INTERVAL from the first miss, so that at least
        one call follows the longest back-off; then it expires as it is, as the TTL says (an
        outage or refused credentials must not keep a message from ever ending)."""
        grace = 2 * self.settings.max_interval
        if len(self._owed) > TOLD_KEPT:  # those that turned final while they waited
            self._owed = {k: t for k, t in self._owed.items() if t > now - 2 * grace}
        return now < self._owed.setdefault(message_id, now) + grace

    async def _expire_or_retry(self, state: MessageState, now: float) -> None:
        self._alone.discard(state.message_id)
        try:
            await self._expire(state)
        except PublishError as exc:
            log.error("expiry not stored; will retry", provider=self.name, error=str(exc))
            self._due_again(state, now)

    def _due_again(self, state: MessageState, now: float) -> None:
        """Back on the schedule, its tracking over, to be expired an interval from now."""
        self.track(state, now)
        self.schedule.retry(state.message_id, now + self.settings.interval)

    async def _asked(self, batch: list[str], finished: set[str]) -> bool:
        """`_read` of `batch` when the provider is not backed off, within the gate; whether it
        was read. While the provider is down, one status request at a time (`_probe`): at the
        end of a back-off one asks, and the others wait for its answer, to go on together once
        it succeeds or to wait for the next back-off's end when it fails; not eight requests
        at each end to a provider that does not answer or asked for a pause (a Retry-After)."""
        read = partial(self._read, batch, finished)
        async with self._gate:
            if self._down:
                async with self._probe:
                    if time.monotonic() < self._resume_at:
                        return False
                    if self._down:
                        return await self._guard(read)
            return time.monotonic() >= self._resume_at and await self._guard(read)

    async def _read(self, batch: list[str], finished: set[str]) -> None:
        """Ask about `batch` and publish what is new; add to `finished` the messages whose
        reports are all final (several for an SMS-Pager mailing: one per number)."""
        reports, unreadable = await self._fetch(batch)
        received_at = utcnow()  # of the answer, for each report it carries
        # What the mirror already says is not published again; the news is published together
        # (one publish_many), its acks and state writes sharing batches.
        finals = [self._known(report) for report in reports]
        news = [i for i, final in enumerate(finals) if final is None]
        published = await self._publish_all([reports[i] for i in news], received_at)
        for i, final in zip(news, published, strict=True):
            finals[i] = final
        settled: dict[str, bool] = {}
        for report, known in zip(reports, finals, strict=True):
            settled[report.message_id] = settled.get(report.message_id, True) and bool(known)
        finished.update(message_id for message_id, done in settled.items() if done)
        self._alone.difference_update(batch)
        for ids, exc in unreadable:
            if len(ids) == 1:
                self._alone.update(ids)
            await self._unreadable(exc, ids)

    async def _poll_batch(self, batch: list[str], now: float) -> None:
        finished: set[str] = set()
        ok = False
        try:
            ok = await self._asked(batch, finished)
        finally:
            # Also when the term ends mid-batch (the lease lost, the task cancelled): a taken id
            # is off the schedule until put back, and the next term must find it there.
            for message_id in batch:
                if message_id in finished:
                    self.schedule.drop(message_id)
                elif ok:  # past the top-up horizon, so a slot served early is not served again
                    self.schedule.again(message_id, now + self.settings.interval / 2)
                else:  # due again as soon as the back-off allows
                    self.schedule.retry(message_id, now)

    async def _fetch(self, ids: list[str]) -> tuple[list[StatusReport], list[Unreadable]]:
        """The provider's reports on `ids`, and the parts of them whose answers hold a row that
        cannot be read. Such an answer is not given up whole, which would leave every id
        batched with that row unread until its expiry: the ids are asked about again in halves,
        and a half that fails again in halves, down to the id the row is about (then asked about
        alone at its next polls, `_alone`, until its row can be read). When both halves of the
        whole batch fail too, the fault is not one id's, and the batch fails as an unreadable
        answer does (three requests, not one per id)."""
        assert self.provider.statuses is not None
        try:
            return await self.provider.statuses.fetch(ids), []
        except ProviderRowError as exc:
            return await self._narrow(ids, exc, whole=True)

    async def _narrow(
        self, ids: list[str], exc: ProviderRowError, whole: bool
    ) -> tuple[list[StatusReport], list[Unreadable]]:
        """`_fetch` of ids whose answer (exc) held a row that cannot be read."""
        assert self.provider.statuses is not None
        if len(ids) == 1:
            return [], [(ids, exc)]
        halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
        read: list[list[StatusReport] | ProviderRowError] = []
        for half in halves:
            try:
                read.append(await self.provider.statuses.fetch(half))
            except ProviderRowError as failed:
                read.append(failed)
        if all(isinstance(result, ProviderRowError) for result in read):
            if whole:
                raise exc
            return [], [(ids, exc)]  # the rest of the batch was read: these wait
        reports: list[StatusReport] = []
        unreadable: list[Unreadable] = []
        for half, result in zip(halves, read, strict=True):
            if isinstance(result, ProviderRowError):
                more, left = await self._narrow(half, result, whole=False)
                reports += more
                unreadable += left
            else:
                reports += result
        return reports, unreadable

    async def _unreadable(self, exc: ProviderRowError, ids: Sequence[str] = ()) -> None:
        """A row of an answer that cannot be read, while the rest of the answer could: for a
        poll by id, the ids whose answer holds it (the others batched with them were read
        apart), which stay tracked and are asked about again at their pace; for a history or
        inbound list, the row, set aside. What holds it goes to the dead-letter subject, as an
        unreadable answer does, once: the same answer or row read again (at the id's next poll,
        on the newest history page or in an inbound window's overlap) is not told again."""
        told = hashlib.sha256(exc.raw or str(exc).encode()).digest()
        if told in self._told:
            self._told.move_to_end(told)
            return
        self._told[told] = None
        while len(self._told) > TOLD_KEPT:
            self._told.popitem(last=False)
        self.state.last_error = f"{rfc3339(utcnow())} bad_answer: {exc}"
        self._metrics.poll_requests.labels(self.name, "bad_answer").inc()
        log.warning(
            "a row of the provider's answer cannot be read; the rest was read", provider=self.name,
            error=str(exc), message_ids=list(ids[:10]), count=len(ids),
        )  # fmt: skip
        await self._dead_letter(str(exc), exc.raw or b"")

    async def _guard(self, job: Callable[[], Awaitable[None]]) -> bool:
        """Run one provider call; on failure record it, back off, and keep going."""
        started = time.monotonic()
        try:
            await job()
        except ProviderError as exc:
            await self._failed(exc, started)
            return False
        except PublishError as exc:
            log.error(
                "poll results not stored; will poll again", provider=self.name, error=str(exc)
            )
            return False
        except StoreError as exc:  # NATS's problem, not the provider's: no back-off for it
            log.warning("poll state not kept; will poll again", provider=self.name, error=str(exc))
            return False
        self._succeeded()
        return True

    def _succeeded(self) -> None:
        self._calls.succeeded()
        self._down = False
        self.state.last_success = rfc3339(utcnow())
        self._metrics.poll_requests.labels(self.name, "ok").inc()
        self._metrics.provider_up.labels(self.name).set(1)

    async def _failed(self, exc: ProviderError, started: float) -> None:
        """Record a failed call that began at `started`, and back off: once for calls that fail
        together (`Calls`), never shortening a wait already set (SMSC's minute after error 9)."""
        now = time.monotonic()
        backoff = self._calls.failed(started, now) or 0.0
        self._resume_at = max(self._resume_at, now + max(backoff, exc.retry_after))
        delay = self._resume_at - now
        if isinstance(exc, ProviderAuthError):
            outcome = "auth_error"
            # A rotated Kubernetes Secret: the next call uses what its file holds now.
            if any([secret.reload() for secret in self.settings.credentials]):
                log.info("credentials read again from their files", provider=self.name)
        elif isinstance(exc, ProviderPayloadError):
            outcome = "bad_answer"
        else:
            outcome = "unavailable"
        self.state.last_error = f"{rfc3339(utcnow())} {outcome}: {exc}"
        self._metrics.poll_requests.labels(self.name, outcome).inc()
        if not isinstance(exc, ProviderPayloadError):
            self._down = True
            self._metrics.provider_up.labels(self.name).set(0)
        log.warning(
            "provider call failed", provider=self.name, outcome=outcome, error=str(exc),
            retry_in_s=round(delay, 1),
        )  # fmt: skip
        if isinstance(exc, ProviderPayloadError):
            await self._dead_letter(str(exc), exc.raw or b"")

    async def _dead_letter(self, reason: str, raw: bytes) -> None:
        event = deadletter_event(
            self._prefix, self.name, reason, received_at=utcnow(), method=None,
            path=self.settings.url, query={}, body=raw, peer=None,
        )  # fmt: skip
        try:
            await self._publisher.publish(event)
        except PublishError as exc:
            log.error("dead letter lost", provider=self.name, error=str(exc))

    # The work

    async def _history(self) -> None:
        """Publish what the account's history says is new, many reports at once (their acks and
        state writes pipelined), the reports of one message one after the other, in order; a
        history whose reading failed part-way fails the call once what was read is published."""
        assert self.provider.history is not None
        by_message: dict[str, list[StatusReport]] = {}
        reports, unreadable, failed = await self.provider.history()
        received_at = utcnow()
        # A history whose every row is unreadable, on an account that sent one SMS in days, is
        # that row: told of once, as beside readable ones, not a failed call backing off inbound
        # polls with it. Failing a history with readable rows would hold their statuses back.
        if not reports and failed is None:
            _form_changed(unreadable, "history rows, none of which can be read")
        for row in unreadable:
            await self._unreadable(row)
        for report in reports:
            key = message_key(self.name, report.message_id, report.phone)
            by_message.setdefault(key, []).append(report)

        async def in_order(reports: list[StatusReport]) -> None:
            for report in reports:
                await self._report(report, received_at)

        await _together(list(by_message.values()), in_order)
        if failed is not None:
            raise failed

    def _known(self, report: StatusReport) -> bool | None:
        """When the mirror's state already says this status: whether the message is final (or
        the report is); None otherwise."""
        held = self._index.reported(
            self.name, message_key(self.name, report.message_id, report.phone)
        )
        if held is None or held[1] != report.raw_status:
            return None
        final = normalise(self.name, report.raw_status, normalise_error_code(report.error_code))
        return held[0] or final.final

    async def _report(self, report: StatusReport, received_at: datetime) -> bool:
        """Publish a polled status unless the current state already says it; True when the
        message has reached a final status."""
        if (known := self._known(report)) is not None:
            return known
        return (await self._publish_all([report], received_at))[0]

    async def _publish_all(self, reports: list[StatusReport], received_at: datetime) -> list[bool]:
        """Publish reports past the mirror's check (`_known`), together (one publish_many),
        each compared with the bucket's state where the mirror holds none: for each, whether
        its message has reached a final status."""
        keys = [message_key(self.name, r.message_id, r.phone) for r in reports]
        states = await self._states.lookup_many(self.name, keys)
        mailings = iter(
            await self._states.lookup_many(self.name, [r.message_id for r in reports if r.phone])
        )
        events: list[Event] = []
        finals: list[bool] = []
        ended: list[str] = []  # final, and no other number's report can follow
        for report, state in zip(reports, states, strict=True):
            registered = next(mailings) if report.phone else state
            error_code = normalise_error_code(report.error_code)
            final = normalise(self.name, report.raw_status, error_code).final
            finals.append(final or bool(state and state.final))
            if state is not None and state.provider_status == report.raw_status:
                continue
            event = status_event(
                self._prefix, self.name, report.message_id, report.raw_status, via="poll",
                received_at=received_at, occurred_at=report.occurred_at, error_code=error_code,
                error=report.error, phone=report.phone or (state.phone if state else None),
                client_ref=registered.client_ref if registered else None,
                traceparent=registered.traceparent if registered else None,
            )  # fmt: skip
            if state is not None and state.records(event.id):
                continue  # reported before, however long ago
            finals[-1] = final
            events.append(event)
            if final and not report.phone:
                ended.append(report.message_id)
        if events:
            await self._publisher.publish_many(events)
        for message_id in ended:
            self.schedule.drop(message_id)
        return finals

    async def _expire(self, state: MessageState) -> None:
        """A final `unknown` for the message, or for each number of a mailing still open."""
        open_numbers = [p for p, n in (state.numbers or {}).items() if not n["final"]]
        phones: list[str | None] = [*open_numbers] or [state.phone]
        for phone in phones:
            event = status_event(
                self._prefix, self.name, state.message_id, "", via="expiry",
                received_at=utcnow(), phone=phone, client_ref=state.client_ref,
                traceparent=state.traceparent,
            )  # fmt: skip
            await self._publisher.publish(event)
        self._metrics.expired.labels(self.name).inc()

    async def _inbound(self) -> None:
        assert self.provider.inbound is not None
        cursor = await self._cursor("inbound")
        messages, new_cursor, unreadable = await self.provider.inbound(cursor)
        _form_changed(unreadable, "inbound rows cannot be read")
        for row in unreadable:
            await self._unreadable(row)
        for sms in messages:
            await self._publisher.publish(
                inbound_event(
                    self._prefix,
                    self.name,
                    sms.message_id,
                    sender=sms.sender,
                    recipient=sms.recipient,
                    text=sms.text,
                    sent_at=sms.sent_at,
                    received_at=utcnow(),
                )  # fmt: skip
            )
        if new_cursor is not None and new_cursor != cursor:
            await self._save_cursor("inbound", new_cursor)

    async def _balance(self) -> None:
        balance = self.provider.balance
        assert balance is not None
        amount, unit = await balance.read(), balance.unit
        self._metrics.balance.labels(self.name, unit).set(float(amount))
        await self._publisher.publish(
            balance_event(self._prefix, self.name, amount, unit, datetime.now(UTC))
        )

    async def _cursor(self, name: str) -> str | None:
        return await self._cursors.get(f"{self.name}.{name}")

    async def _save_cursor(self, name: str, value: str) -> None:
        await self._cursors.put(f"{self.name}.{name}", value)
