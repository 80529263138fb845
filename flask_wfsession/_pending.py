"""Pending changes: what a session would lose if its transaction ended now.

Two sources count as pending: objects the unit of work has not flushed yet
(new, changed, deleted), and writes already sent to the database in the open
transaction (flushed ORM changes, Core or textual ``INSERT``/``UPDATE``/...).
The second kind is invisible to the ORM, so an engine hook marks each
connection that carries a write, and a session hook resets the mark when the
session begins a transaction on it.
"""

from __future__ import annotations

import functools
import logging
import re
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm
from sqlalchemy import event
from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

from . import signals

if t.TYPE_CHECKING:
    from flask import Flask

logger = logging.getLogger("flask_wfsession")

_WRITES = "flask_wfsession.writes"  # Connection.info: statements that wrote
_CONNECTIONS = "flask_wfsession.connections"  # Session.info: connections in tx
_MAX_LISTED = 3

_READ_VERBS = frozenset(
    {"select", "show", "explain", "describe", "desc", "pragma", "values", "set"}
    | {"savepoint", "release", "rollback", "begin", "start", "commit"}
)
_FIRST_WORD = re.compile(r"^(?:\s|\(|/\*.*?\*/|--[^\n]*\n)*(\w+)", re.S)
_DML_WORD = re.compile(r"\b(insert|update|delete|merge|replace|upsert)\b", re.I)


@functools.lru_cache(maxsize=512)
def _text_writes(statement: str) -> bool:
    """Whether a textual statement may write. Unknown verbs count as writes."""
    match = _FIRST_WORD.match(statement)
    if match is None:
        return True
    verb = match.group(1).lower()
    if verb == "with":
        return _DML_WORD.search(statement) is not None
    return verb not in _READ_VERBS


def _is_write(statement: str, context: ExecutionContext | None) -> bool:
    if context is not None:
        ctx = t.cast(t.Any, context)
        if ctx.isinsert or ctx.isupdate or ctx.isdelete or ctx.isddl:
            return True
        compiled = ctx.compiled
        if compiled is not None and not isinstance(compiled.statement, sa.TextClause):
            return False
    return _text_writes(statement)


def _before_cursor_execute(
    conn: sa.Connection,
    cursor: DBAPICursor,
    statement: str,
    parameters: t.Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> None:
    if _is_write(statement, context):
        writes: list[str] = conn.info.setdefault(_WRITES, [])
        if len(writes) < _MAX_LISTED:
            writes.append(" ".join(statement.split())[:80])


def track_engine(engine: sa.Engine) -> None:
    """Mark connections of ``engine`` that send a write. Idempotent."""
    if not event.contains(engine, "before_cursor_execute", _before_cursor_execute):
        event.listen(engine, "before_cursor_execute", _before_cursor_execute)


def _after_begin(
    session: orm.Session, transaction: orm.SessionTransaction, connection: sa.Connection
) -> None:
    if transaction.parent is None:
        connection.info[_WRITES] = []
        session.info.setdefault(_CONNECTIONS, []).append(connection)


def _after_transaction_end(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_CONNECTIONS, None)


def track_sessions(target: t.Any) -> None:
    """Record which connections each session of ``target`` uses. Idempotent.

    :param target: a session class, ``sessionmaker`` or ``scoped_session``.
    """
    for name, fn in (
        ("after_begin", _after_begin),
        ("after_transaction_end", _after_transaction_end),
    ):
        if not event.contains(target, name, fn):
            event.listen(target, name, fn)


def _describe(obj: object) -> str:
    state = sa.inspect(obj)
    identity = state.identity
    if identity is None:
        return f"{type(obj).__name__} (not yet inserted)"
    key = identity[0] if len(identity) == 1 else identity
    return f"{type(obj).__name__} {key!r}"


def describe_pending(session: orm.Session) -> list[str]:
    """Describe the writes ``session`` would lose if rolled back now.

    :return: one line per pending object or already-sent write; empty when
        the session's transaction is read-only.
    """
    changes = [f"new {_describe(o)}" for o in session.new]
    changes += [f"changed {_describe(o)}" for o in session.dirty if session.is_modified(o)]
    changes += [f"deleted {_describe(o)}" for o in session.deleted]
    for conn in session.info.get(_CONNECTIONS, ()):
        if conn.closed:
            continue
        changes += [f"sent, not committed: {sql}" for sql in conn.info.get(_WRITES, ())]
    return changes


def report_discarded(app: Flask, session: orm.Session, changes: list[str], reason: str) -> None:
    """Log and signal that ``changes`` of ``session`` were rolled back."""
    logger.warning(
        "Discarded uncommitted writes (%s): %s. Commit them before this point if they"
        " were meant to be kept.",
        reason,
        "; ".join(changes),
    )
    signals.session_discarded.send(app, session=session, changes=changes, reason=reason)
