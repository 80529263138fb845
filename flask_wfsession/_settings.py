"""Checking policy and configuration values where they are given.

A misspelled value must fail loudly, never fall back to a default: a
``pending="comit"`` that silently meant "commit" (or "raise") would decide
what happens to the user's writes.
"""

from __future__ import annotations

import typing as t

from ._errors import SettingError

Pending = t.Literal["hold", "raise", "commit", "rollback"]
PENDING_POLICIES: tuple[Pending, ...] = ("hold", "raise", "commit", "rollback")
GuardMode = t.Literal["raise", "warn", "off"]
GUARD_MODES: tuple[GuardMode, ...] = ("raise", "warn", "off")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

C = t.TypeVar("C", bound=str)


def _check(name: str, value: object, choices: tuple[C, ...]) -> C:
    for each in choices:
        if isinstance(value, str) and value == each:
            return each
    raise SettingError(f"{name} is {value!r}; it must be one of {', '.join(map(repr, choices))}.")


def choice(key: str, config: t.Mapping[str, t.Any], choices: tuple[C, ...]) -> C:
    """The value of configuration ``key`` if it is one of ``choices``.

    :raise SettingError: naming the key, the value and the choices.
    """
    return _check(f"'{key}'", config[key], choices)


def pending(name: str, value: object) -> Pending | None:
    """A pending-writes policy given as argument ``name``, or ``None`` for the default.

    :raise SettingError: naming the argument, the value and the policies.
    """
    return None if value is None else _check(name, value, PENDING_POLICIES)


def seconds_or_none(key: str, config: t.Mapping[str, t.Any]) -> float | None:
    """Configuration ``key`` as a number of seconds (0 or more), or ``None`` for off.

    Strings from environment variables are read too: ``"1.5"``, ``"none"``.
    :raise SettingError: for anything else.
    """
    value = config[key]
    if isinstance(value, str) and value.strip().lower() in ("none", "off", ""):
        return None
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds >= 0:
        raise SettingError(
            f"'{key}' is {value!r}; it must be a number of seconds (0 or more), or None"
            " to switch it off."
        )
    return seconds


def boolean(key: str, config: t.Mapping[str, t.Any]) -> bool:
    """Configuration flag ``key``: a bool, 0 or 1, or a string as environment variables give it.

    :raise SettingError: for any other value, such as ``"maybe"`` or ``2``.
    """
    value = config[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(
        f"'{key}' is {value!r}; it must be a boolean: True or False, or one of the"
        " strings 'true', 'false', '1', '0', 'yes', 'no', 'on', 'off'."
    )
