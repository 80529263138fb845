"""Ending sessions' transactions so their connections go back to the pool.

Releasing keeps every loaded object attached and readable: a read-only
transaction is ended by a commit with ``expire_on_commit`` switched off for
that one call (a rollback would expire everything and make the next attribute
access query again). Pending writes are handled by the policy, all sessions
checked before any is touched, so a refusal changes nothing.
"""

from __future__ import annotations

import typing as t

import sqlalchemy.orm as orm

from . import signals
from ._errors import PendingChangesError
from ._pending import describe_pending, report_discarded

if t.TYPE_CHECKING:
    from flask import Flask

Pending = t.Literal["raise", "commit", "rollback"]
PENDING_POLICIES: tuple[Pending, ...] = ("raise", "commit", "rollback")


def _commit_keep_loaded(session: orm.Session) -> None:
    expire = session.expire_on_commit
    session.expire_on_commit = False
    try:
        session.commit()
    finally:
        session.expire_on_commit = expire


def _refuse(what: str, problem: str, advice: str) -> t.NoReturn:
    raise PendingChangesError(
        f"Cannot release the database connection before {what}: {problem} {advice}"
    )


def release_sessions(
    app: Flask,
    sessions: t.Iterable[orm.Session],
    *,
    policy: Pending,
    expire: bool,
    step: str | None,
) -> list[orm.Session]:
    """End the transactions of ``sessions``; return those that were released.

    :raise PendingChangesError: a session is inside an explicit
        ``session.begin()`` block, or has pending writes under ``"raise"``.
    """
    what = f"the long-running step {step!r}" if step else "'release()'"
    plan = [(s, describe_pending(s)) for s in sessions]
    for session, _ in plan:
        tx = session.get_transaction()
        explicit = tx is not None and tx.origin is not orm.SessionTransactionOrigin.AUTOBEGIN
        if explicit or session.in_nested_transaction():
            _refuse(
                what,
                "a 'session.begin()' or 'session.begin_nested()' block is still open,"
                " and ending its transaction would break it.",
                "Start the slow step after the block ends, or before it begins.",
            )
    if policy == "raise":
        pending = [change for _, changes in plan for change in changes]
        if pending:
            _refuse(
                what,
                f"uncommitted writes are pending ({'; '.join(pending)}).",
                "Commit first ('session.commit()'), or choose what happens to them with"
                " 'pending=\"commit\"' or 'pending=\"rollback\"' (per step, or"
                " 'WFSESSION_PENDING' for the app).",
            )
    released = []
    for session, changes in plan:
        if session.get_transaction() is None and not changes:
            continue
        if changes and policy == "rollback":
            session.rollback()
            report_discarded(app, session, changes, reason=f"released for {what}")
            action = "rolled-back"
        else:
            _commit_keep_loaded(session)
            action = "committed" if changes else "released"
        if expire:
            session.expire_all()
        released.append(session)
        signals.session_released.send(app, session=session, step=step, action=action)
    return released
