"""Every listener the extension puts on sessions, installed in one call.

Before a statement or flush, the checks of :mod:`~flask_wfsession._guard`;
around it, the write notes of :mod:`~flask_wfsession._pending`. Used for
this package's :class:`~flask_wfsession.Session` and for an adopted
Flask-SQLAlchemy ``db.session``.
"""

from __future__ import annotations

import typing as t

import sqlalchemy.orm as orm
from sqlalchemy import event

from ._guard import check
from ._pending import after_flush, after_transaction_end, note_execute


def _on_execute(state: orm.ORMExecuteState) -> None:
    check(state.session)
    note_execute(state)


def _on_flush(session: orm.Session, flush_context: t.Any, instances: t.Any) -> None:
    check(session)


def install(target: t.Any) -> None:
    """Install the listeners on a session class, sessionmaker or scoped_session, once."""
    event.listen(target, "do_orm_execute", _on_execute)
    event.listen(target, "before_flush", _on_flush)
    event.listen(target, "after_flush", after_flush)
    event.listen(target, "after_transaction_end", after_transaction_end)
