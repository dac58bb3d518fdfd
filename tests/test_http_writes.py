"""Each answer in one write (receiver.server.Protocol): a response's head waits for its body, so
a callback's `OK` is one TCP segment, never two; an interim `100 Continue`, a HEAD answer (no
body), uvicorn's own 400 and pipelined requests still go out whole and in order. A request slow to
arrive, which uvicorn alone would wait for for ever, is cut off. Against uvicorn serving on a real
socket, and against `smsbus serve`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from receiver import server as server_module
from receiver.server import REQUEST_WITHIN, Protocol, bind
from tests.support import NatsServer, Smsbus, await_for, free_port, isolated_env, wait_for


class _Recorded:
    """The real transport, its writes also kept (the test's window on what went out)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    if scope["path"] == "/stream":  # a body in parts, one of them looking like a head
        parts = [b"x", b"HTTP/1.1 200 OK", b"!"]
        length = str(sum(map(len, parts))).encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", length)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": parts[0], "more_body": True})
        await send({"type": "http.response.body", "body": parts[1], "more_body": True})
        await _released.wait()  # until the client has read the parts so far
        await send({"type": "http.response.body", "body": parts[2]})
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"OK"})


_released = asyncio.Event()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return head + body


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[tuple[uvicorn.Server, str, int]]:
    """`_ok` served by uvicorn on our Protocol, in this process: the server, its host and port."""
    _released.clear()  # an earlier test's release
    config = uvicorn.Config(_ok, http=Protocol, loop="none", lifespan="off", log_config=None,
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    sock = bind("127.0.0.1", free_port())
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:

        async def started() -> bool:
            return server.started

        await await_for(started, what="uvicorn to start")
        host, port = sock.getsockname()[:2]
        yield server, host, port
    finally:
        _released.set()
        server.should_exit = True
        await serving


def test_a_response_goes_out_in_one_write() -> None:
    async def scenario() -> None:
        async with _serving() as (server, host, port):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
            first = await _answer(reader)
            assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nOK")
            (protocol,) = server.server_state.connections
            recorded = _Recorded(protocol.transport._transport)  # type: ignore[attr-defined]
            protocol.transport._transport = recorded  # type: ignore[attr-defined]

            writer.write(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
            assert first[-30:] == (await _answer(reader))[-30:]
            assert 1 == len(recorded.writes), recorded.writes
            assert recorded.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
            assert recorded.writes[0].endswith(b"\r\n\r\nOK")

            writer.write(b"HEAD /head HTTP/1.1\r\nhost: x\r\n\r\n")  # no body is ever written
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 2" in head
            assert [head] == recorded.writes[1:]

            # The client waits for the interim answer before it sends the body.
            writer.write(b"POST /form HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                         b"expect: 100-continue\r\n\r\n")  # fmt: skip
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"HTTP/1.1 100 Continue\r\n\r\n" == interim
            writer.write(b"a=1")
            assert (await _answer(reader)).endswith(b"\r\n\r\nOK")
            assert 4 == len(recorded.writes)
            assert interim == recorded.writes[2]
            assert recorded.writes[3].startswith(b"HTTP/1.1 200 OK\r\n")
            assert recorded.writes[3].endswith(b"\r\n\r\nOK")

            # Two requests in one segment: two whole answers, in order.
            writer.write(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\n\r\n")
            for _ in range(2):
                assert (await _answer(reader)).endswith(b"\r\n\r\nOK")
            assert 6 == len(recorded.writes)

            # Only a response's first write can be its head: a later part of the body that
            # looks like one goes out at once.
            writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"content-length: 17" in head
            assert b"xHTTP/1.1 200 OK" == await asyncio.wait_for(reader.readexactly(16), 5)
            _released.set()
            assert b"!" == await asyncio.wait_for(reader.readexactly(1), 5)
            assert [head + b"x", b"HTTP/1.1 200 OK", b"!"] == recorded.writes[6:]
            writer.close()

            # Not HTTP: uvicorn's own 400, written whole before the connection closes.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"NOT HTTP\r\n\r\n")
            refused = await asyncio.wait_for(reader.read(), 5)
            assert refused.startswith(b"HTTP/1.1 400 Bad Request\r\n"), refused
            writer.close()

    asyncio.run(scenario())


def test_a_request_waiting_behind_a_slow_answer_is_not_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request sent right behind another on one connection waits, its body unread, while the
    answer before it is worked on: uvicorn reads on once that answer is out. The wait is not the
    client's, so it does not count against REQUEST_WITHIN."""
    monkeypatch.setattr(server_module, "REQUEST_WITHIN", 0.3)

    async def scenario() -> None:
        async with _serving() as (_, host, port):
            reader, writer = await asyncio.open_connection(host, port)
            slow = b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"  # answered after 1 s
            writer.write(slow + b"POST /form HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n")
            await asyncio.sleep(0.1)
            writer.write(b"a=1")
            for _ in range(2):
                answer = await _answer(reader)
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"OK")
            writer.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("svc")).start()
    yield bus
    assert bus.stop() == 0


def _connect(service: Smsbus) -> socket.socket:
    host, port = service.base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _read_until(conn: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """What the connection brings until `done` says it is enough; fails if it closes first."""
    received = b""
    while not done(received):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    return received


def test_the_service_answers_pipelined_callbacks_and_an_expected_continue_whole(
    service: Smsbus,
) -> None:
    one = b"GET /callbacks/smspilot?server_id=%d&status=2 HTTP/1.1\r\nhost: x\r\n\r\n"
    with _connect(service) as conn:
        conn.sendall(one % 7100001 + one % 7100002 + one % 7100003)
        received = _read_until(conn, lambda r: r.count(b"HTTP/1.1 ") == 3 and r.endswith(b"OK"))
    answers = [b"HTTP/1.1 " + part for part in received.split(b"HTTP/1.1 ")[1:]]
    assert 3 == len(answers)
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b"\r\n\r\nOK") for a in answers)

    with _connect(service) as conn:
        body = b"server_id=7100004&status=1"
        conn.sendall(b"POST /callbacks/smspilot HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/x-www-form-urlencoded\r\n"
                     b"content-length: %d\r\nexpect: 100-continue\r\n\r\n" % len(body))  # fmt: skip
        assert b"HTTP/1.1 100 Continue\r\n\r\n" == conn.recv(65536)
        conn.sendall(body)
        received = _read_until(conn, lambda r: r.endswith(b"OK"))
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")

        conn.sendall(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        head = _read_until(conn, lambda r: r.endswith(b"\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 ")


def test_a_request_slow_to_arrive_is_cut_off_and_callbacks_go_on(service: Smsbus) -> None:
    """uvicorn alone holds each of these for ever: a connection that sends nothing, a head that
    brings a byte a second, a body that never ends, the second request on a connection kept
    alive left half sent. Each is closed REQUEST_WITHIN after its first byte (or the
    connection's start), with a 408 where a request had begun; a request sent in parts within
    that time is answered, and callbacks on other connections are answered meanwhile."""
    counted = lambda: (  # noqa: E731
        service.metric("smsbus_http_requests_too_slow_total", listener="public"),
        service.metric("smsbus_http_requests_too_slow_total", listener="private"),
    )
    (public, private), cut_before = counted(), len(_cut(service))
    callback = b"GET /callbacks/smspilot?server_id=%d&status=2 HTTP/1.1\r\nhost: x\r\n"
    idle, head, body, kept = (_connect(service) for _ in range(4))
    api_host, api_port = service.api.removeprefix("http://").rsplit(":", 1)
    api = socket.create_connection((api_host, int(api_port)), timeout=5)  # the private listener
    started = time.monotonic()
    head.sendall(callback % 7100010)
    body.sendall(b"POST /callbacks/smspilot HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
                 b"content-type: application/x-www-form-urlencoded\r\n\r\nserver_id=7")  # fmt: skip
    for part in (callback % 7100011, b"x-part: 2\r\n", b"\r\n"):  # in parts, within the time
        kept.sendall(part)
        time.sleep(0.3)
    assert _read_until(kept, lambda r: r.endswith(b"OK")).startswith(b"HTTP/1.1 200 OK\r\n")
    second = time.monotonic()
    kept.sendall(callback % 7100012)  # its head never ends

    def trickle() -> None:  # a byte a second: each one in time, the request not
        try:
            while True:
                time.sleep(1)
                head.sendall(b"x")
        except OSError:
            return

    threading.Thread(target=trickle, daemon=True).start()
    with httpx.Client(timeout=10) as client:
        service.callback(client, "7100013")
    closed: dict[str, tuple[bytes, float]] = {}
    connections = {"idle": idle, "head": head, "body": body, "kept": kept, "api": api}
    for name, conn in connections.items():
        conn.settimeout(REQUEST_WITHIN + 10)
        closed[name] = (_read_to_end(conn), time.monotonic())
        conn.close()
    with httpx.Client(timeout=10) as client:
        service.callback(client, "7100014")
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"content-length: 38\r\nconnection: close\r\n\r\n"
              b"request not received whole within 10 s")  # fmt: skip
    assert {"idle": b"", "head": answer, "body": answer, "kept": answer, "api": b""} == {
        name: data for name, (data, _) in closed.items()
    }
    for name, (_, at) in closed.items():
        took = at - (second if name == "kept" else started)
        assert REQUEST_WITHIN - 0.5 < took < REQUEST_WITHIN + 5, (name, took)
    wait_for(lambda: counted() == (public + 4, private + 1), what="the five counted")
    cut = _cut(service)[cut_before:]
    assert [("private", False), ("public", False)] + [("public", True)] * 3 == sorted(
        (line["listener"], line["began"]) for line in cut
    )


def _read_to_end(conn: socket.socket) -> bytes:
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return received


def _cut(service: Smsbus) -> list[dict[str, Any]]:
    event = "request not received whole in time; connection closed"
    return [line for line in service.log_lines() if line["event"] == event]
