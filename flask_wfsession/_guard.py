"""Checks run before a session sends SQL, flushes, commits or takes a connection.

* **Ownership.** A scoped session belongs to the application context it was
  made for: code running in that context may use it, whichever thread runs
  it (Flask's async views run their coroutine in a thread of asgiref's, with
  the request's context). Any other session (detached, from
  ``wfs.sessionmaker``) belongs to the thread or greenlet that made it. Use
  from anywhere else raises :class:`~flask_wfsession.CrossThreadSessionError`,
  and so does use in a forked child of a transaction begun in the parent.
* **The step guard.** While a long-running step's body runs, a session made
  before the step must not open a transaction, which would pin a connection
  for the rest of the slow call. Sessions made inside the step are allowed.

:func:`check` runs in the session hooks of ``_hooks``, before the session asks
the pool for a connection.
"""

from __future__ import annotations

import contextvars
import os
import threading
import typing as t
import weakref

import flask.globals
import sqlalchemy.orm as orm

from . import _report
from ._errors import CrossThreadSessionError, StepGuardError, StepGuardWarning
from ._settings import GuardMode

_OWNER = "flask_wfsession.owner"  # Session.info: weakref to the AppContext, or thread ident
_THREAD = "flask_wfsession.thread"  # Session.info: ident of the thread that claimed it
_DEPTH = "flask_wfsession.step_depth"  # Session.info: step depth at creation
FORKED = "flask_wfsession.forked"  # Session.info: pid whose transaction this is
SCOPED = "flask_wfsession.scoped"  # Session.info: belongs to an app context

_app_ctx_var: contextvars.ContextVar[t.Any] = flask.globals._cv_app


class _Step(t.NamedTuple):
    depth: int
    name: str
    guard: GuardMode


_NO_STEP = _Step(0, "", "off")
step_var: contextvars.ContextVar[_Step] = contextvars.ContextVar(
    "flask_wfsession.step", default=_NO_STEP
)


def enter_step(name: str, guard: GuardMode) -> None:
    """Mark the current thread or task as running a step's body."""
    outer = step_var.get()
    step_var.set(_Step(outer.depth + 1, name if outer.depth == 0 else outer.name, guard))


def exit_step() -> None:
    """Undo one :func:`enter_step`."""
    step = step_var.get()
    step_var.set(_Step(step.depth - 1, step.name, step.guard) if step.depth > 1 else _NO_STEP)


def claim(session: orm.Session, *, scoped: bool) -> None:
    """Make the current app context (``scoped``) or thread the owner of ``session``.

    :param scoped: a scoped session belongs to its app context and is guarded
        in every step of it; other sessions belong to the thread, and are
        guarded only in steps that started after they were made.
    """
    ctx = _app_ctx_var.get(None) if scoped else None
    session.info[_OWNER] = threading.get_ident() if ctx is None else weakref.ref(ctx)
    session.info[SCOPED] = ctx is not None
    session.info[_THREAD] = threading.get_ident()
    session.info[_DEPTH] = 0 if scoped else step_var.get().depth


def owned_here(session: orm.Session) -> bool:
    """Whether the calling thread (and app context) may use ``session``."""
    owner = session.info.get(_OWNER)
    if owner is None:
        return True
    if isinstance(owner, int):
        return owner == threading.get_ident()
    ctx = owner()
    return ctx is not None and ctx is _app_ctx_var.get(None)


def _thread_name(ident: int) -> str:
    """The name of the live thread ``ident``, for error messages only."""
    return next((t.name for t in threading.enumerate() if t.ident == ident), f"#{ident}")


def check(session: orm.Session, *, guard: bool = True) -> None:
    """Raise if ``session`` may not be used here and now."""
    info = session.info
    if _OWNER not in info:
        # Made elsewhere (Flask-SQLAlchemy's db.session): the first user owns it.
        claim(session, scoped=True)
    elif not owned_here(session):
        owner = info.get(_OWNER)
        whose = "thread" if isinstance(owner, int) else "the app context of thread"
        raise CrossThreadSessionError(
            f"This session belongs to {whose} {_thread_name(info[_THREAD])!r}, but thread"
            f" {threading.current_thread().name!r} tried to use it. A session must stay"
            " with the request, task or thread that made it. Run the work with"
            " 'wfs.spawn()' or 'wfs.submit()', which give the worker a session of its"
            " own, or open one in the worker with 'wfs.detached()'."
        )
    if FORKED in info:
        raise CrossThreadSessionError(
            f"This session's transaction was begun in process {info[FORKED]}, which"
            f" forked this process ({os.getpid()}), and it had written. Those writes"
            " belong to the parent's transaction and cannot be committed here. Call"
            " 'session.rollback()' in this process and redo the work, or open the"
            " session after the fork."
        )
    step = step_var.get()
    if guard and step.depth > info.get(_DEPTH, 0) and step.guard != "off":
        message = (
            f"The session was used inside the long-running step {step.name!r}. That"
            " opens a transaction (or uses the one it holds) for the rest of the slow"
            " call. Load what the step needs before it starts, or use 'with"
            " wfs.detached() as session:' for a short read or write inside it."
        )
        if step.guard == "raise":
            raise StepGuardError(message)
        _report.warn(message, StepGuardWarning, stacklevel=5)
