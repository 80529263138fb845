"""Ending sessions' transactions so their connections go back to the pool.

For each session with an open transaction, the database is asked whether the
transaction wrote or locked rows (``_database``), and the session lists its
unflushed changes. Then, by policy:

==============================  =========  =======  ========  ==========
the transaction                 ``hold``   raise    commit    rollback
==============================  =========  =======  ========  ==========
read only, nothing unflushed    released   released released  released
read only, changes unflushed    released*  raises   commits   rolls back
wrote or locked rows            held       raises   commits   rolls back
==============================  =========  =======  ========  ==========

\\* the changes stay in the session, in memory, and are flushed after the
step as they would have been. *Held* means the session keeps its transaction
and connection through the step, exactly as without the extension, and this
is reported. A session inside an open ``session.begin()`` block or
savepoint is never ended (held, or raises under ``"raise"``); one inside a
unit of work (``wfs.transaction``) or a ``wfs.detached()`` block is never
committed or rolled back (``"commit"`` and ``"rollback"`` hold it), so no
block is split. A read-only one is released like any other, and the unit
carries on after the step in a new transaction.

Every session is planned before any is touched, so a refusal changes
nothing. Reports go out last, after the sessions are in their final state.
"""

from __future__ import annotations

import dataclasses
import functools
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _report, _transaction, _unit, signals
from ._database import SENT, invalidated, session_touched
from ._errors import HeldConnectionWarning, PendingChangesError
from ._pending import SENT_WRITES, report_discarded, unflushed
from ._settings import Pending
from ._telemetry import held

if t.TYPE_CHECKING:
    from flask import Flask

DETACHED_BLOCK = "flask_wfsession.detached_block"  # Session.info: inside 'wfs.detached()'
_HELD_REPORTED = "flask_wfsession.held_reported"  # Session.info: steps already reported

Action = t.Literal["release", "hold", "raise", "commit", "rollback", "lost"]


@dataclasses.dataclass
class _Plan:
    session: orm.Session
    changes: list[str]  # unflushed, then what the database reports
    block: str | None  # the open block that must not be split
    unit: bool = False  # the block is a unit of work
    dead: bool = False  # the connection died; the server rolled back
    action: Action = "release"


def _plan(session: orm.Session, policy: Pending) -> _Plan:
    plan = _Plan(session, unflushed(session), None)
    tx = session.get_transaction()
    explicit = tx is not None and (
        tx.origin is not orm.SessionTransactionOrigin.AUTOBEGIN or session.in_nested_transaction()
    )
    unit = _unit.unit_of(session)
    if unit is not None:
        plan.block, plan.unit = unit.describe(), True
    elif explicit:
        plan.block = "an open 'session.begin()' or 'session.begin_nested()' block"
    elif session.info.get(DETACHED_BLOCK):
        plan.block = "an open 'wfs.detached()' block"
    if explicit:  # the transaction itself cannot end
        plan.action = "raise" if policy == "raise" else "hold"
        return plan
    try:
        dead = invalidated(session)
        touched = not dead and session_touched(session, locks=True)
    except sa.exc.DBAPIError as error:
        if not error.connection_invalidated:
            raise
        dead = True
    if dead:
        plan.dead = True
        plan.action = "lost" if session.info.get(SENT) else "release"
        return plan
    if touched:
        session.info[SENT] = True  # the teardown will ask again, and report
        plan.changes.append(SENT_WRITES)
    if not plan.changes:
        plan.action = "release"
    elif policy == "raise":
        plan.action = "raise"
    elif policy == "hold" or plan.block is not None:
        plan.action = "hold" if touched else "release"
    else:
        plan.action = policy
    return plan


def _commit_keep_loaded(session: orm.Session) -> None:
    expire = session.expire_on_commit
    session.expire_on_commit = False
    try:
        session.commit()
    finally:
        session.expire_on_commit = expire


def _end_keeping_unflushed(session: orm.Session, end: t.Callable[[], None], expire: bool) -> None:
    """Run ``end`` (a commit of a read-only transaction, or a rollback of a dead one)
    while the session's unflushed changes wait outside it, then put them back.

    SQLAlchemy keeps an object's attribute history on the object, so a changed
    object taken out and added back is still changed, and the final flush
    writes exactly what it would have. New objects keep their insert order.
    """
    new = sorted(session.new, key=lambda o: sa.inspect(o).insert_order or 0)
    dirty, deleted = list(session.dirty), list(session.deleted)
    carried = [*new, *dirty, *deleted]
    if not carried:
        end()
        if expire:
            session.expire_all()
        return
    order = {id(o): sa.inspect(o).insert_order for o in new}
    carried_ids = {id(o) for o in carried}
    before = list(session.identity_map.values())
    for obj in carried:
        if sa.inspect(obj).session is session:  # not already taken out by a cascade
            session.expunge(obj)
    # Clean objects an expunge cascade took along come back unchanged.
    cascaded = [o for o in before if sa.inspect(o).session is None and id(o) not in carried_ids]
    end()
    session.add_all(cascaded)
    if expire:
        session.expire_all()
    session.add_all(dirty + new + deleted)
    for obj in deleted:
        session.delete(obj)
    for obj in new:
        sa.inspect(obj).insert_order = order[id(obj)]


