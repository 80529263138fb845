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
* a savepoint that ends without being released takes the ``on_commit``
  callbacks registered inside it along (:mod:`~flask_wfsession._callbacks`);
* a release before a long-running step (``_release``) asks ``unit_of``,
  and never commits or rolls back a unit that wrote: it holds it, or raises.

The unit's state is in :mod:`~flask_wfsession._unit`; what a unit refuses on
entry, and the COMMITs it stops below the session, in
:mod:`~flask_wfsession._unit_checks`.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import typing as t
from types import FrameType, TracebackType

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask
from sqlalchemy.orm.session import SessionTransactionState

from . import _report, signals
from ._callbacks import log_dropped, run_callbacks
from ._callsite import user_frame
from ._database import SENT, aborted, connections, invalidated, session_touched
from ._errors import UnitOfWorkError
from ._pending import describe_pending, has_unflushed, report_discarded
from ._unit import (
    ABORTED,
    CALLBACKS,
    COMMITTED,
    ENDING,
    INSIDE,
    RELEASED,
    UNIT,
    WITH,
    Callback,
    Frame,
    Unit,
    ending,
    unit_of,
)
from ._unit_checks import (
    REPLACED,
    began,
    check_join,
    check_outermost,
    check_ran,
    current_task,
    failed_inside,
    replaced_in,
    replaces,
    user_code,
)

P = t.ParamSpec("P")
R = t.TypeVar("R")

_COMMITTED_STATE = SessionTransactionState.COMMITTED


def lost(session: orm.Session, reason: str) -> None:
    """The server rolled back ``session``'s transaction (its connection died):
    an open unit can no longer commit, and the waiting callbacks are dropped."""
    unit = unit_of(session)
    if unit is not None and unit.failed is None:
        unit.failed = f"its writes were lost: {reason}"
    log_dropped(session.info.pop(CALLBACKS, []), reason)


def forget(session: orm.Session) -> list[Callback]:
    """At the end of the session's app context: clear any unit still open (a
    generator left unfinished; logged) and return the callbacks that never ran."""
    unit: Unit | None = session.info.pop(UNIT, None)
    if unit is not None:
        unit.abandoned = True
        unit.owner = None  # let the paused frame go
        _report.log().warning(
            "%s was still open when its app context ended: its transaction was"
            " rolled back with the context's session. Finish the generator (or the"
            " code) that entered it inside the context.",
            unit.describe()[0].upper() + unit.describe()[1:],
        )
    return t.cast("list[Callback]", session.info.pop(CALLBACKS, []))


# -- The session's hooks (installed by _hooks) ---------------------------------


def before_commit(session: orm.Session) -> None:
    """Refuse a commit of the whole transaction, or of one of its savepoints,
    while a unit is open, unless the unit or a release ends it. The app's own
    savepoints (``begin_nested()``) may be released."""
    info = session.info
    unit: Unit | None = info.get(UNIT)
    if unit is None:
        unit = replaces(session)
        if unit is None:
            if CALLBACKS in info and session.get_nested_transaction() is None and aborted(session):
                info[ABORTED] = True  # the callbacks wait for a real commit
            return
        unit.failed = unit.failed or REPLACED
    if info.get(ENDING) is not None:
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
        if not info.pop(ABORTED, False):
            info[COMMITTED] = True
    elif UNIT in info or CALLBACKS in info:
        info[RELEASED] = nested


def has_committed(session: orm.Session) -> bool:
    """Whether the session's transaction committed (and a listener after the
    COMMIT raised, so it has not ended yet): nothing in it can be lost.

    Our ``after_commit`` listener notes it; one the app put before ours may
    have raised first, so SQLAlchemy's own state of the transaction is read
    too.
    """
    if session.info.get(COMMITTED):
        return True
    transaction = session.get_transaction()
    return transaction is not None and transaction._state is _COMMITTED_STATE


