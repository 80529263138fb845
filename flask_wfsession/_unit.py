"""The state of units of work: what is open on a session, and in this context.

A unit's state lives on the session (``Session.info``), never on the
decorator, so one decorated function serves every thread and app context.
The context variables say which unit the running code is inside, and which
``with`` blocks it has open.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import time
import typing as t
from types import FrameType

import sqlalchemy.orm as orm
from flask.globals import _cv_app

from ._blocks import OpenBlocks

if t.TYPE_CHECKING:
    from flask import Flask

UNIT = "flask_wfsession.unit"  # Session.info: the open unit of work
ENDING = "flask_wfsession.ending"  # Session.info: the unit or a release is ending the transaction
CALLBACKS = "flask_wfsession.on_commit"  # Session.info: callbacks waiting for a commit
COMMITTED = "flask_wfsession.committed"  # Session.info: the ending transaction committed
RELEASED = "flask_wfsession.released"  # Session.info: the savepoint whose release is ending
ABORTED = "flask_wfsession.aborted"  # Session.info: the COMMIT being sent will roll back

Ending = t.Literal["unit", "release"]


@dataclasses.dataclass(eq=False)
class Frame:
    """One entry into a unit: the outermost, a join, or a savepoint."""

    unit: Unit
    name: str
    savepoint: orm.SessionTransaction | None = None

    @property
    def session(self) -> orm.Session:
        return self.unit.session


# The outermost unit entered in this context: tasks started inside it inherit it.
INSIDE: contextvars.ContextVar[Unit | None] = contextvars.ContextVar(
    "flask_wfsession.unit", default=None
)

# The frames of the 'with wfs.transaction()' blocks open in this thread or task.
WITH: OpenBlocks[Frame] = OpenBlocks("flask_wfsession.with")


@dataclasses.dataclass(eq=False)
class Unit:
    app: Flask
    name: str  # of the outermost entry
    site: str | None  # where it was entered
    session: orm.Session
    current: t.Callable[[], tuple[Flask, orm.Session]]  # the app context's session now
    owner: FrameType | None  # the Python frame running it: joins come from its call
    task: object | None  # the asyncio task running it, if any
    thread: int = dataclasses.field(default_factory=threading.get_ident)
    context: object = dataclasses.field(default_factory=lambda: _cv_app.get(None))
    outer: Unit | None = None  # the unit INSIDE named before this one
    started: float = dataclasses.field(default_factory=time.perf_counter)
    frames: list[Frame] = dataclasses.field(default_factory=list)
    failed: str | None = None  # why it can no longer commit
    abandoned: bool = False  # still open when its app context ended
    before: list[str] = dataclasses.field(default_factory=list)  # writes from before it

    def describe(self) -> str:
        where = f" (entered at {self.site})" if self.site else ""
        return f"the unit of work {self.name!r}{where}"


@dataclasses.dataclass(eq=False)
class Callback:
    fn: t.Callable[[], object]
    site: str | None
    unit: Unit | None  # the unit open when it was registered
    savepoint: orm.SessionTransaction | None  # the innermost savepoint then


def unit_of(session: orm.Session) -> Unit | None:
    """The unit of work open on ``session``, if any."""
    return t.cast("Unit | None", session.info.get(UNIT))


@contextlib.contextmanager
def ending(session: orm.Session, kind: Ending) -> t.Iterator[None]:
    """Mark a commit or rollback of ``session`` in the block as the unit's own
    (``"unit"``) or as a release's end of a read-only transaction (``"release"``,
    after which an open unit and the waiting callbacks carry on)."""
    info = session.info
    outer = info.get(ENDING)
    info[ENDING] = kind
    try:
        yield
    finally:
        if outer is None:
            info.pop(ENDING, None)
        else:
            info[ENDING] = outer