def _problem(plan: _Plan) -> str:
    """Why ``plan``'s session may not be released, for the refusal."""
    changes = "; ".join(plan.changes)
    if plan.unit:
        return (
            f"{plan.block} is open and has written, and ending its transaction would split"
            f" it ({changes or 'a savepoint is open'})"
        )
    if plan.block and plan.block.startswith("an open 'session.begin"):
        return f"{plan.block} is open, and ending its transaction would split it"
    return f"uncommitted writes are pending ({changes})"


def _refusal(what: str, plans: list[_Plan]) -> PendingChangesError:
    problems = [_problem(p) for p in plans]
    if any(p.unit for p in plans):
        first = (
            "Keep slow steps outside units of work: end the unit before the step, and"
            " write the step's result in a new unit after it"
        )
    elif any(p.block for p in plans):
        first = "End the block before the step starts"
    else:
        first = "Commit first ('session.commit()')"
    return PendingChangesError(
        f"Cannot release the database connection before {what}: {'; '.join(problems)}."
        f" {first}, or choose what happens with 'pending=\"hold\"' (keep the connection"
        " through the step), 'pending=\"commit\"' or 'pending=\"rollback\"' (per step, or"
        " 'WFSESSION_PENDING' for the app)."
    )


def release_sessions(
    app: Flask,
    sessions: t.Iterable[orm.Session],
    *,
    policy: Pending,
    expire: bool,
    step: str | None,
    what: str,
    where: t.Callable[[], str | None],
) -> list[orm.Session]:
    """End the transactions of ``sessions`` (each in one) by ``policy``; return those released.

    :param step: the step's name, sent with the signals.
    :param what: the step, for messages: ``"the long-running step 'llm'"``.
    :param where: returns where the step was entered (``file:line``), for
        reports; called only when there is something to report.
    :raise PendingChangesError: under ``"raise"``, pending writes or an open
        ``session.begin()`` block; under any policy, writes sent on a
        connection that died.
    """
    plans = [_plan(s, policy) for s in sessions]
    refused = [p for p in plans if p.action == "raise"]
    if refused:
        raise _refusal(what, refused)
    released = []
    for plan in plans:
        session = plan.session
        if plan.action == "release":
            end = session.rollback if plan.dead else functools.partial(_commit_keep_loaded, session)
            with _unit.ending(session, "release"):  # an open unit carries on
                _end_keeping_unflushed(session, end, expire)
        elif plan.action == "commit":
            _commit_keep_loaded(session)
        elif plan.action == "rollback":
            session.rollback()
        elif plan.action == "lost":
            with _unit.ending(session, "release"):
                session.rollback()
            _transaction.lost(session, f"the connection died before {what}")
        if plan.action != "hold":
            released.append(session)
            if expire and plan.action != "release":
                session.expire_all()
    _report_plans(app, plans, step, what, where)
    lost = [p for p in plans if p.action == "lost"]
    if lost:
        raise PendingChangesError(
            f"The database connection died before {what}, and the server rolled back"
            " writes this session had already sent in its transaction. They are lost;"
            " the step did not run. Redo the unit of work. ('pool_pre_ping=True' in the"
            " engine options finds such connections before they are used.)"
        )
    return released


_ACTIONS = {
    "release": "released",
    "commit": "committed",
    "rollback": "rolled-back",
    "lost": "rolled-back",
    "hold": "held",
}


def _report_plans(
    app: Flask,
    plans: list[_Plan],
    step: str | None,
    what: str,
    where: t.Callable[[], str | None],
) -> None:
    """Send each plan's signal and reports; re-raise a receiver's error at the end."""
    error: BaseException | None = None
    for plan in plans:
        try:
            _report_plan(app, plan, step, what, where)
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def _report_plan(
    app: Flask, plan: _Plan, step: str | None, what: str, where: t.Callable[[], str | None]
) -> None:
    session = plan.session
    _report.send(
        signals.session_released,
        app,
        reraise=True,
        session=session,
        step=step,
        action=_ACTIONS[plan.action],
    )
    if plan.action == "rollback":
        report_discarded(app, session, plan.changes, f"released for {what}", reraise=True)
    elif plan.action == "lost":
        changes = [*plan.changes, "writes sent in the transaction"]
        report_discarded(app, session, changes, f"connection lost before {what}", reraise=True)
    elif plan.action == "hold":
        held(session.info, step or what)
        reported: set[str] = session.info.setdefault(_HELD_REPORTED, set())
        if what in reported:
            return
        reported.add(what)
        site = where()
        _report.warn(
            f"Held a database connection through {what}"
            f"{f' (entered at {site})' if site else ''}: the session has"
            f" {'; '.join(plan.changes) or 'nothing pending'}"
            f"{f', inside {plan.block}' if plan.block else ''}. Ending its transaction"
            " would commit or drop them, so it keeps its connection for the whole step."
            + (
                " Keep slow steps outside units of work: end the unit before the step."
                if plan.unit
                else " Commit before the step to free the connection."
            ),
            HeldConnectionWarning,
            stacklevel=4,
        )