def transaction_ended(session: orm.Session) -> None:
    """The session's outermost transaction ended: run or drop the waiting
    callbacks; if someone else ended an open unit's transaction, fail the unit
    and raise."""
    info = session.info
    committed = info.pop(COMMITTED, False)
    info.pop(ABORTED, None)  # a COMMIT that failed before it was sent
    if UNIT not in info and CALLBACKS not in info:  # the usual case
        return
    kind = info.get(ENDING)
    if kind is not None:  # the unit's end and a release handle this themselves
        return
    unit: Unit | None = info.get(UNIT)
    callbacks: list[Callback] = info.pop(CALLBACKS, [])
    if unit is None:
        if committed:
            run_callbacks(callbacks)
        else:
            log_dropped(callbacks, "the session rolled back")
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
                    _exit(frame, error)
                    raise
                _exit(frame, None)
                return result

            return t.cast(t.Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            frame = self._enter(name, sys._getframe())
            try:
                result = func(*args, **kwargs)
                check_ran(func, result)
            except BaseException as error:
                _exit(frame, error)
                raise
            _exit(frame, None)
            return result

        return wrapper

    def _enter(self, name: str, caller: FrameType) -> Frame:
        """Open a unit, or join the open one; ``caller`` is the Python frame that
        runs the unit's code."""
        app, session = self._current()
        unit = unit_of(session)
        if unit is None:
            check_outermost(session, name)
            replaced = replaces(session)
            if replaced is not None:
                replaced.failed = replaced.failed or REPLACED
                raise UnitOfWorkError(
                    f"The unit of work {name!r} was entered inside {replaced.describe()},"
                    " on a session that replaced that unit's own: it would commit on its"
                    " own. Neither will commit. Do not remove or close the session inside"
                    " a unit ('db.session.remove()')."
                )
            unit = Unit(app, name, user_frame(), session, self._current, caller, current_task())
            unit.outer = INSIDE.get()
            INSIDE.set(unit)
            for connection in connections(session):  # taken before the unit began
                began(session, connection)
            if session.in_transaction():  # rolled back with the unit, if it is: reported
                unit.before = describe_pending(session)
            frame = Frame(unit, name)
            session.info[UNIT] = unit
        else:
            check_join(unit, name)
            savepoint = session.begin_nested() if self.savepoint else None
            frame = Frame(unit, name, savepoint)
        unit.frames.append(frame)
        return frame

    def __enter__(self) -> orm.Session:
        return self._open(sys._getframe(1))

    def _open(self, caller: FrameType) -> orm.Session:
        frame = self._enter(self.name or "with wfs.transaction()", user_code(caller))
        WITH.push(self, frame)
        return frame.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = WITH.pop(self)
        if frame is None:
            raise UnitOfWorkError(
                f"'with wfs.transaction()' ({self.name or 'unnamed'}) exited in another"
                " thread or task than it was entered in, or twice. Enter and leave a unit"
                " of work in the same code."
            )
        _exit(frame, exc)

    async def __aenter__(self) -> orm.Session:
        return self._open(sys._getframe(1))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _exit(frame: Frame, error: BaseException | None) -> None:
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
    if not unit.frames and unit.failed is None and replaced_in(unit):
        unit.failed = REPLACED
    if unit.frames:  # joined the outer unit
        if frame.savepoint is not None:
            _end_savepoint(frame, error)
        elif error is not None and unit.failed is None:
            unit.failed = f"the unit of work {frame.name!r} inside it raised {error!r}"
        return
    _end(session, unit, error)


def _end_savepoint(frame: Frame, error: BaseException | None) -> None:
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


def _end(session: orm.Session, unit: Unit, error: BaseException | None) -> None:
    """End the outermost unit: commit it (if it wrote) or roll it back, then run
    or drop the callbacks and send the signal."""
    committed: bool | None = None  # True: COMMIT sent; False: nothing to commit
    try:
        with ending(session, "unit"):
            if error is None and unit.failed is None:
                unit.failed = failed_inside(session)
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
        if INSIDE.get() is unit:
            INSIDE.set(unit.outer)
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


def _after(session: orm.Session, unit: Unit, committed: bool | None) -> None:
    """Run the due callbacks, then send the unit's signal (our state is final)."""
    info = session.info
    waiting: list[Callback] = info.pop(CALLBACKS, [])
    if committed is None:
        due = []
        log_dropped(waiting, f"{unit.describe()} rolled back")
    elif committed:
        due = waiting
    else:  # nothing to commit: the unit's own callbacks run, earlier ones wait
        due = [c for c in waiting if c.unit is unit]
        if len(due) < len(waiting):
            info[CALLBACKS] = [c for c in waiting if c.unit is not unit]
    duration = time.perf_counter() - unit.started
    try:
        run_callbacks(due)
    finally:
        signal = signals.unit_rolled_back if committed is None else signals.unit_committed
        _report.send(signal, unit.app, reraise=False, name=unit.name, duration=duration)
