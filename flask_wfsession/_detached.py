"""Detached mode: independent sessions, tied to no app context.

Each ``with`` block gets a new session that commits when the block succeeds,
rolls back when it raises, and always closes. Sessions still open are listed
per thread, so a long-running step started inside the block releases them.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t

import sqlalchemy.orm as orm


class DetachedSessions:
    """Opens detached sessions from one app's sessionmaker and lists open ones."""

    def __init__(self, sessionmaker: orm.sessionmaker[t.Any]) -> None:
        self._sessionmaker = sessionmaker
        self._local = threading.local()

    def open_in_this_thread(self) -> list[orm.Session]:
        """The sessions of unfinished ``with`` blocks in the calling thread."""
        return list(getattr(self._local, "sessions", ()))

    @contextlib.contextmanager
    def session(self) -> t.Iterator[orm.Session]:
        """A new session: commit on success, roll back on error, always close."""
        session: orm.Session = self._sessionmaker(expire_on_commit=False)
        opened: list[orm.Session] = self._local.__dict__.setdefault("sessions", [])
        opened.append(session)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            opened.remove(session)
            session.close()
