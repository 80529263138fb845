"""Pending changes: what a session would lose if its transaction ended now.

Two kinds: objects the unit of work has not flushed yet (new, changed,
deleted), which the session knows; and writes already sent in the open
transaction, which only the database knows (see ``_database``).
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _report, signals
from ._database import SENT, aborted, invalidated, session_touched
from ._errors import DiscardedWritesWarning

if t.TYPE_CHECKING:
    from flask import Flask

_MAX_DESCRIBED = 10  # unflushed objects named in a message
SENT_WRITES = "writes already sent in the open transaction (the database says so)"


def _pending_objects(session: orm.Session) -> t.Iterator[tuple[str, object]]:
    """The unflushed objects, with their kind."""
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


def has_unflushed(session: orm.Session) -> bool:
    """Whether ``session`` has objects to flush (new, changed or deleted)."""
    # Session.new and .deleted build a set each; this runs at every teardown.
    return bool(session.identity_map.check_modified() or session._new or session._deleted)


def unflushed(session: orm.Session) -> list[str]:
    """One line per unflushed object (the first ten, then a count)."""
    if not has_unflushed(session):
        return []
    objects = list(_pending_objects(session))
    changes = [f"{kind} {describe(obj)}" for kind, obj in objects[:_MAX_DESCRIBED]]
    if len(objects) > _MAX_DESCRIBED:
        changes.append(f"and {len(objects) - _MAX_DESCRIBED} more objects")
    return changes


def describe_pending(session: orm.Session) -> list[str]:
    """What a rollback of ``session`` now would discard, for the teardown report.

    The database is asked only when the session sent something that may
    have written: anything but a ``select()`` construct, a flush, a bulk
    operation, or SQL on a connection taken with ``session.connection()``.
    Asking on every request would cost a round trip per request; this report
    changes nothing (the rollback happens either way), so it uses the cheap
    evidence first. A release before a step always asks.

    :return: empty when nothing would be lost. When the database cannot be
        asked (a dead connection), writes the session may have sent are
        listed as lost.
    """
    changes = unflushed(session)
    if not session.info.get(SENT):
        return changes
    if invalidated(session):
        changes.append("writes sent in a transaction whose connection failed")
        return changes
    if aborted(session):  # PostgreSQL answers nothing more in this transaction
        changes.append("writes sent in a transaction the database aborted after an error")
        return changes
    try:
        if session_touched(session, locks=False):
            changes.append(SENT_WRITES)
    except sa.exc.DBAPIError as error:
        changes.append(f"writes sent in a transaction whose connection failed ({error.orig})")
    return changes


def report_discarded(
    app: Flask, session: orm.Session, changes: list[str], reason: str, *, reraise: bool
) -> None:
    """Log, signal and warn that ``changes`` of ``session`` were rolled back."""
    _report.report(
        f"Discarded uncommitted writes ({reason}): {'; '.join(changes)}. Commit them"
        " before this point if they were meant to be kept.",
        DiscardedWritesWarning,
        signals.session_discarded,
        app,
        reraise=reraise,
        session=session,
        changes=changes,
        reason=reason,
    )
