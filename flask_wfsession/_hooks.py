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

Used for this package's :class:`~flask_wfsession.Session` and for an adopted
Flask-SQLAlchemy ``db.session``.
"""

from __future__ import annotations

import re
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm
from sqlalchemy import event

from . import _registry
from ._database import CONNECTIONS, LOCKING, SENT, began
from ._guard import FORKED, check
from ._release import _HELD_REPORTED

_LOCK_WORDS = re.compile(r"\bFOR\s+(?:UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b|\bLOCK\b", re.I)
_PER_TRANSACTION = (CONNECTIONS, SENT, LOCKING, _HELD_REPORTED, FORKED)


def _on_execute(state: orm.ORMExecuteState) -> None:
    session = state.session
    check(session)
    statement = state.statement
    if isinstance(statement, sa.Select):
        if statement._for_update_arg is not None:
            session.info[SENT] = session.info[LOCKING] = True
        return
    session.info[SENT] = True
    text = getattr(getattr(statement, "element", statement), "text", None)
    if isinstance(text, str) and _LOCK_WORDS.search(text):
        session.info[LOCKING] = True


def _on_flush(session: orm.Session, flush_context: t.Any, instances: t.Any) -> None:
    check(session)


def _on_transaction_create(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.parent is not None and not transaction.nested:
        check(session)  # a flush or a bulk operation, before it takes a connection
        session.info[SENT] = True


def _on_begin(session: orm.Session, transaction: t.Any, connection: sa.Connection) -> None:
    held: list[sa.Connection] = session.info.setdefault(CONNECTIONS, [])
    if connection not in held:
        held.append(connection)
        if len(held) == 1:
            _registry.add(session)
        began(connection)
        # A connection taken by a path no earlier hook sees ('session.connection()'):
        # refused or warned now; a rollback or close returns it.
        check(session)


def _on_commit(session: orm.Session) -> None:
    check(session, guard=False)


def _on_transaction_end(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.parent is None:
        for key in _PER_TRANSACTION:
            session.info.pop(key, None)
        _registry.discard(session)


def install(target: t.Any) -> None:
    """Install the listeners on a session class, sessionmaker or scoped_session, once."""
    event.listen(target, "do_orm_execute", _on_execute)
    event.listen(target, "before_flush", _on_flush)
    event.listen(target, "after_transaction_create", _on_transaction_create)
    event.listen(target, "after_begin", _on_begin)
    event.listen(target, "before_commit", _on_commit)
    event.listen(target, "after_transaction_end", _on_transaction_end)
