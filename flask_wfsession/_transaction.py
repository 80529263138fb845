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
  flushed or sent (:func:`before_commit`);
* a rollback or close by anyone but the unit has undone the unit's work: the
  unit is marked failed, so it can no longer commit the rest, and the caller
  gets the error at once (:func:`transaction_ended`);
* a release before a long-running step (``_release``) asks :func:`unit_of`,
  and never commits or rolls back a unit that wrote: it holds it, or raises.

``on_commit`` callbacks wait on the session for its next real commit: the
outermost unit's, or, outside units, the app's own ``session.commit()``. A
release ending a read-only transaction before a step is not one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
import typing as t
from types import TracebackType

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _report, signals
from ._callsite import user_frame
from ._database import invalidated, session_touched
from ._errors import DroppedCallbacksWarning, UnitOfWorkError
from ._pending import has_unflushed

if t.TYPE_CHECKING:
    from flask import Flask

P = t.ParamSpec("P")
R = t.TypeVar("R")

UNIT = "flask_wfsession.unit"  # Session.info: the open unit of work
_ENDING = "flask_wfsession.ending"  # Session.info: the unit or a release is ending the transaction
_CALLBACKS = "flask_wfsession.on_commit"  # Session.info: callbacks waiting for a commit
_COMMITTED = "flask_wfsession.committed"  # Session.info: the ending transaction committed

Ending = t.Literal["unit", "release"]


@dataclasses.dataclass(eq=False)
class _Frame:
    """One entry into a unit: the outermost, a join, or a savepoint."""

    session: orm.Session
    unit: _Unit
    name: str
    savepoint: orm.SessionTransaction | None = None


