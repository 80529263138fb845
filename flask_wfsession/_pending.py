"""Pending changes: what a session would lose if its transaction ended now.

Two sources count as pending: objects the unit of work has not flushed yet
(new, changed, deleted), and writes already sent to the database in the open
transaction: flushed ORM changes, and Core or textual ``INSERT``/``UPDATE``/...
run through ``session.execute()``. The second kind is invisible to the ORM
once sent, so session hooks note each one, and forget them when the
session's outermost transaction ends. (A write inside a savepoint that was
rolled back stays noted: the mistake, if any, is to refuse, never to drop.)

No engine-level hook is used on purpose: any engine listener makes SQLAlchemy
dispatch connection events on every statement, which measurably slows every
request. The price: SQL run on ``session.connection()`` directly is not seen.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import signals

if t.TYPE_CHECKING:
    from flask import Flask

logger = logging.getLogger("flask_wfsession")

_SENT = "flask_wfsession.sent"  # Session.info: writes sent in the open transaction
_MAX_LISTED = 3  # sent writes noted per transaction
_MAX_DESCRIBED = 10  # unflushed objects named in a message

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


def _note(session: orm.Session, description: str) -> None:
    sent: list[str] = session.info.setdefault(_SENT, [])
    if len(sent) < _MAX_LISTED:
        sent.append(description)


def after_transaction_end(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_SENT, None)


def note_execute(state: orm.ORMExecuteState) -> None:
    """Note a write sent by ``session.execute()``; called before it runs."""
    if state.is_select:
        return
    statement = state.statement
    if isinstance(statement, sa.TextClause):
        if not _text_writes(statement.text):
            return
    elif not (getattr(statement, "is_dml", False) or getattr(statement, "is_ddl", False)):
        return
    _note(state.session, "sent, not committed: " + " ".join(str(statement).split())[:80])


def after_flush(session: orm.Session, flush_context: t.Any) -> None:
    room = _MAX_LISTED - len(session.info.get(_SENT, ()))
    for kind, obj in itertools.islice(_pending_objects(session), max(room, 0)):
        _note(session, f"flushed, not committed: {kind} {describe(obj)}")


def _pending_objects(session: orm.Session) -> t.Iterator[tuple[str, object]]:
    """The unflushed objects (before a flush: the ones it sends), with their kind."""
    yield from (("new", o) for o in session.new)
    yield from (("changed", o) for o in session.dirty if session.is_modified(o))
    yield from (("deleted", o) for o in session.deleted)


def identity_key(obj: object) -> object:
    """The primary key of ``obj`` (a tuple if composite), or ``None`` before insert."""
    state = sa.inspect(obj)
    identity = state.identity or state.mapper.primary_key_from_instance(obj)
    if identity is None or all(value is None for value in identity):
        return None
    return identity[0] if len(identity) == 1 else tuple(identity)


def describe(obj: object) -> str:
    """``Conversation 3``, or ``Conversation (not yet inserted)``."""
    key = identity_key(obj)
    if key is None:
        return f"{type(obj).__name__} (not yet inserted)"
    return f"{type(obj).__name__} {key!r}"


def describe_pending(session: orm.Session) -> list[str]:
    """Describe the writes ``session`` would lose if rolled back now.

    :return: one line per pending object (the first ten, then a count) or
        already-sent write; empty when the session's transaction is read-only.
    """
    sent: list[str] = session.info.get(_SENT, [])
    if not session.identity_map.check_modified() and not session.new and not session.deleted:
        return list(sent)
    objects = list(_pending_objects(session))
    changes = [f"{kind} {describe(obj)}" for kind, obj in objects[:_MAX_DESCRIBED]]
    if len(objects) > _MAX_DESCRIBED:
        changes.append(f"and {len(objects) - _MAX_DESCRIBED} more objects")
    return changes + sent


def report_discarded(app: Flask, session: orm.Session, changes: list[str], reason: str) -> None:
    """Log and signal that ``changes`` of ``session`` were rolled back."""
    logger.warning(
        "Discarded uncommitted writes (%s): %s. Commit them before this point if they"
        " were meant to be kept.",
        reason,
        "; ".join(changes),
    )
    signals.session_discarded.send(app, session=session, changes=changes, reason=reason)
