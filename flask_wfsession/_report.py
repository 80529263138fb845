"""Reporting what the extension did: a log line, a warning and a signal.

Three channels, because each can be switched off by something else: a
``logging.config.fileConfig()`` call (Alembic's and Flask-Migrate's
``env.py``) disables every logger that exists at that moment, so the
``flask_wfsession`` logger is enabled again before each report; a warning of
a :class:`~flask_wfsession.WFSessionWarning` category reaches tests run with
``filterwarnings = error``; the signal reaches the app's own alerting.

Signals are sent only after the extension's own state is consistent. A
receiver that raises is logged, and then either re-raised (a release: only
that step fails) or not (a teardown: the request is already over).
"""

from __future__ import annotations

import inspect
import logging
import typing as t
import warnings

if t.TYPE_CHECKING:
    from blinker import Signal
    from flask import Flask

logger = logging.getLogger("flask_wfsession")


def log() -> logging.Logger:
    """The package's logger, enabled again if ``fileConfig()`` disabled it."""
    if logger.disabled:
        logger.disabled = False
    return logger


def warn(message: str, category: type[Warning], stacklevel: int = 3) -> None:
    """Log ``message`` as a warning and issue it as a ``category`` warning."""
    log().warning("%s", message)
    warnings.warn(message, category, stacklevel=stacklevel)


def report(
    message: str,
    category: type[Warning],
    signal: Signal,
    app: Flask,
    *,
    reraise: bool,
    **kwargs: t.Any,
) -> None:
    """Log ``message``, send ``signal``, then issue the warning.

    The warning comes last so that, with warnings turned into errors, the
    signal's receivers have still run; a receiver's exception is re-raised
    (if ``reraise``) only after the warning.
    """
    log().warning("%s", message)
    try:
        send(signal, app, reraise=reraise, **kwargs)
    finally:
        warnings.warn(message, category, stacklevel=3)


def send(signal: Signal, app: Flask, *, reraise: bool, **kwargs: t.Any) -> None:
    """Send ``signal`` to each receiver in turn: one that raises is logged, and
    the others still receive it; the first error is re-raised if ``reraise``."""
    if not signal.receivers or signal.is_muted:
        return
    first: Exception | None = None
    for receiver in signal.receivers_for(app):
        try:
            result = receiver(app, **kwargs)
            if inspect.isawaitable(result):
                getattr(result, "close", lambda: None)()
                raise TypeError(
                    f"{receiver!r} is a coroutine function: receivers run synchronously"
                )
        except Exception as error:
            log().exception("A receiver of the %r signal raised.", getattr(signal, "name", signal))
            first = first or error
    if reraise and first is not None:
        raise first
