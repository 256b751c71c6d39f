"""The configuration error and its two checks: a leaf module, so that any schema (and any layer above
config/) can raise a user-facing error without importing the validation that imports every schema."""

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and what is allowed."""


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ConfigError unless value is one of allowed."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming key when cond is false."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
