"""What a unit of work refuses: joins from outside its call, units that would
split another transaction, functions whose body would run outside it, and
COMMITs sent below the session.

A unit belongs to the code that entered it: joining it is allowed only from
inside that code's call (the frame that entered it is on the stack), or from
a task or thread started inside it and awaited by it. Another asyncio task
sharing the app context, or the caller of a generator paused inside a unit,
would otherwise join a unit it cannot see end.

Below the session, on its connections (:func:`watch`): a ``COMMIT`` sent
while a unit is open, but not by the unit (``session.connection().commit()``,
or another session on a pool that shares one connection), is refused before
it reaches the driver. And on SQLite, Python's ``sqlite3`` module sends
``BEGIN`` only before a write, so a ``SAVEPOINT`` sent first starts a
transaction of its own, which its release commits: while a unit is open, the
unit begins the transaction before any savepoint, its own or the app's.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import typing as t
import weakref
from types import FrameType

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask.globals import _cv_app

from ._callsite import user_frame
from ._database import aborted, ended_under, shares_driver
from ._errors import NoAppContextError, UnitOfWorkError
from ._unit import ENDING, INSIDE, UNIT, Unit, unit_of

if t.TYPE_CHECKING:
    pass

REPLACED = (
    "its session was closed and replaced inside it ('db.session.remove()'?): what was"
    " done since on the new session is not part of it"
)


def failed_inside(session: orm.Session) -> str | None:
    """Why the unit's transaction can no longer commit, though no error left the
    unit: a statement failed inside it and its error was caught."""
    caught = "a statement inside it failed, and its error was caught"
    transaction = session.get_transaction()
    if transaction is not None and not transaction.is_active:
        return f"{caught}: SQLAlchemy rolled the transaction back"
    if aborted(session):
        return f"{caught}: the database aborted the transaction, and a COMMIT would roll it back"
    if ended_under(session):
        return (
            "its writes were committed or rolled back by another session sharing its"
            " database connection (StaticPool)"
        )
    return None


def _code(generator: t.Any) -> t.Any:
    return getattr(generator, "gi_code", None) or generator.ag_code


def _not_started(generator: t.Any) -> bool:
    if inspect.isgenerator(generator):
        return inspect.getgeneratorstate(generator) == inspect.GEN_CREATED
    return True  # an async generator: a plain function cannot have run it


def check_outermost(session: orm.Session, name: str) -> None:
    """Refuse to open a unit on a transaction that can no longer commit, or
    inside the app's own ``session.begin()`` or ``begin_nested()`` block (the
    block ends the transaction; the unit would split it)."""
    transaction = session.get_transaction()
    failed = failed_inside(session) if transaction is not None else None
    if failed is not None:
        raise UnitOfWorkError(
            f"The unit of work {name!r} was entered on a transaction that can no longer"
            f" commit ({failed.split(': ', 1)[-1]}): an earlier statement failed, and its"
            " error was caught. Nothing was committed. Roll the session back"
            " ('session.rollback()') before entering the unit."
        )
    if transaction is None or (
        transaction.origin is orm.SessionTransactionOrigin.AUTOBEGIN
        and not session.in_nested_transaction()
    ):
        return
    raise UnitOfWorkError(
        f"The unit of work {name!r} was entered inside an open 'session.begin()' or"
        " 'session.begin_nested()' block: that block ends the transaction, and the unit"
        " would commit it halfway. Nothing was committed. Enter the unit outside the"
        " block, or replace the block with the unit."
    )


def check_ran(func: t.Callable[..., object], result: object) -> None:
    """Refuse a function whose body did not run in the call: it returned a
    coroutine, or a generator not started yet (a decorator hid what it wraps).
    A generator expression built from what the unit loaded is fine."""
    unrun = inspect.iscoroutine(result) or (
        (inspect.isgenerator(result) or inspect.isasyncgen(result))
        and _code(result).co_name != "<genexpr>"
        and _not_started(result)
    )
    if unrun:
        close = getattr(result, "close", None)
        if close is not None:
            close()  # its body never runs: no "never awaited" warning
        raise TypeError(
            f"'wfs.transaction' wrapped {func.__qualname__!r}, which returned"
            f" {type(result).__name__!r} object: its body runs after the call, outside"
            " the unit, so the unit was rolled back. Decorate the function itself (put"
            " '@wfs.transaction' next to 'async def'), or use 'with wfs.transaction():'"
            " inside a generator."
        )


def replaced_in(unit: Unit) -> bool:
    """Whether the app context's session is no longer the one the unit opened on."""
    try:
        return unit.current()[1] is not unit.session
    except NoAppContextError:
        return False


def replaces(session: orm.Session) -> Unit | None:
    """The unit open in this app context on another session that ``session``,
    now the context's own, has replaced (``db.session.remove()`` inside the unit)."""
    unit = INSIDE.get()
    if (
        unit is None
        or unit.session is session
        or unit_of(unit.session) is not unit
        or unit.context is not _cv_app.get(None)
    ):
        return None
    try:
        return unit if unit.current()[1] is session else None
    except NoAppContextError:
        return None


_CONTEXTLIB = contextlib.__file__


