"""A fresh 3-node NATS cluster: replicas started together while it still elects its leaders wait
for it instead of crashing, and the same fact sent to all three replicas at once is answered
quickly from JetStream (its "duplicate message id is in process" answer is not a failure)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.support import NatsCluster, Smsbus, isolated_env, read_stream, wait_for

pytestmark = pytest.mark.slow
FACTS = 300
_ids = itertools.count(random.randrange(10**9, 10**10))


def test_replicas_started_with_a_forming_cluster_wait_for_it(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "nats")
    env = isolated_env(
        ",".join(cluster.urls), SMSBUS_STREAM_REPLICAS="3", SMSBUS_STARTUP_TIMEOUT="60"
    )
    buses = [Smsbus(env, tmp_path / f"bus{i}") for i in range(3)]
    try:
        # The replicas first, then the nodes, not waiting for JetStream: the replicas race
        # each other and the cluster's elections (a first deploy, a whole-cluster restart).
        for bus in buses:
            bus.start(wait_ready=False)
        wait_for(lambda: all(_retried(b) for b in buses), what="each replica to wait for NATS")
        for node in range(3):
            cluster.start_node(node)
        for bus in buses:  # .ready() fails the test at once if a replica exits
            wait_for(bus.ready, timeout=60, what="every replica to be ready")

        async def serve_one_callback_each() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                for bus in buses:
                    server_id = str(next(_ids))
                    answer = await client.get(
                        f"{bus.base}/callbacks/smspilot",
                        params={"server_id": server_id, "status": 2},
                    )
                    assert (200, "OK") == (answer.status_code, answer.text)

        asyncio.run(serve_one_callback_each())
        assert all(b.spool_depth() == 0 for b in buses)
        retries = collections.Counter(
            line.get("step", "connect")
            for b in buses
            for line in b.log_lines()
            if line.get("event") in ("not ready yet; retrying", "NATS not reachable yet; retrying")
        )
        print(f"start-up retries while the cluster formed: {dict(retries)}")
    finally:
        for bus in buses:
            if bus.proc is not None and bus.proc.poll() is None:
                assert 0 == bus.stop()
        cluster.stop()


def _retried(bus: Smsbus) -> bool:
    return any(line.get("event") == "NATS not reachable yet; retrying" for line in bus.log_lines())


def test_the_same_fact_at_three_replicas_at_once_is_answered_from_jetstream(
    tmp_path: Path,
) -> None:
    cluster = NatsCluster(tmp_path / "nats").start()
    env = isolated_env(",".join(cluster.urls), SMSBUS_STREAM_REPLICAS="3")
    buses = [Smsbus(env, tmp_path / f"bus{i}").start() for i in range(3)]
    try:

        async def send_each_fact_everywhere() -> tuple[list[str], list[float], list[int]]:
            ids = [str(next(_ids)) for _ in range(FACTS)]
            latencies: list[float] = []
            statuses: list[int] = []
            async with httpx.AsyncClient(timeout=10) as client:

                async def one(bus: Smsbus, server_id: str) -> None:
                    started = time.perf_counter()
                    answer = await client.get(
                        f"{bus.base}/callbacks/smspilot",
                        params={"server_id": server_id, "status": 2},
                    )
                    latencies.append(time.perf_counter() - started)
                    statuses.append(answer.status_code if answer.text == "OK" else -1)

                for server_id in ids:
                    await asyncio.gather(*(one(bus, server_id) for bus in buses))
            return ids, latencies, statuses

        ids, latencies, statuses = asyncio.run(send_each_fact_everywhere())
        assert [200] * (3 * FACTS) == statuses
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        resends = sum(b.metric("smsbus_publish_resends_total") for b in buses)
        print(f"same fact at 3 replicas: p99 {p99 * 1000:.1f} ms, max "
              f"{latencies[-1] * 1000:.1f} ms, in-flight resends {resends:g}")  # fmt: skip
        assert p99 <= 0.100, f"p99 {p99 * 1000:.1f} ms"
        assert [0, 0, 0] == [b.spool_depth() for b in buses]
        assert [0, 0, 0] == [b.metric("smsbus_publish_failures_total") for b in buses]
        stored = read_stream(cluster.urls, buses[0].stream, f"{buses[0].prefix}.status.>")
        counts = collections.Counter(s.event["subject"] for s in stored)
        assert set(ids) == set(counts)
        assert [] == [i for i, n in counts.items() if n != 1]
    finally:
        for bus in buses:
            if bus.proc is not None and bus.proc.poll() is None:
                assert 0 == bus.stop()
        cluster.stop()
