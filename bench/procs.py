"""The bench's child processes, each started and stopped by its own pid: the sink, the OTLP receiver, the
service, py-spy.

The service is `taskset -c <core> python -m service`, so its pid is the pinned interpreter itself
and `/proc/<pid>` gives its CPU time and its peak RSS (`VmHWM`). The sink is `python -m bench.sink`
on the other core, driven through its `/__bench/` control calls.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

_TICKS = os.sysconf("SC_CLK_TCK")


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    return argv if cpus is None else ["taskset", "-c", cpus, *argv]


def inherited_environment() -> dict[str, str]:
    """This process's environment without the service's settings: BRIDGE_* and OTEL_* come from the bench alone,
    so an OTEL_EXPORTER_OTLP_ENDPOINT in the caller's shell cannot turn tracing on in the untraced phases."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OTEL_"))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def thread_count(pid: int) -> int:
    """How many threads a process has now (pyreqwest's Tokio runtime adds its own to the interpreter's)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:  # it exited meanwhile
        return 0


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class _Child:
    """A pinned child process with its stderr in a log file, ready once it printed a line starting with `ready`."""

    def __init__(self, argv: list[str], cpus: str | None, log_path: Path, ready: str, what: str) -> None:
        self._log = log_path.open("wb")
        self._proc = subprocess.Popen(
            pinned(cpus, [sys.executable, *argv]), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        assert self._proc.stdout is not None
        self.ready_line = self._proc.stdout.readline().decode()
        if not self.ready_line.startswith(ready):
            self.stop()
            raise RuntimeError(f"{what} did not start; see {log_path}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


class Sink(_Child):
    """`python -m bench.sink` as a child process, and a client for its control calls."""

    def __init__(self, cpus: str | None, log_path: Path) -> None:
        super().__init__(["-m", "bench.sink", "--port", "0"], cpus, log_path, "LISTENING ", "the sink")
        self.port = int(self.ready_line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._session: aiohttp.ClientSession | None = None

    async def _call(self, method: str, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.request(method, self.base_url + path) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def reset(self, latency_ms: float = 0.0, track: bool = False) -> None:
        await self._call("POST", f"/__bench/reset?latency_ms={latency_ms}&track={int(track)}")

    async def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = await self._call("GET", "/__bench/stats")
        return found

    async def ids(self) -> list[tuple[str, float]]:
        return [(str(i), float(t)) for i, t in await self._call("GET", "/__bench/ids")]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class Receiver(_Child):
    """`python -m tests.support.otlp_receiver` as a child process: a real OTLP/HTTP collector for the traced phase,
    in a process of its own (on the other core) so that decoding the spans costs the service nothing."""

    def __init__(self, cpus: str | None, log_path: Path) -> None:
        argv = ["-m", "tests.support.otlp_receiver", "--port", "0"]
        super().__init__(argv, cpus, log_path, "receiving ", "the OTLP receiver")
        # "receiving OTLP/HTTP traces on http://127.0.0.1:<port>/v1/traces"
        self.endpoint = self.ready_line.split()[-1].removesuffix("/v1/traces")
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it (the exporter appends /v1/traces)."""

    async def spans(self) -> int:
        """How many spans it has received so far (every request decoded, not just counted bytes)."""
        async with aiohttp.ClientSession() as session, session.get(self.endpoint + "/__count") as response:
            response.raise_for_status()
            counts = orjson.loads(await response.read())
        if counts["bad_requests"]:
            raise RuntimeError(f"the OTLP receiver refused {counts['bad_requests']} export requests")
        return int(counts["spans"])


class ServiceProcess:
    """`python -m service`, pinned, with its output in a log file."""

    def __init__(self, environ: Mapping[str, str], cwd: Path, cpus: str | None, log_path: Path) -> None:
        self.log_path = log_path
        env = inherited_environment()
        env.update(environ)
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                pinned(cpus, [sys.executable, "-m", "service"]),
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_kib(self.pid) / 1024

    def stop(self, timeout_s: float = 60.0) -> int:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                return self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def problems(self) -> int:
        """Warning and error lines in the log (the bench runs the service at WARNING)."""
        with contextlib.suppress(OSError):
            return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if line.strip())
        return 0

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Profiler:
    """`py-spy record` on a pid, in collapsed-stack format; it ends when its target exits."""

    def __init__(self, pid: int, out: Path, cpus: str | None, *, rate_hz: int = 100, native: bool = False) -> None:
        self.out = out
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw", "--output", str(out)]
        if native:
            argv.append("--native")  # C frames too: fastavro, orjson, the GC
        out.parent.mkdir(parents=True, exist_ok=True)
        self._log_path = out.with_suffix(".log")
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                pinned(cpus, argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait(self, timeout_s: float = 60.0) -> bool:
        """True when py-spy wrote its output."""
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        if self.out.exists() and self.out.stat().st_size > 0:
            return True
        print(f"py-spy wrote no profile: {self._log_path.read_text(errors='replace')[-500:]}", flush=True)
        return False
