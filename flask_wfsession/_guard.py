"""Checks run before a session sends SQL: its own thread, and the step guard.

* A session belongs to the thread (or greenlet) that made it, or for a
  session made elsewhere (Flask-SQLAlchemy's ``db.session``), the one that
  first ran SQL on it. SQL from any other thread raises
  :class:`~flask_wfsession.CrossThreadSessionError`.
* While a long-running step's body runs, a session that was released for the
  step must not open a new transaction, which would pin a connection for the
  rest of the slow call. Sessions made inside the step (short
  ``wfs.detached()`` writes) are allowed.

:func:`check` runs in the ``do_orm_execute`` and ``before_flush`` hooks
(see ``_hooks``), before the session asks the pool for a connection.
"""

from __future__ import annotations

import contextvars
import threading
import typing as t
import warnings

import sqlalchemy.orm as orm

from ._errors import CrossThreadSessionError, StepGuardError, StepGuardWarning

_OWNER = "flask_wfsession.owner"  # Session.info: ident of the owning thread
_DEPTH = "flask_wfsession.step_depth"  # Session.info: step depth at creation

GuardMode = t.Literal["raise", "warn", "off"]


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
    """Make the calling thread the owner of ``session``.

    :param scoped: a scoped session is guarded in every step of its context;
        other sessions only in steps that started after they were made.
    """
    session.info[_OWNER] = threading.get_ident()
    session.info[_DEPTH] = 0 if scoped else step_var.get().depth


def _thread_name(ident: int) -> str:
    """The name of the live thread ``ident``, for error messages only."""
    return next((t.name for t in threading.enumerate() if t.ident == ident), f"#{ident}")


def check(session: orm.Session) -> None:
    """Raise if ``session`` may not run SQL here and now."""
    ident = threading.get_ident()
    owner = session.info.get(_OWNER)
    if owner is None:
        session.info[_OWNER] = ident
    elif owner != ident:
        raise CrossThreadSessionError(
            f"This session belongs to thread {_thread_name(owner)!r} but thread"
            f" {threading.current_thread().name!r} tried to run SQL on it. A session"
            " must stay in the thread that made it. Run the work with 'wfs.spawn()'"
            " or 'wfs.submit()', which give the worker a session of its own, or"
            " open one in the worker with 'wfs.detached()'."
        )
    step = step_var.get()
    if step.depth > session.info.get(_DEPTH, 0) and step.guard != "off":
        message = (
            f"The session was used inside the long-running step {step.name!r}. That"
            " would open a transaction and hold a pooled connection for the rest of"
            " the slow call. Load what the step needs before it starts, or use"
            " 'with wfs.detached() as session:' for a short read or write inside it."
        )
        if step.guard == "raise":
            raise StepGuardError(message)
        warnings.warn(message, StepGuardWarning, stacklevel=4)


def owned_here(session: orm.Session) -> bool:
    """Whether the calling thread may use ``session``."""
    owner = session.info.get(_OWNER)
    return owner is None or bool(owner == threading.get_ident())
