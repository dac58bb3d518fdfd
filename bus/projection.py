"""What a status event changes in its message's state, and writing those changes through.

The replica that publishes a status event writes its state as well, once JetStream has stored the
event and before the event counts as done (a callback's `OK`, a poll's next step): the stream
holds every fact a state records, and a state records every fact a replica has called done. The
writes of events that are done together (a group commit's batch, a drained stretch of the spool)
go out together, as atomic batches of compare-and-set writes (bus.state). A write that fails
leaves the event's state owed; the publisher keeps it in the spool, whose drainer writes it.

Changes to one key apply in the order given; applying a fact the state records changes nothing,
so writing an event's state twice (a drained row, a replay) is harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from bus.events import PER_PHONE, Event, message_key
from bus.messages import MessageState, apply_status, apply_to_mailing, kv_key
from bus.state import CAS_ATTEMPTS, Change, States, read_state

Delivered = Callable[[MessageState, Mapping[str, Any]], None]
_STATUS_FIELDS = ("provider", "message_id", "status", "final", "provider_status", "occurred_at")


class StateNotWritten(Exception):
    """The event is stored, its state is not (yet): a NATS error or timeout."""


class StatusChange:
    """The state changes one status event makes: its message's key, and for a send to several
    numbers (SMS-Pager, SMSC) also the send as a whole. `first_final` tells, once written,
    whether this write took the message to its first final status (compare-and-set lets exactly
    one writer, on one replica, do that). Built for every status event, so plainly."""

    __slots__ = ("event_id", "data", "changes", "_before", "_after", "_mailing")

    def __init__(self, event_id: str, data: Mapping[str, Any], key: str) -> None:
        self.event_id = event_id
        self.data = data
        self.changes: list[tuple[str, Change]] = [(key, self.apply)]
        self._before: MessageState | None = None
        self._after: MessageState | None = None
        self._mailing: MessageState | None = None

    def apply(self, state: MessageState | None) -> MessageState:
        self._before = state  # the state this write started from, on the attempt that wins
        self._after = after = apply_status(state, self.data, self.event_id)
        return after

    def to_mailing(self, state: MessageState | None) -> MessageState:
        self._mailing = mailing = apply_to_mailing(state, self.data)
        return mailing

    def first_final(self) -> MessageState | None:
        """The state the delivery time counts from (the mailing's, for a number of one), when
        the winning write made the message final for the first time."""
        before, after = self._before, self._after
        if after is not None and after.final and not (before is not None and before.final):
            return self._mailing or after
        return None


def status_data(event: Event) -> Mapping[str, Any] | None:
    """A status event's data: carried by an event built here, read from the payload of one that
    came back from the spool; None when it is not a complete status event."""
    return event.data if event.data is not None else payload_status_data(event.payload)


def payload_status_data(payload: bytes) -> Mapping[str, Any] | None:
    """The data of an encoded status event; None when it is not a complete one."""
    try:
        data = orjson.loads(payload)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(data, dict) or not all(f in data for f in _STATUS_FIELDS):
        return None
    return data


def status_change(event_id: str, data: Mapping[str, Any]) -> StatusChange:
    provider, phone = data["provider"], data.get("phone")
    plan = StatusChange(
        event_id, data, kv_key(provider, message_key(provider, data["message_id"], phone))
    )
    if provider in PER_PHONE and phone:  # the send as a whole, beside the number
        plan.changes.append((kv_key(provider, data["message_id"]), plan.to_mailing))
    return plan


def delivery_seconds(registered: MessageState, data: Mapping[str, Any]) -> float | None:
    """From `sent_at`, else the registration, to when the provider says the final status
    happened; None for a message with neither (never registered)."""
    start = registered.sent_at or registered.registered_at
    end = data.get("occurred_at") or data.get("received_at")
    if not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds)


async def write_with(kv: KeyValue, event: Event) -> None:
    """Write a status event's state through a nats-py bucket handle, for a command that does not
    open the bus (`smsbus replay`): read, apply, compare-and-set, read again on a conflict.
    NATS errors pass through."""
    data = status_data(event) if event.type == "status" else None
    if data is None:
        return
    for key, change in status_change(event.id, data).changes:
        for _ in range(CAS_ATTEMPTS):
            state, revision = await read_state(kv, key)
            new = change(state)
            if new == state:
                break
            try:
                if revision:
                    await kv.update(key, new.to_json(), last=revision)
                else:
                    await kv.create(key, new.to_json())
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another writer was first: read again
            break
        else:
            raise nats.errors.Error(f"{key}: still contended after {CAS_ATTEMPTS} attempts")


Queued = tuple[StatusChange, asyncio.Future[None], float | None]  # change, its waiter, deadline


class _Deadlines:
    """One timer for the writes of one flush, not one per write: at the earliest deadline, the
    writes past theirs fail (the write goes on; the drainer writes the state again, harmlessly),
    and the timer is set again for the next."""

    def __init__(self, queued: list[Queued]) -> None:
        self._queued = queued
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        deadlines = [d for _, f, d in self._queued if d is not None and not f.done()]
        if deadlines:
            self._handle = self._loop.call_at(min(deadlines), self._expire)

    def _expire(self) -> None:
        now = self._loop.time()
        for _, future, deadline in self._queued:
            if deadline is not None and deadline <= now and not future.done():
                future.set_exception(StateNotWritten("no answer in time"))
        self._arm()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class Projection:
    """Writes the states of status events through, those of one event-loop turn together."""

    def __init__(self, states: States, delivered: Delivered = lambda state, data: None) -> None:
        self._states = states
        self._delivered = delivered
        self._queue: list[Queued] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, event: Event, deadline: float | None = None) -> None:
        """Return once the event's state records it; StateNotWritten when it could not be
        written, NATS being away, or by `deadline` (event-loop time). An event that is not a
        status event, or not a readable one, changes no state."""
        future = self.submit(event, deadline)
        if future is not None:
            await future

    def submit(self, event: Event, deadline: float | None = None) -> asyncio.Future[None] | None:
        """Queue the event's state write: a future that settles as `write` returns or raises;
        None for an event that changes no state. StateNotWritten at once when NATS is away."""
        data = status_data(event) if event.type == "status" else None
        if data is None:
            return None
        if not self._states.connected:
            raise StateNotWritten("NATS is not connected")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((status_change(event.id, data), future, deadline))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def write_many(self, events: Sequence[Event]) -> dict[str, StateNotWritten]:
        """Write the states of many events; those that could not be written, by event id."""
        results = await asyncio.gather(*(self.write(e) for e in events), return_exceptions=True)
        failed: dict[str, StateNotWritten] = {}
        for event, result in zip(events, results, strict=True):
            if isinstance(result, StateNotWritten):
                failed[event.id] = result
            elif isinstance(result, BaseException):
                raise result
        return failed

    def _flush(self) -> None:
        self._scheduled = False
        queued, self._queue = self._queue, []
        task = asyncio.create_task(self._apply(queued))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, queued: list[Queued]) -> None:
        deadlines = _Deadlines(queued)
        try:
            failed = await self._states.apply(
                [change for plan, _, _ in queued for change in plan.changes], batches="fast"
            )
        except Exception as exc:  # not one write could be tried: every state is owed
            failed = {key: exc for plan, _, _ in queued for key, _ in plan.changes}
        finally:
            deadlines.cancel()
        for plan, future, _ in queued:
            error = next((failed[key] for key, _ in plan.changes if key in failed), None)
            if future.done():
                continue
            if error is not None:
                future.set_exception(StateNotWritten(str(error) or type(error).__name__))
                continue
            registered = plan.first_final()
            if registered is not None:
                self._delivered(registered, plan.data)
            future.set_result(None)
