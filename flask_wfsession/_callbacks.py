"""``on_commit`` callbacks: run after the real commit, dropped (and said so) otherwise.

Callbacks wait on the session for its next real commit: the outermost
unit's, or, outside units, the app's own ``session.commit()``. A release
ending a read-only transaction before a step is not one. Those registered
inside a savepoint that ends without being released go with it.
"""

from __future__ import annotations

import typing as t

import sqlalchemy.orm as orm

from . import _report
from ._callsite import user_frame
from ._errors import DroppedCallbacksWarning
from ._unit import CALLBACKS, RELEASED, UNIT, Callback, unit_of


def on_commit(session: orm.Session, fn: t.Callable[[], object]) -> None:
    """Run ``fn`` after the next real commit of ``session`` (see the module's docstring)."""
    if not callable(fn):
        raise TypeError(
            f"'wfs.on_commit()' takes a function to call after the commit, not {fn!r}."
            " Wrap the call: 'wfs.on_commit(lambda: task.delay(id))'."
        )
    callback = Callback(fn, user_frame(), unit_of(session), session.get_nested_transaction())
    session.info.setdefault(CALLBACKS, []).append(callback)


def run_callbacks(callbacks: list[Callback]) -> None:
    """Call each callback; one that raises is logged and the others still run.
    An interruption (``KeyboardInterrupt``, a gevent timeout) stops them: the
    rest are reported as dropped, and it goes on."""
    for i, callback in enumerate(callbacks):
        try:
            callback.fn()
        except Exception:
            _report.log().exception(
                "An 'on_commit' callback%s raised. The commit stands; the other callbacks ran.",
                f" registered at {callback.site}" if callback.site else "",
            )
        except BaseException as interruption:
            if callbacks[i + 1 :]:
                report_dropped(
                    callbacks[i + 1 :], f"an earlier callback was interrupted by {interruption!r}"
                )
            raise


def sites(callbacks: list[Callback]) -> str:
    return ", ".join(c.site or repr(c.fn) for c in callbacks)


def log_dropped(callbacks: list[Callback], why: str) -> None:
    """Log callbacks dropped because their transaction rolled back (expected: the
    rollback itself is what the app sees)."""
    if callbacks:
        _report.log().info(
            "Dropped %d 'on_commit' callbacks (registered at %s): %s.",
            len(callbacks),
            sites(callbacks),
            why,
        )


def report_dropped(callbacks: list[Callback], reason: str) -> None:
    """Log and warn that ``callbacks`` will never run."""
    _report.warn(
        f"Dropped {len(callbacks)} 'on_commit' callback{'s' if len(callbacks) > 1 else ''}"
        f" (registered at {sites(callbacks)}): {reason}. They run only after a"
        " commit; commit the session (or end the unit of work) in this context.",
        DroppedCallbacksWarning,
        stacklevel=2,
    )


def savepoint_ended(session: orm.Session, savepoint: orm.SessionTransaction) -> None:
    """A savepoint ended: unless it was released, drop the callbacks registered
    inside it (a rollback, or a flush that failed inside it and closed it)."""
    info = session.info
    if (UNIT not in info and CALLBACKS not in info) or info.pop(RELEASED, None) is savepoint:
        return
    callbacks: list[Callback] | None = info.get(CALLBACKS)
    if callbacks:
        info[CALLBACKS] = [c for c in callbacks if not _inside(c.savepoint, savepoint)]


def _inside(savepoint: orm.SessionTransaction | None, outer: orm.SessionTransaction) -> bool:
    while savepoint is not None:
        if savepoint is outer:
            return True
        savepoint = savepoint.parent
    return False