@dataclasses.dataclass(eq=False)
class _Unit:
    app: Flask
    name: str  # of the outermost entry
    site: str | None  # where it was entered
    started: float = dataclasses.field(default_factory=time.perf_counter)
    frames: list[_Frame] = dataclasses.field(default_factory=list)
    failed: str | None = None  # why it can no longer commit

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
    """Call each callback; one that raises is logged and the others still run."""
    for callback in callbacks:
        try:
            callback.fn()
        except Exception:
            _report.log().exception(
                "An 'on_commit' callback%s raised. The commit stands; the other callbacks ran.",
                f" registered at {callback.site}" if callback.site else "",
            )


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
    generator left unfinished) and return the callbacks that never ran."""
    session.info.pop(UNIT, None)
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


# -- The session's hooks (installed by _hooks) ---------------------------------


def before_commit(session: orm.Session) -> None:
    """Refuse a commit of the whole transaction while a unit is open, unless the
    unit or a release ends it. Savepoints (``begin_nested()``) may be released."""
    info = session.info
    unit = info.get(UNIT)
    if unit is None or info.get(_ENDING) is not None or session.in_nested_transaction():
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
    if _CALLBACKS in session.info and not session.in_nested_transaction():
        session.info[_COMMITTED] = True


def after_soft_rollback(session: orm.Session, previous: orm.SessionTransaction) -> None:
    """A savepoint rolled back: drop the callbacks registered inside it."""
    callbacks: list[_Callback] | None = session.info.get(_CALLBACKS)
    if previous.nested and callbacks:
        session.info[_CALLBACKS] = [c for c in callbacks if not _inside(c.savepoint, previous)]


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
    if UNIT not in info and _CALLBACKS not in info:  # the usual case
        return
    committed = info.pop(_COMMITTED, False)
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
        self._active: list[_Frame] = []

    def __call__(self, func: t.Callable[P, R]) -> t.Callable[P, R]:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"'wfs.transaction' cannot wrap the generator function {func.__qualname__!r}:"
                " its body runs item by item after the call has returned, outside the"
                " unit. Use 'with wfs.transaction():' inside it, around the work that"
                " must commit together."
            )
        name = self.name or func.__qualname__
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> t.Any:
                frame = self._enter(name)
                try:
                    result = await func(*args, **kwargs)
                except BaseException as error:
                    _exit(frame, error)
                    raise
                _exit(frame, None)
                return result

            return t.cast(t.Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            frame = self._enter(name)
            try:
                result = func(*args, **kwargs)
            except BaseException as error:
                _exit(frame, error)
                raise
            _exit(frame, None)
            return result

        return wrapper

    def _enter(self, name: str) -> _Frame:
        app, session = self._current()
        unit = unit_of(session)
        if unit is None:
            unit = _Unit(app, name, user_frame())
            frame = _Frame(session, unit, name)
            session.info[UNIT] = unit
        elif self.savepoint:
            _start_sqlite_transaction(session)
            frame = _Frame(session, unit, name, session.begin_nested())
        else:
            frame = _Frame(session, unit, name)
        unit.frames.append(frame)
        return frame

    def __enter__(self) -> orm.Session:
        frame = self._enter(self.name or "with wfs.transaction()")
        self._active.append(frame)
        return frame.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit(self._active.pop(), exc)

    async def __aenter__(self) -> orm.Session:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _start_sqlite_transaction(session: orm.Session) -> None:
    """Begin the transaction on SQLite before a first SAVEPOINT.

    Python's ``sqlite3`` (legacy transaction control, the default) sends
    ``BEGIN`` only before a write. A SAVEPOINT sent first starts the
    transaction itself, and releasing it then commits, so the unit around it
    could no longer roll that part back.
    """
    try:
        if session.get_bind().dialect.name != "sqlite":
            return
    except sa.exc.UnboundExecutionError:
        return
    connection = session.connection()
    driver = connection.connection.dbapi_connection
    if driver is None or getattr(driver, "in_transaction", True):
        return
    if getattr(driver, "isolation_level", None) is not None:  # None: the app's autocommit
        connection.exec_driver_sql("BEGIN")


def _exit(frame: _Frame, error: BaseException | None) -> None:
    session, unit = frame.session, frame.unit
    if unit_of(session) is not unit or not unit.frames or unit.frames[-1] is not frame:
        if frame in unit.frames:
            unit.frames.remove(frame)
        unit.failed = unit.failed or f"the unit of work {frame.name!r} ended out of order"
        raise UnitOfWorkError(
            f"Units of work ended out of order: {frame.name!r} ended while a unit"
            f" entered after it was still open, in {unit.describe()}, which can no"
            " longer commit. Units of one app context must nest: two"
            " tasks sharing a context (an 'asyncio.gather' in one view) cannot each run"
            " a unit. Give each its own app context ('wfs.spawn', 'wfs.submit') or run"
            " them one after the other."
        )
    unit.frames.pop()
    if unit.frames:  # joined the outer unit
        if frame.savepoint is not None:
            _end_savepoint(frame, error)
        elif error is not None and unit.failed is None:
            unit.failed = f"the unit of work {frame.name!r} inside it raised {error!r}"
        return
    _end(session, unit, error)


def _end_savepoint(frame: _Frame, error: BaseException | None) -> None:
    savepoint = t.cast(orm.SessionTransaction, frame.savepoint)
    if savepoint._transaction_is_closed():  # ended inside, by a commit or rollback that raised
        return
    if error is None and savepoint.is_active:
        savepoint.commit()
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


def _wrote(session: orm.Session) -> bool:
    """Whether the session's transaction needs a commit: the database says it wrote
    or locked rows, or cannot say."""
    if has_unflushed(session):
        return True
    if not session.in_transaction():
        return False
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
                committed = _wrote(session)
                if committed:
                    session.commit()
            else:
                session.rollback()
    except BaseException:
        committed = None
        with ending(session, "unit"):
            if session.in_transaction():
                session.rollback()
        raise
    finally:
        if session.info.get(UNIT) is unit:
            del session.info[UNIT]
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
    info.pop(_COMMITTED, None)
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
