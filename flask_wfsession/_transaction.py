"""Units of work: one commit for a piece of work, however many functions it spans.

Modelled on Django's ``atomic``: a :class:`Transaction` is both a decorator
and a context manager. The outermost one open in an app context owns the
transaction of that context's scoped session: it commits when it exits
normally and rolls back when it raises. Inner ones join it and commit
nothing, or, with ``savepoint=True``, wrap their part in a SAVEPOINT, so an
error undoes only that part. The state lives on the session
(``Session.info``), never on the decorator, so one decorated function serves
every thread and app context.

While a unit is open, the session's hooks (``_hooks``) call in here:

* a ``session.commit()`` by anyone but the unit raises before anything is
  flushed or sent, and before a savepoint of the unit is released
  (:func:`before_commit`);
* a rollback or close by anyone but the unit has undone the unit's work: the
  unit is marked failed, so it can no longer commit the rest, and the caller
  gets the error at once (:func:`transaction_ended`);
* a savepoint that ends without being released (rolled back, or closed by a
  flush that failed inside it) takes the callbacks registered inside it
  along (:func:`savepoint_ended`);
* a release before a long-running step (``_release``) asks :func:`unit_of`,
  and never commits or rolls back a unit that wrote: it holds it, or raises.

``on_commit`` callbacks wait on the session for its next real commit: the
outermost unit's, or, outside units, the app's own ``session.commit()``. A
release ending a read-only transaction before a step is not one.

A unit belongs to the code that entered it: joining it is allowed only from
inside that code's call (the frame that entered it is on the stack). Another
asyncio task sharing the app context, or the caller of a generator paused
inside a unit, would otherwise join a unit it cannot see end.

Below the session, on its connections (:func:`watch`): a ``COMMIT`` sent
while a unit is open, but not by the unit (``session.connection().commit()``),
is refused before it reaches the driver. And on SQLite, Python's ``sqlite3``
module sends ``BEGIN`` only before a write, so a ``SAVEPOINT`` sent first
starts a transaction of its own, which its release commits: while a unit is
open, the unit begins the transaction before any savepoint, its own or the
app's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import sys
import threading
import time
import typing as t
import weakref
from types import FrameType, TracebackType

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask
from flask.globals import _cv_app
from sqlalchemy.orm.session import SessionTransactionState

from . import _report, signals
from ._callsite import user_frame
from ._database import (
    SENT,
    aborted,
    connections,
    ended_under,
    invalidated,
    session_touched,
    shares_driver,
)
from ._errors import DroppedCallbacksWarning, NoAppContextError, UnitOfWorkError
from ._pending import describe_pending, has_unflushed, report_discarded

P = t.ParamSpec("P")
R = t.TypeVar("R")

UNIT = "flask_wfsession.unit"  # Session.info: the open unit of work
_ENDING = "flask_wfsession.ending"  # Session.info: the unit or a release is ending the transaction
_CALLBACKS = "flask_wfsession.on_commit"  # Session.info: callbacks waiting for a commit
_COMMITTED = "flask_wfsession.committed"  # Session.info: the ending transaction committed
_RELEASED = "flask_wfsession.released"  # Session.info: the savepoint whose release is ending
_ABORTED = "flask_wfsession.aborted"  # Session.info: the COMMIT being sent will roll back
_COMMITTED_STATE = SessionTransactionState.COMMITTED
_REPLACED = (
    "its session was closed and replaced inside it ('db.session.remove()'?): what was"
    " done since on the new session is not part of it"
)

Ending = t.Literal["unit", "release"]


@dataclasses.dataclass(eq=False)
class _Frame:
    """One entry into a unit: the outermost, a join, or a savepoint."""

    session: orm.Session
    unit: _Unit
    name: str
    savepoint: orm.SessionTransaction | None = None
    entry: Transaction | None = None  # the object of a 'with' block


# The outermost unit entered in this context: tasks started inside it inherit it.
_INSIDE: contextvars.ContextVar[_Unit | None] = contextvars.ContextVar(
    "flask_wfsession.unit", default=None
)

# The frames of the 'with wfs.transaction()' blocks open in this thread or task,
# so that one Transaction object can serve several at once.
_WITH: contextvars.ContextVar[tuple[_Frame, ...]] = contextvars.ContextVar(
    "flask_wfsession.with", default=()
)


@dataclasses.dataclass(eq=False)
class _Unit:
    app: Flask
    name: str  # of the outermost entry
    site: str | None  # where it was entered
    session: orm.Session
    current: t.Callable[[], tuple[Flask, orm.Session]]  # the app context's session now
    owner: FrameType | None  # the Python frame running it: joins come from its call
    task: object | None  # the asyncio task running it, if any
    thread: int = dataclasses.field(default_factory=threading.get_ident)
    context: object = dataclasses.field(default_factory=lambda: _cv_app.get(None))
    outer: _Unit | None = None  # the unit _INSIDE named before this one
    started: float = dataclasses.field(default_factory=time.perf_counter)
    frames: list[_Frame] = dataclasses.field(default_factory=list)
    failed: str | None = None  # why it can no longer commit
    abandoned: bool = False  # still open when its app context ended
    before: list[str] = dataclasses.field(default_factory=list)  # writes from before it

    def describe(self) -> str:
        where = f" (entered at {self.site})" if self.site else ""
        return f"the unit of work {self.name!r}{where}"


@dataclasses.dataclass(eq=False)
class _Callback:
    fn: t.Callable[[], object]
    site: str | None
    unit: _Unit | None  # the unit open when it was registered
    savepoint: orm.SessionTransaction | None  # the innermost savepoint then


def unit_of(session: orm.Session) -> _Unit | None:
    """The unit of work open on ``session``, if any."""
    return t.cast("_Unit | None", session.info.get(UNIT))


@contextlib.contextmanager
def ending(session: orm.Session, kind: Ending) -> t.Iterator[None]:
    """Mark a commit or rollback of ``session`` in the block as the unit's own
    (``"unit"``) or as a release's end of a read-only transaction (``"release"``,
    after which an open unit and the waiting callbacks carry on)."""
    info = session.info
    outer = info.get(_ENDING)
    info[_ENDING] = kind
    try:
        yield
    finally:
        if outer is None:
            info.pop(_ENDING, None)
        else:
            info[_ENDING] = outer


def lost(session: orm.Session, reason: str) -> None:
    """The server rolled back ``session``'s transaction (its connection died):
    an open unit can no longer commit, and the waiting callbacks are dropped."""
    unit = unit_of(session)
    if unit is not None and unit.failed is None:
        unit.failed = f"its writes were lost: {reason}"
    _dropped(session.info.pop(_CALLBACKS, []), reason)


def on_commit(session: orm.Session, fn: t.Callable[[], object]) -> None:
    """Run ``fn`` after the next real commit of ``session`` (see the module's docstring)."""
    if not callable(fn):
        raise TypeError(
            f"'wfs.on_commit()' takes a function to call after the commit, not {fn!r}."
            " Wrap the call: 'wfs.on_commit(lambda: task.delay(id))'."
        )
    callback = _Callback(fn, user_frame(), unit_of(session), session.get_nested_transaction())
    session.info.setdefault(_CALLBACKS, []).append(callback)


def _run(callbacks: list[_Callback]) -> None:
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


def _sites(callbacks: list[_Callback]) -> str:
    return ", ".join(c.site or repr(c.fn) for c in callbacks)


def _dropped(callbacks: list[_Callback], why: str) -> None:
    """Log callbacks dropped because their transaction rolled back (expected: the
    rollback itself is what the app sees)."""
    if callbacks:
        _report.log().info(
            "Dropped %d 'on_commit' callbacks (registered at %s): %s.",
            len(callbacks),
            _sites(callbacks),
            why,
        )


def forget(session: orm.Session) -> list[_Callback]:
    """At the end of the session's app context: clear any unit still open (a
    generator left unfinished; logged) and return the callbacks that never ran."""
    unit: _Unit | None = session.info.pop(UNIT, None)
    if unit is not None:
        unit.abandoned = True
        unit.owner = None  # let the paused frame go
        _report.log().warning(
            "%s was still open when its app context ended: its transaction was"
            " rolled back with the context's session. Finish the generator (or the"
            " code) that entered it inside the context.",
            unit.describe()[0].upper() + unit.describe()[1:],
        )
    return t.cast("list[_Callback]", session.info.pop(_CALLBACKS, []))


def report_dropped(callbacks: list[_Callback], reason: str) -> None:
    """Log and warn that ``callbacks`` will never run."""
    _report.warn(
        f"Dropped {len(callbacks)} 'on_commit' callback{'s' if len(callbacks) > 1 else ''}"
        f" (registered at {_sites(callbacks)}): {reason}. They run only after a"
        " commit; commit the session (or end the unit of work) in this context.",
        DroppedCallbacksWarning,
        stacklevel=2,
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
    if session.info.get(_ENDING) is not None:
        return
    unit: _Unit = session.info[UNIT]
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
    unit = _INSIDE.get()
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


# -- The session's hooks (installed by _hooks) ---------------------------------


def before_commit(session: orm.Session) -> None:
    """Refuse a commit of the whole transaction, or of one of its savepoints,
    while a unit is open, unless the unit or a release ends it. The app's own
    savepoints (``begin_nested()``) may be released."""
    info = session.info
    unit: _Unit | None = info.get(UNIT)
    if unit is None:
        unit = _replaces(session)
        if unit is None:
            if _CALLBACKS in info and session.get_nested_transaction() is None and aborted(session):
                info[_ABORTED] = True  # the callbacks wait for a real commit
            return
        unit.failed = unit.failed or _REPLACED
    if info.get(_ENDING) is not None:
        return
    nested = session.get_nested_transaction()
    if nested is not None and not any(f.savepoint is nested for f in unit.frames):
        return
    site = user_frame()
    raise UnitOfWorkError(
        f"'session.commit()'{f' at {site}' if site else ''} inside {unit.describe()}:"
        " nothing was committed. A unit of work commits once, when its outermost"
        f" entry {unit.name!r} returns. Remove this commit; for work that must be"
        " committed on its own, run it outside the unit, or in 'with wfs.detached()"
        " as session:'."
    )


def after_commit(session: orm.Session) -> None:
    """Note a commit (the outermost one, or a savepoint's release) as it happens:
    the listeners after ours may still raise, leaving the transaction committed
    but not ended."""
    info = session.info
    nested = session.get_nested_transaction()
    if nested is None:
        if not info.pop(_ABORTED, False):
            info[_COMMITTED] = True
    elif UNIT in info or _CALLBACKS in info:
        info[_RELEASED] = nested


def has_committed(session: orm.Session) -> bool:
    """Whether the session's transaction committed (and a listener after the
    COMMIT raised, so it has not ended yet): nothing in it can be lost.

    Our ``after_commit`` listener notes it; one the app put before ours may
    have raised first, so SQLAlchemy's own state of the transaction is read
    too.
    """
    if session.info.get(_COMMITTED):
        return True
    transaction = session.get_transaction()
    return transaction is not None and transaction._state is _COMMITTED_STATE


def savepoint_ended(session: orm.Session, savepoint: orm.SessionTransaction) -> None:
    """A savepoint ended: unless it was released, drop the callbacks registered
    inside it (a rollback, or a flush that failed inside it and closed it)."""
    info = session.info
    if (UNIT not in info and _CALLBACKS not in info) or info.pop(_RELEASED, None) is savepoint:
        return
    callbacks: list[_Callback] | None = info.get(_CALLBACKS)
    if callbacks:
        info[_CALLBACKS] = [c for c in callbacks if not _inside(c.savepoint, savepoint)]


def _inside(savepoint: orm.SessionTransaction | None, outer: orm.SessionTransaction) -> bool:
    while savepoint is not None:
        if savepoint is outer:
            return True
        savepoint = savepoint.parent
    return False


def transaction_ended(session: orm.Session) -> None:
    """The session's outermost transaction ended: run or drop the waiting
    callbacks; if someone else ended an open unit's transaction, fail the unit
    and raise."""
    info = session.info
    committed = info.pop(_COMMITTED, False)
    info.pop(_ABORTED, None)  # a COMMIT that failed before it was sent
    if UNIT not in info and _CALLBACKS not in info:  # the usual case
        return
    kind = info.get(_ENDING)
    if kind is not None:  # the unit's end and a release handle this themselves
        return
    unit: _Unit | None = info.get(UNIT)
    callbacks: list[_Callback] = info.pop(_CALLBACKS, [])
    if unit is None:
        if committed:
            _run(callbacks)
        else:
            _dropped(callbacks, "the session rolled back")
        return
    site = user_frame()
    unit.failed = f"its transaction was ended{f' at {site}' if site else ''} from inside it"
    raise UnitOfWorkError(
        f"The session's transaction was rolled back or closed{f' at {site}' if site else ''}"
        f" inside {unit.describe()}. Its writes so far are undone, and it will not commit"
        " the rest. A unit of work ends once, when its outermost entry returns: to undo"
        " it, raise an exception out of it; to undo only a part that may fail, wrap that"
        " part in 'wfs.transaction(savepoint=True)'."
    )


# -- Entering and leaving ----------------------------------------------------------


class Transaction:
    """A unit of work; see :meth:`WFSession.transaction <flask_wfsession.WFSession.transaction>`.

    Usable as a decorator (on functions and ``async def`` functions) and as a
    context manager (``with`` and ``async with``).
    """

    def __init__(
        self,
        current: t.Callable[[], tuple[Flask, orm.Session]],
        *,
        savepoint: bool = False,
        name: str | None = None,
    ) -> None:
        self._current = current
        self.savepoint = savepoint
        self.name = name

    def __call__(self, func: t.Callable[P, R]) -> t.Callable[P, R]:
        if isinstance(func, (classmethod, staticmethod)):
            raise TypeError(
                f"'wfs.transaction' cannot wrap a {type(func).__name__} object: put"
                f" '@{type(func).__name__}' above '@wfs.transaction'."
            )
        inner = inspect.unwrap(func)  # under other decorators
        if inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
            raise TypeError(
                f"'wfs.transaction' cannot wrap the generator function {func.__qualname__!r}:"
                " its body runs item by item after the call has returned, outside the"
                " unit. Use 'with wfs.transaction():' inside it, around the work that"
                " must commit together."
            )
        name = self.name or func.__qualname__
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(inner):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> t.Any:
                frame = self._enter(name, sys._getframe())
                try:
                    result = await t.cast(t.Awaitable[t.Any], func(*args, **kwargs))
                except BaseException as error:
                    _exit(frame, error, self._current)
                    raise
                _exit(frame, None, self._current)
                return result

            return t.cast(t.Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            frame = self._enter(name, sys._getframe())
            try:
                result = func(*args, **kwargs)
                _check_ran(func, result)
            except BaseException as error:
                _exit(frame, error, self._current)
                raise
            _exit(frame, None, self._current)
            return result

        return wrapper

    def _enter(self, name: str, caller: FrameType, entry: Transaction | None = None) -> _Frame:
        """Open a unit, or join the open one; ``caller`` is the Python frame that
        runs the unit's code."""
        app, session = self._current()
        unit = unit_of(session)
        if unit is None:
            _check_outermost(session, name)
            replaced = _replaces(session)
            if replaced is not None:
                replaced.failed = replaced.failed or _REPLACED
                raise UnitOfWorkError(
                    f"The unit of work {name!r} was entered inside {replaced.describe()},"
                    " on a session that replaced that unit's own: it would commit on its"
                    " own. Neither will commit. Do not remove or close the session inside"
                    " a unit ('db.session.remove()')."
                )
            unit = _Unit(app, name, user_frame(), session, self._current, caller, _current_task())
            unit.outer = _INSIDE.get()
            _INSIDE.set(unit)
            for connection in connections(session):  # taken before the unit began
                began(session, connection)
            if session.in_transaction():  # rolled back with the unit, if it is: reported
                unit.before = describe_pending(session)
            frame = _Frame(session, unit, name, entry=entry)
            session.info[UNIT] = unit
        else:
            _check_join(unit, name)
            savepoint = session.begin_nested() if self.savepoint else None
            frame = _Frame(session, unit, name, savepoint, entry)
        unit.frames.append(frame)
        return frame

    def __enter__(self) -> orm.Session:
        return self._open(sys._getframe(1))

    def _open(self, caller: FrameType) -> orm.Session:
        frame = self._enter(self.name or "with wfs.transaction()", _user_code(caller), self)
        _WITH.set((*_WITH.get(), frame))
        return frame.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        open_here = _WITH.get()
        frame = next((f for f in reversed(open_here) if f.entry is self), None)
        if frame is None:
            raise UnitOfWorkError(
                f"'with wfs.transaction()' ({self.name or 'unnamed'}) exited in another"
                " thread or task than it was entered in, or twice. Enter and leave a unit"
                " of work in the same code."
            )
        _WITH.set(tuple(f for f in open_here if f is not frame))
        _exit(frame, exc, self._current)

    async def __aenter__(self) -> orm.Session:
        return self._open(sys._getframe(1))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _code(generator: t.Any) -> t.Any:
    return getattr(generator, "gi_code", None) or generator.ag_code


def _not_started(generator: t.Any) -> bool:
    if inspect.isgenerator(generator):
        return inspect.getgeneratorstate(generator) == inspect.GEN_CREATED
    return True  # an async generator: a plain function cannot have run it


def _check_outermost(session: orm.Session, name: str) -> None:
    """Refuse to open a unit inside the app's own ``session.begin()`` or
    ``begin_nested()`` block: the block ends the transaction, the unit would
    split it."""
    transaction = session.get_transaction()
    failed = _failed_inside(session) if transaction is not None else None
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


def _check_ran(func: t.Callable[..., object], result: object) -> None:
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


def _replaced_in(unit: _Unit, current: t.Callable[[], tuple[Flask, orm.Session]]) -> bool:
    """Whether the app context's session is no longer the one the unit opened on."""
    try:
        return current()[1] is not unit.session
    except NoAppContextError:
        return False


def _replaces(session: orm.Session) -> _Unit | None:
    """The unit open in this app context on another session that ``session``,
    now the context's own, has replaced (``db.session.remove()`` inside the unit)."""
    unit = _INSIDE.get()
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


def _user_code(frame: FrameType) -> FrameType:
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


def _current_task() -> object | None:
    asyncio = sys.modules.get("asyncio")  # not imported: no task
    if asyncio is None:
        return None
    try:
        task: object | None = asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
    return task


def _check_join(unit: _Unit, name: str) -> None:
    """Refuse a join from code that does not run inside the unit's own call
    (nor in an asyncio task started inside it: ``asyncio.wait_for``, ``shield``)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame is unit.owner:
            return
        frame = frame.f_back
    if _INSIDE.get() is unit and (
        threading.get_ident() != unit.thread or _current_task() is not unit.task
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


def _exit(
    frame: _Frame,
    error: BaseException | None,
    current: t.Callable[[], tuple[Flask, orm.Session]],
) -> None:
    session, unit = frame.session, frame.unit
    if unit.abandoned:  # its app context ended first (and said so)
        if error is None:
            raise UnitOfWorkError(
                f"T{unit.describe()[1:]} ended after its app context: its transaction"
                " was rolled back with the context's session, nothing was committed."
            )
        return
    if unit_of(session) is not unit or not unit.frames or unit.frames[-1] is not frame:
        if frame in unit.frames:
            unit.frames.remove(frame)
        unit.failed = unit.failed or f"the unit of work {frame.name!r} ended out of order"
        raise UnitOfWorkError(
            f"Units of work ended out of order: {frame.name!r} ended while a unit"
            f" entered after it was still open, in {unit.describe()}, which can no"
            " longer commit. Units must nest: leave them in the reverse order of"
            " entering them ('with' blocks do)."
        )
    unit.frames.pop()
    if not unit.frames and unit.failed is None and _replaced_in(unit, current):
        unit.failed = _REPLACED
    if unit.frames:  # joined the outer unit
        if frame.savepoint is not None:
            _end_savepoint(frame, error)
        elif error is not None and unit.failed is None:
            unit.failed = f"the unit of work {frame.name!r} inside it raised {error!r}"
        return
    _end(session, unit, error)


def _end_savepoint(frame: _Frame, error: BaseException | None) -> None:
    savepoint = t.cast(orm.SessionTransaction, frame.savepoint)
    unit = frame.unit
    if savepoint._transaction_is_closed():  # ended by code inside it
        if unit.failed is None:
            unit.failed = f"its savepoint {frame.name!r} was ended inside it"
        return
    with ending(frame.session, "unit"):
        if error is None and savepoint.is_active:
            try:
                savepoint.commit()  # flushes what is still pending: may fail
            except BaseException:
                if not savepoint._transaction_is_closed():
                    savepoint.rollback()  # only this part is undone; the error goes on
                raise
            return
        # An error, or a statement inside failed (a flush leaves the savepoint
        # inactive): only this part is undone, and the unit can go on.
        savepoint.rollback()
    if error is None:
        raise UnitOfWorkError(
            f"A statement inside the savepoint {frame.name!r} failed, and its error was"
            " caught inside it: that part was rolled back. Let the error leave the"
            " 'wfs.transaction(savepoint=True)' block, and catch it outside."
        )


def _failed_inside(session: orm.Session) -> str | None:
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


def _wrote(session: orm.Session) -> bool:
    """Whether the session's transaction needs a commit: it sent more than
    ``SELECT`` statements (a ``NOTIFY``, DDL and statements that only lock rows
    need their ``COMMIT`` too), or the database says its ``SELECT`` statements
    wrote or locked rows, or cannot say."""
    if has_unflushed(session):
        return True
    if not session.in_transaction():
        return False
    if session.info.get(SENT):
        return True
    try:
        return invalidated(session) or session_touched(session, locks=True)
    except sa.exc.DBAPIError:
        return True  # the commit will fail and roll back


def _end(session: orm.Session, unit: _Unit, error: BaseException | None) -> None:
    """End the outermost unit: commit it (if it wrote) or roll it back, then run
    or drop the callbacks and send the signal."""
    committed: bool | None = None  # True: COMMIT sent; False: nothing to commit
    try:
        with ending(session, "unit"):
            if error is None and unit.failed is None:
                unit.failed = _failed_inside(session)
            if error is None and unit.failed is None:
                committed = _wrote(session)
                if committed:
                    session.commit()
            else:
                session.rollback()
    except BaseException:
        if committed and has_committed(session):
            pass  # the COMMIT went through; a listener after it raised (re-raised)
        else:
            committed = None
            with ending(session, "unit"):
                if session.in_transaction():
                    session.rollback()
        raise
    finally:
        if session.info.get(UNIT) is unit:
            del session.info[UNIT]
        if _INSIDE.get() is unit:
            _INSIDE.set(unit.outer)
        unit.owner = unit.outer = None  # no frame or unit kept alive by this one
        try:
            if committed is None and unit.before:
                report_discarded(
                    unit.app,
                    session,
                    unit.before,
                    f"{unit.describe()} rolled back; these writes were made before it began",
                    reraise=False,
                )
        finally:
            _after(session, unit, committed)
    if error is None and unit.failed is not None:
        raise UnitOfWorkError(
            f"T{unit.describe()[1:]} was rolled back, not committed: {unit.failed}."
            " When part of a unit fails, the whole unit is"
            " undone; wrap a part that may fail in 'wfs.transaction(savepoint=True)'"
            " to undo only that part."
        )


def _after(session: orm.Session, unit: _Unit, committed: bool | None) -> None:
    """Run the due callbacks, then send the unit's signal (our state is final)."""
    info = session.info
    waiting: list[_Callback] = info.pop(_CALLBACKS, [])
    if committed is None:
        due = []
        _dropped(waiting, f"{unit.describe()} rolled back")
    elif committed:
        due = waiting
    else:  # nothing to commit: the unit's own callbacks run, earlier ones wait
        due = [c for c in waiting if c.unit is unit]
        if len(due) < len(waiting):
            info[_CALLBACKS] = [c for c in waiting if c.unit is not unit]
    duration = time.perf_counter() - unit.started
    try:
        _run(due)
    finally:
        signal = signals.unit_rolled_back if committed is None else signals.unit_committed
        _report.send(signal, unit.app, reraise=False, name=unit.name, duration=duration)
