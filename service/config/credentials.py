"""Credentials that can live in files, the Kubernetes way, and an API key that follows its file.

A Secret mounted as a volume is a directory of files that the kubelet rewrites when the Secret
changes; an environment variable set from it is frozen at the pod's start. So a key read from a
file can be rotated without a restart: `ApiKey.reload` re-reads it when the API refuses the current
one (401/403). Reloads are rate-bounded because a refused key makes every in-flight call fail at
once, and a thousand 401s must not mean a thousand file reads. Nothing here logs or prints a key:
problems name the destination and the path, never the content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.credentials")

MAX_SECRET_FILE_BYTES = 64 * 1024
"""A key or password is a few hundred bytes at most; a larger file is the wrong path, not a secret."""


class SecretFileError(Exception):
    """A secret file cannot be used; the message names the path and the problem, never the content."""


def read_secret_file(path: Path) -> str:
    """The secret in `path` without surrounding whitespace (the newline `echo` or an editor adds)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes; it is not a key")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # `from None` and no str(exc): the decode error quotes the offending byte of the secret.
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    value = text.strip()
    if not value:
        raise SecretFileError(f"{path} is empty")
    return value


def header_problem(key: str) -> str | None:
    """Why `key` cannot travel in an HTTP header, or None. Only printable ASCII can: a line break inside a key file
    (two keys pasted one under the other) or a non-ASCII character (a typographic quote pasted along) made every
    call fail in the client, so every record was dead-lettered. The character is not named: it is part of the key."""
    if key.isascii() and key.isprintable():
        return None
    return "holds a line break, a control character or a non-ASCII character, which no HTTP header can carry"


class ApiKey:
    """The current key of one API destination; `value` is read per call, `reload` after a 401/403.

    `on_change` is called with the new key before any call can use it, so a redactor learns a
    rotated key before it can reach a log line or a dead-letter header. If it raises, the key is
    not changed.
    """

    __slots__ = ("_clock", "_last_reload", "_min_interval_s", "_name", "_on_change", "_path", "_reported", "_value")

    def __init__(
        self,
        name: str,
        value: str,
        path: Path | None = None,
        *,
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 1.0,
    ) -> None:
        if not value:
            raise ValueError(f"the {name} API key is empty")
        self._name = name
        self._value = value
        self._path = path
        self._on_change = on_change
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._last_reload: float | None = None
        # Problems already logged since the file was last read successfully: a file that stays
        # missing while every call answers 401 is one warning, not one per reload.
        self._reported: set[str] = set()

    @property
    def value(self) -> str:
        return self._value

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path | None:
        return self._path

    def reload(self) -> bool:
        """Re-read the key file; True when the key changed. At most one read per `min_interval_s`.

        Without a file, or within the interval, or when the file cannot be used, the current key
        stays and the answer is False. The read is synchronous: a few bytes from a tmpfs-backed
        Secret volume, at most once a second, cost less than handing it to a thread.
        """
        if self._path is None:
            return False
        now = self._clock()
        if self._last_reload is not None and now - self._last_reload < self._min_interval_s:
            return False
        self._last_reload = now
        try:
            value = read_secret_file(self._path)
            if problem := header_problem(value):
                raise SecretFileError(f"{self._path} {problem}")
        except SecretFileError as exc:
            problem = str(exc)
            if problem not in self._reported:
                self._reported.add(problem)
                log.warning("%s API key: %s; keeping the current key", self._name, problem)
            return False
        self._reported.clear()
        if value == self._value:
            return False
        if self._on_change is not None:
            self._on_change(value)
        self._value = value
        log.info("%s API key: a new key was read from %s", self._name, self._path)
        return True

    def __repr__(self) -> str:
        return f"ApiKey(name={self._name!r}, path={self._path!r})"
