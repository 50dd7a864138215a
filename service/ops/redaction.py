"""Secrets never leave the process: every text bound for a log line or a dead-letter header is redacted first."""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "[REDACTED]"


class Redactor:
    """Removes known secret values from any text bound for a header or a log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets: tuple[str, ...] = ()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Learn one more secret (a rotated API key): longest first, so a key that contains another goes whole."""
        if len(secret) >= 4 and secret not in self._secrets:
            self._secrets = tuple(sorted({*self._secrets, secret}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text
