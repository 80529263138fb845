"""Fork safety: a child process never uses its parent's connections.

After ``fork`` (gunicorn ``--preload``, ``multiprocessing``, Celery prefork):

* each managed engine's pool is replaced by an empty one, without closing
  the parent's connections (``Engine.dispose(close=False)``);
* a session that held a connection at the fork is cut off from it without a
  byte sent on the parent's socket. If its transaction had written (the
  database is asked in the parent, just before the fork), the writes belong
  to the parent: using the session in the child raises
  :class:`~flask_wfsession.CrossThreadSessionError` until it is rolled back.
  Otherwise it is rolled back in the child, keeping unflushed changes, and
  its next use takes a new connection.
"""

from __future__ import annotations

import ctypes
import os
import typing as t
import weakref

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _registry
from ._database import CONNECTIONS, connections, session_touched
from ._guard import FORKED
from ._release import _end_keeping_unflushed

_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_WROTE = "flask_wfsession.wrote_before_fork"  # Session.info, set in the parent


def manage(engine: sa.Engine) -> None:
    """Dispose ``engine``'s pool in every child forked from now on."""
    _engines.add(engine)


def dispose_pools(engines: t.Iterable[sa.Engine] | None = None) -> None:
    """Replace pools with empty ones, leaving the parent's connections open.

    :param engines: the engines to dispose; all managed engines by default.
    """
    for engine in list(_engines if engines is None else engines):
        engine.dispose(close=False)


scoped_sessions_here: t.Callable[[], list[orm.Session]] = list
"""The current app context's sessions holding a connection (set by the extension)."""

_forking: list[orm.Session] = []  # this thread's sessions holding a connection, at the fork


def _before_fork() -> None:
    # Only this thread's sessions can be asked safely (others may be running
    # a statement), and only they can go on being used in the child.
    scoped = [s for s in scoped_sessions_here() if s.info.get(CONNECTIONS)]
    _forking[:] = {id(s): s for s in [*_registry.in_this_thread(), *scoped]}.values()
    for session in _forking:
        try:
            session.info[_WROTE] = session_touched(session, locks=False)
        except Exception:
            session.info[_WROTE] = True


def _forget_connection(connection: sa.Connection) -> None:
    """Cut ``connection`` off from its DBAPI connection without closing it.

    As in SQLAlchemy's recipe for pools after fork: once the pool's record has
    forgotten the DBAPI connection, invalidating closes nothing. The drivers'
    finalisers are safe for a connection made in another process (psycopg
    checks the pid; PyMySQL only drops the socket), except SQLite's: closing
    an inherited ``sqlite3`` connection, even at interpreter exit, rolls back
    on disk and deletes the parent's rollback journal, so the parent's commit
    fails. That one object is kept alive for the child's whole life.
    """
    record = connection.connection._connection_record
    if connection.dialect.name == "sqlite" and record.dbapi_connection is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(record.dbapi_connection))
    record.dbapi_connection = None
    connection.invalidate()


def _after_fork_in_child() -> None:
    _registry.reset_after_fork()
    inherited = {id(s): s for s, _ in _registry.all_holding()}
    inherited.update((id(s), s) for s in _forking)
    _forking.clear()
    for session in inherited.values():
        for connection in connections(session):
            _forget_connection(connection)
        if session.info.pop(_WROTE, True):
            session.info[FORKED] = os.getppid()
        else:
            _end_keeping_unflushed(session, session.rollback, expire=False)
    dispose_pools()


def _after_fork_in_parent() -> None:
    for session in _forking:
        session.info.pop(_WROTE, None)
    _forking.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_child=_after_fork_in_child,
        after_in_parent=_after_fork_in_parent,
    )
