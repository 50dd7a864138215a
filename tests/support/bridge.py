"""Runs the real service against test infrastructure: in this process (a task) or as a child process.

`bridge_environment` builds the same `BRIDGE_*` variables an operator would set; the in-process
runner passes them through `load_settings`, so tests exercise the real settings path too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from service.app import run
from service.config.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Topics:
    inferences: str
    row_updates: str
    log_updates: str

    def all(self) -> list[str]:
        return [self.inferences, self.row_updates, self.log_updates]

    def dlq(self, topic: str) -> str:
        return topic + ".dlq"


def bridge_environment(
    *,
    bootstrap: str,
    group: str,
    topics: Topics,
    openlayer_url: str,
    humanloop_url: str,
    openlayer_key: str,
    humanloop_key: str,
    registry_url: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {
        "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "BRIDGE_KAFKA__GROUP_ID": group,
        "BRIDGE_KAFKA__COMMIT_INTERVAL_S": "0.2",
        # Small groups on one machine: a dead member (kill -9) must be noticed quickly.
        "BRIDGE_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "BRIDGE_TOPICS__INFERENCES": topics.inferences,
        "BRIDGE_TOPICS__ROW_UPDATES": topics.row_updates,
        "BRIDGE_TOPICS__LOG_UPDATES": topics.log_updates,
        "BRIDGE_OPENLAYER__BASE_URL": openlayer_url,
        "BRIDGE_OPENLAYER__API_KEY": openlayer_key,
        "BRIDGE_HUMANLOOP__BASE_URL": humanloop_url,
        "BRIDGE_HUMANLOOP__API_KEY": humanloop_key,
        "BRIDGE_DELIVERY__INITIAL_BACKOFF_S": "0.05",
        "BRIDGE_DELIVERY__MAX_BACKOFF_S": "0.5",
        "BRIDGE_DELIVERY__DRAIN_TIMEOUT_S": "5",
        "BRIDGE_OBSERVABILITY__HTTP_PORT": "0",
    }
    if registry_url is not None:
        env["BRIDGE_SCHEMA_REGISTRY__URL"] = registry_url
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def running_bridge(environ: Mapping[str, str]) -> AsyncIterator[Settings]:
    """Run the service as a task of the current loop; stop it cleanly (as SIGTERM would) on exit."""
    settings = load_settings(environ)
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop), name="bridge")
    try:
        yield settings
        if task.done():
            task.result()  # surface a crash that happened while the test was waiting
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


class BridgeProcess:
    """`python -m service` as a child process, for kill -9 and exit-code tests."""

    def __init__(self, environ: Mapping[str, str], log_path: Path) -> None:
        # Nothing of the service's own settings from the shell that runs the tests: a BRIDGE_DELIVERY__* or an
        # OTEL_* exported there would change what a chaos scenario or a test says it runs (the defaults).
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OTEL_"))}
        self._env = {**inherited, **environ, "PYTHONUNBUFFERED": "1"}
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def environ(self) -> Mapping[str, str]:
        """The child's environment."""
        return self._env

    def start(self) -> None:
        log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=self._env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def terminate(self, timeout_s: float = 60) -> int:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        return self._proc.wait(timeout_s)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()
