"""The root of every error Kilde raises on purpose.

Each error carries enough context to act on: what went wrong, where, and how to fix it.
"""

from __future__ import annotations


class KildeError(Exception):
    """Base class for all of Kilde's own errors."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"


class ConfigError(KildeError):
    """A setting, file or environment variable is missing or wrong."""
