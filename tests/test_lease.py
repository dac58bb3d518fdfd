"""Leases against a real nats-server: one holder at a time, a holder whose write timed out but
was applied after all (nats-py sends its buffer on reconnect) keeps its lease, and after a NATS
stall the lease is taken again within a retry period."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import nats
from nats.js.kv import KeyValue

from bus.lease import MAX_AGE, Lease
from bus.stream import ensure_bucket
from bus.supervisor import Beat
from pollers.runner import lead
from tests.support import NatsServer, await_for


def test_a_lease_is_held_by_one_and_reclaimed_by_its_holder(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            bucket = await ensure_bucket(js, f"T{uuid.uuid4().hex[:8]}_leases", 1, max_age=30)
            ours, theirs = Lease(bucket, "smstower", "a", 60), Lease(bucket, "smstower", "b", 60)
            assert await ours.acquire()
            assert not await theirs.acquire()
            # A renewal we gave up on that landed anyway: the key moved on without us knowing.
            await bucket.put("smstower", b"a")
            assert await ours.renew()
            assert ours.held()
            # The same on a fresh start of the same holder: its key is taken back at once.
            again = Lease(bucket, "smstower", "a", 60)
            assert await again.acquire()
            # Someone else's key is never taken.
            await bucket.put("smstower", b"b")
            assert not await again.renew()
            assert not again.held()
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_lease_given_up_is_taken_when_its_delete_marker_expires_mid_create(
    nats_server: NatsServer,
) -> None:
    """A holder stopped gives its lease up, leaving a delete marker that the bucket's max age
    removes. nats-py's create meets the marker, then looks at the key again to write over it:
    when the marker is removed between the two, that look-up finds nothing. The key is free
    then, and the lease is taken at once (a restarted replica used to log "lease not acquired"
    and wait a retry period)."""

    class MarkerGoneFirst(KeyValue):
        """The bucket's own nats-py handle, whose look-up waits until the server has removed
        the marker: the moment of the race, made certain."""

        async def _get(self, key: str, revision: int | None = None) -> KeyValue.Entry:
            async def gone() -> bool:
                info = await self._js.stream_info(self._stream)
                return info.state.messages == 0

            await await_for(gone, what="the delete marker to expire")
            return await super()._get(key, revision)

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            name = f"T{uuid.uuid4().hex[:8]}_leases"
            bucket = await ensure_bucket(js, name, 1, max_age=1)
            before = Lease(bucket, "smsc", "before-the-restart", 2)
            assert await before.acquire()
            await before.release()  # the delete marker
            racing = MarkerGoneFirst(name, bucket._stream, bucket._pre, js, bucket._direct)
            # A TTL whose call timeout (an eighth of it) outlasts the marker's expiry.
            after = Lease(racing, "smsc", "after-the-restart", 120)
            assert await after.acquire()
            assert after.held()
            assert b"after-the-restart" == (await bucket.get("smsc")).value
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_holder_stalled_with_nats_leads_again_within_a_retry_period(tmp_path: Path) -> None:
    """NATS stalls (SIGSTOP) longer than the lease's max age: the holder cannot renew, gives the
    lease up before its key could expire (polling stops), and tries to take it again a retry
    period after each try began, so tries that hang on the stalled server (each for its call
    timeout) do not stretch the period. A nats-server expires an overdue key only seconds after
    it runs again, so the holder's key is still there: the first try after NATS answers takes
    it back (it names this holder), and polling resumes within a period."""
    server = NatsServer(tmp_path / "nats").start()
    ttl = 6.0  # renewed every 1.2 s, tried every 0.75 s; a call with no answer ends after 0.75 s
    paused_for = 8.5

    class Counted(Lease):
        tries = 0

        async def acquire(self) -> bool:
            self.tries += 1
            return await super().acquire()

    class Poller:
        name = "smstower"
        stopping = False

        def __init__(self) -> None:
            self.terms = 0
            self.leading = asyncio.Event()

        def stuck(self, now: float) -> str | None:
            return None

        async def run(self, beat: Beat) -> None:
            self.terms += 1
            self.leading.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.leading.clear()

    async def scenario() -> None:
        nc = await nats.connect(server.url)
        leading: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            bucket = await ensure_bucket(js, f"T{uuid.uuid4().hex[:8]}_leases", 1,
                                         max_age=ttl * MAX_AGE)  # fmt: skip
            lease, poller = Counted(bucket, "smstower", "a", ttl), Poller()
            leading = asyncio.create_task(lead(poller, lease, lambda: None))  # type: ignore[arg-type]
            await asyncio.wait_for(poller.leading.wait(), 5)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            stalled = time.monotonic()
            while poller.leading.is_set():  # the holder gives up while NATS is stalled
                assert time.monotonic() - stalled < paused_for, "still polling without a lease"
                await asyncio.sleep(0.02)
            given_up, before = time.monotonic(), lease.tries
            await asyncio.sleep(stalled + paused_for - given_up)
            tries, period = lease.tries - before, time.monotonic() - given_up
            server.proc.send_signal(signal.SIGCONT)
            back = time.monotonic()
            await asyncio.wait_for(poller.leading.wait(), 10)
            taken_after = time.monotonic() - back
            # A try every 0.75 s while stalled, not every 0.75 s plus 0.75 s of waiting.
            assert tries >= int(period / lease.retry_every) - 1, f"{tries} tries in {period:.2f} s"
            assert taken_after <= lease.retry_every + 0.5, f"led again {taken_after:.2f} s after"
            assert 2 == poller.terms
        finally:
            if leading is not None:
                leading.cancel()
                await asyncio.gather(leading, return_exceptions=True)
            await nc.close()

    try:
        asyncio.run(scenario())
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
