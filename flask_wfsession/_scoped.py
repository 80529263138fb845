"""Scoped mode: one session per application context, closed at teardown.

The session is cached on the context's ``g``, which exists exactly as long as
its context, so two contexts can never share a session the way an ``id()``
key reused after garbage collection could. With Flask-SQLAlchemy, its own
``db.session`` plays this part (see ``_fsa``); both implement
:class:`ScopedSource`.

Flask 3.1 tears the context down once when a view returns a streamed
response, then pushes it again while ``stream_with_context`` sends the body,
and tears it down again after. A session the view kept in a variable is
closed by the first teardown; used again by the body, it is put back as its
context's session (:func:`reopened`), so steps release it and the second
teardown closes it.
"""

from __future__ import annotations

import typing as t

import sqlalchemy.orm as orm
from flask import g

from ._callbacks import report_dropped
from ._guard import claim, owned_here
from ._pending import describe_pending, report_discarded
from ._telemetry import HOLDERS, ending
from ._transaction import forget, has_committed

if t.TYPE_CHECKING:
    from flask import Flask

_KEY = "_flask_wfsession"
CLOSED = "flask_wfsession.closed_at_teardown"  # Session.info: closed by its context's teardown


class ScopedSource(t.Protocol):
    """Where the current app context's session comes from."""

    def get(self) -> orm.Session:
        """The current context's session, made on first use."""

    def peek(self) -> orm.Session | None:
        """The current context's session if one was made, else ``None``."""

    def close(self, session: orm.Session) -> None:
        """Close the current context's ``session``, returning its connection, and forget it."""

    def adopt(self, session: orm.Session) -> bool:
        """Make ``session`` the current context's session again, if it has none now."""


class ContextScoped:
    """A session per app context, from ``sessionmaker``, cached on ``g``."""

    def __init__(self, sessionmaker: orm.sessionmaker[t.Any]) -> None:
        self._sessionmaker = sessionmaker

    def get(self) -> orm.Session:
        session: orm.Session | None = g.get(_KEY)
        if session is None:
            session = self._sessionmaker()
            claim(session, scoped=True)
            setattr(g, _KEY, session)
        return session

    def peek(self) -> orm.Session | None:
        return t.cast("orm.Session | None", g.get(_KEY))

    def close(self, session: orm.Session) -> None:
        g.pop(_KEY, None)
        session.close()

    def adopt(self, session: orm.Session) -> bool:
        if g.get(_KEY) is not None:
            return False
        setattr(g, _KEY, session)
        return True


def _no_source(session: orm.Session) -> ScopedSource | None:
    return None


current_source: t.Callable[[orm.Session], ScopedSource | None] = _no_source
"""The current app's scoped source, for a session of the current app context (set by
the extension)."""


def reopened(session: orm.Session) -> None:
    """A scoped session closed by its context's teardown takes a connection again.

    In its own context (a streamed body), it becomes the context's session
    again, if the context has none, or else the thread's, like a detached
    session: steps there release it. In any other context it stays its old
    context's, and the ownership check refuses it.
    """
    del session.info[CLOSED]
    if not owned_here(session):
        return
    source = current_source(session)
    if source is None or not source.adopt(session):
        claim(session, scoped=False)


def teardown(app: Flask, scoped: ScopedSource) -> None:
    """Close the context's session, then report writes it never committed and
    ``on_commit`` callbacks that will never run.

    The session is closed whatever happens (a failing question to the
    database, a receiver of the report that raises), so its connection always
    goes back to the pool. A receiver's error is logged, not raised: the
    request is over.
    """
    session = scoped.peek()
    if session is None:
        return
    dropped = forget(session)  # a unit left open, and callbacks no commit will run
    try:
        # Committed, not ended: a listener after the COMMIT raised; nothing is lost.
        ending_open = session.in_transaction() and not has_committed(session)
        changes = describe_pending(session) if ending_open else []
    finally:
        session.info[CLOSED] = True
        if HOLDERS in session.info:  # watched: an idle gap ending here is named so
            token = ending.set("the app context's teardown")
            try:
                scoped.close(session)
            finally:
                ending.reset(token)
        else:
            scoped.close(session)
    try:
        if changes:
            report_discarded(app, session, changes, "app context teardown", reraise=False)
    finally:
        if dropped:
            report_dropped(dropped, "the app context ended without a commit")
