"""Leases against a real nats-server: one holder at a time, and a holder whose write timed out
but was applied after all (nats-py sends its buffer on reconnect) keeps its lease."""

from __future__ import annotations

import asyncio
import uuid

import nats

from bus.lease import Lease
from bus.stream import ensure_bucket
from tests.support import NatsServer


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
