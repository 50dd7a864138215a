"""`python -m service` runs the bridge; `check-config` validates and prints settings; `replay` re-drives a DLQ;
`dlq` summarises and shows what a DLQ holds (read-only).

Exit codes: 0 after a clean stop, 2 for invalid settings (every problem is listed), 1 when the
service stopped because it could not keep its delivery promise (nothing past it was committed).
"""

from __future__ import annotations

import asyncio
import json
import sys

from service.app import install_signal_handlers, run, secrets_of
from service.config.settings import Settings, SettingsError, load_settings
from service.core.errors import BridgeError
from service.ops.logging import configure_logging
from service.ops.redaction import Redactor
from service.ops.runtime import event_loop_factory, tune_garbage_collector


def _check_config(settings: Settings) -> int:
    # SecretStr fields dump as "**********", so this is safe to paste into a ticket.
    print(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))
    return 0


async def _serve(settings: Settings, redact: Redactor) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await run(settings, stop, redact)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command not in ("run", "check-config", "replay", "dlq"):
        print(f"unknown command {command!r}; use: python -m service [run|check-config|replay|dlq]", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"inference-bridge: {exc}", file=sys.stderr)
        return 2
    if command == "check-config":
        return _check_config(settings)
    obs = settings.observability
    redact = Redactor(secrets_of(settings))
    configure_logging(obs.log_level, obs.log_format, redact)
    if command == "replay":
        from service.tools.replay.main import main as replay_main

        return replay_main(argv[1:], settings)
    if command == "dlq":
        from service.tools.dlq.main import main as dlq_main

        return dlq_main(argv[1:], settings, redact)
    tune_garbage_collector()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.delivery.event_loop)) as runner:
            runner.run(_serve(settings, redact))
    except BridgeError as exc:
        print(f"inference-bridge: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the broker refused the first connection
        print(f"inference-bridge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