def user_code(frame: FrameType) -> FrameType:
    """The frame of the code a ``with`` block belongs to, past ``contextlib``:
    ``ExitStack.enter_context``, and the generator of a ``@contextmanager``
    (which contextlib resumes in step with its caller)."""
    current: FrameType | None = frame
    while current is not None:
        back = current.f_back
        in_contextlib = current.f_code.co_filename == _CONTEXTLIB
        wrapped = back is not None and back.f_code.co_filename == _CONTEXTLIB
        if not (in_contextlib or (wrapped and current.f_code.co_flags & _GENERATORS)):
            return current
        current = back
    return frame


_GENERATORS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def current_task() -> object | None:
    asyncio = sys.modules.get("asyncio")  # not imported: no task
    if asyncio is None:
        return None
    try:
        task: object | None = asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
    return task


def check_join(unit: Unit, name: str) -> None:
    """Refuse a join from code that does not run inside the unit's own call
    (nor in an asyncio task started inside it: ``asyncio.wait_for``, ``shield``)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame is unit.owner:
            return
        frame = frame.f_back
    if INSIDE.get() is unit and (
        threading.get_ident() != unit.thread or current_task() is not unit.task
    ):
        return  # a task or thread started inside it, awaited by it (asyncio.to_thread)
    owner = unit.owner
    flags = owner.f_code.co_flags if owner is not None else 0
    if flags & inspect.CO_COROUTINE:
        who = "another asyncio task sharing this app context (an 'asyncio.gather' in one view?)"
    elif flags & inspect.CO_GENERATOR:
        who = "the caller of a paused generator that holds it open"
    else:
        who = "code that does not run inside it"
    unit.failed = unit.failed or f"the unit of work {name!r} tried to join it from {who}"
    raise UnitOfWorkError(
        f"The unit of work {name!r} was entered by {who}, while {unit.describe()} is"
        " open on the same session: joining it would commit or undo this work with"
        " that unit's, out of this code's sight. Neither will commit. Give concurrent"
        " work its own app context ('wfs.spawn', 'wfs.submit'), and finish a generator"
        " before starting other units."
    )


# -- On the connections: COMMITs, and SQLite's savepoints --------------------------

# The session of each connection in a session's transaction, for the engine's
# events, which see only the connection.
_SESSIONS: weakref.WeakKeyDictionary[sa.Connection, weakref.ref[orm.Session]] = (
    weakref.WeakKeyDictionary()
)


def watch(engine: sa.Engine) -> None:
    """Listen to ``engine``'s COMMITs, and on SQLite to its savepoints, once."""
    if not sa.event.contains(engine, "commit", _before_commit_sent):
        sa.event.listen(engine, "commit", _before_commit_sent)
    if engine.dialect.name == "sqlite" and not sa.event.contains(
        engine, "savepoint", _before_savepoint
    ):
        sa.event.listen(engine, "savepoint", _before_savepoint)


def began(session: orm.Session, connection: sa.Connection) -> None:
    """``session``'s transaction, with a unit open, took ``connection``."""
    _SESSIONS[connection] = weakref.ref(session)


def _unit_session(connection: sa.Connection) -> orm.Session | None:
    """The session of ``connection``, if a unit is open on it."""
    ref = _SESSIONS.get(connection)
    session = ref() if ref is not None else None
    return session if session is not None and UNIT in session.info else None


def _before_commit_sent(connection: sa.Connection) -> None:
    session = _unit_session(connection)
    if session is None:
        _check_shared(connection)
        return
    if session.info.get(ENDING) is not None:
        return
    unit: Unit = session.info[UNIT]
    site = user_frame()
    unit.failed = unit.failed or f"a COMMIT was sent{f' at {site}' if site else ''} inside it"
    raise UnitOfWorkError(
        f"A COMMIT{f' at {site}' if site else ''} on the session's connection"
        f" ('session.connection().commit()'?) inside {unit.describe()}: nothing was"
        " committed, and the unit can no longer commit. A unit of work commits once,"
        f" when its outermost entry {unit.name!r} returns: remove this commit."
    )


def _check_shared(connection: sa.Connection) -> None:
    """Refuse another session's COMMIT on the driver connection an open unit uses
    (a pool that shares one connection): it would commit the unit's writes."""
    unit = INSIDE.get()
    if (
        unit is None
        or unit_of(unit.session) is not unit
        or not shares_driver(unit.session, connection)
    ):
        return
    raise UnitOfWorkError(
        f"A COMMIT by another session inside {unit.describe()}, on the one database"
        " connection the unit's session uses too (a StaticPool or SingletonThreadPool,"
        " as Flask-SQLAlchemy makes for 'sqlite://'): it would commit the unit's writes."
        " Nothing was committed. On such a pool, sessions cannot be kept apart: use a"
        " file database or a QueuePool, or do this work after the unit."
    )


def _before_savepoint(connection: sa.Connection, name: str | None) -> None:
    session = _unit_session(connection)
    if session is None:
        return  # outside units, the app's savepoints behave as without the extension
    driver = connection.connection.dbapi_connection
    if driver is None or getattr(driver, "in_transaction", True):
        return
    if getattr(driver, "isolation_level", None) is not None:  # None: the app's autocommit
        connection.exec_driver_sql("BEGIN")
