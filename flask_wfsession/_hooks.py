"""Every listener the extension puts on sessions, installed in one call.

* Before a statement, a flush, a bulk operation or a commit, and when a
  transaction takes a connection: the checks of :mod:`~flask_wfsession._guard`.
* When a transaction takes a connection: the session is entered in
  :mod:`~flask_wfsession._registry` and the connection noted, so a release
  can ask the database about it (:mod:`~flask_wfsession._database`).
* What the session itself sent that may have written or locked rows is
  noted cheaply (one ``isinstance`` per statement); it is used only where the
  database cannot answer: a dead connection, row locks on MariaDB.
* When the outermost transaction ends, all of it is forgotten.
* Commits and ends of transactions and savepoints: the units of work and
  ``on_commit`` callbacks of :mod:`~flask_wfsession._transaction`.

Used for this package's :class:`~flask_wfsession.Session` and for an adopted
Flask-SQLAlchemy ``db.session``.
"""

from __future__ import annotations

import re
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm
from sqlalchemy import event

from . import _callbacks, _registry, _telemetry, _transaction, _unit, _unit_checks
from ._database import CONNECTIONS, LOCKING, SENT, began
from ._guard import FORKED, SCOPED, check
from ._release import _HELD_REPORTED
from ._scoped import CLOSED, reopened
from ._telemetry import HOLDERS

_LOCK_WORDS = re.compile(
    r"\bFOR\s+(?:UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b|\bLOCK\b|\bGET_LOCK\s*\(", re.I
)
_STATEMENT = "flask_wfsession.statement"  # Session.info: a statement or flush is starting
_PER_TRANSACTION = (CONNECTIONS, SENT, LOCKING, _HELD_REPORTED, FORKED, HOLDERS, _STATEMENT)


def _note(session: orm.Session, statement: t.Any) -> None:
    """Note what ``statement`` may do, where the database cannot tell."""
    if isinstance(statement, sa.Select):
        if statement._for_update_arg is not None:
            session.info[SENT] = session.info[LOCKING] = True
        return
    session.info[SENT] = True
    text = getattr(getattr(statement, "element", statement), "text", None)
    if isinstance(text, str) and _LOCK_WORDS.search(text):
        session.info[LOCKING] = True


def _on_execute(state: orm.ORMExecuteState) -> None:
    session = state.session
    check(session)
    _note(session, state.statement)
    session.info[_STATEMENT] = True


def _on_flush(session: orm.Session, flush_context: t.Any, instances: t.Any) -> None:
    check(session)
    session.info[_STATEMENT] = True


_SUBTRANSACTION = orm.SessionTransactionOrigin.SUBTRANSACTION


def _on_transaction_create(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.origin is _SUBTRANSACTION:
        check(session)  # a flush or a bulk operation, before it takes a connection
        session.info[SENT] = True


def _on_begin(session: orm.Session, transaction: t.Any, connection: sa.Connection) -> None:
    info = session.info
    held: list[sa.Connection] = info.setdefault(CONNECTIONS, [])
    if connection in held:
        return
    held.append(connection)
    if len(held) == 1:
        if not info.get(SCOPED):  # scoped ones are found through their context
            _registry.add(session)
        elif CLOSED in info:  # closed by its context's teardown, and used again
            reopened(session)
            if not info.get(SCOPED):
                _registry.add(session)
    if _telemetry._watches:
        _telemetry.began(info, connection)
    began(connection)
    if _unit.UNIT in info:
        _unit_checks.began(session, connection)
    if not info.pop(_STATEMENT, False):
        # Taken by 'session.connection()', for SQL that no session hook sees:
        # it may write, and it was not checked yet (refused or warned now; a
        # rollback or close returns the connection).
        info[SENT] = True
        check(session)


def _on_commit(session: orm.Session) -> None:
    check(session, guard=False)
    _transaction.before_commit(session)


def _on_transaction_end(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.nested:
        _callbacks.savepoint_ended(session, transaction)
    elif transaction.origin is not _SUBTRANSACTION:
        info = session.info
        if HOLDERS in info:
            _telemetry.ended(info)
        for key in _PER_TRANSACTION:
            if key in info:
                del info[key]
        if not info.get(SCOPED):
            _registry.discard(session)
        # Last: this may run the app's on_commit callbacks, or raise for a unit
        # of work whose transaction someone else ended.
        _transaction.transaction_ended(session)


def install(target: t.Any) -> None:
    """Install the listeners on a session class, sessionmaker or scoped_session, once."""
    event.listen(target, "do_orm_execute", _on_execute)
    event.listen(target, "before_flush", _on_flush)
    event.listen(target, "after_transaction_create", _on_transaction_create)
    event.listen(target, "after_begin", _on_begin)
    # First, before Flask-SQLAlchemy's own (its signals must not announce a
    # commit that a unit refuses, nor hide one that happened).
    event.listen(target, "before_commit", _on_commit, insert=True)
    event.listen(target, "after_commit", _transaction.after_commit, insert=True)
    event.listen(target, "after_transaction_end", _on_transaction_end)
