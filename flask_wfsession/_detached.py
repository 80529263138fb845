"""Detached mode: independent sessions, tied to no app context.

Each ``with`` block gets a new session that commits when the block succeeds,
rolls back when it raises, and always closes. While the block is open the
session is marked, so a long-running step started inside it releases the
connection only when that cannot split the block.
"""

from __future__ import annotations

import contextlib
import typing as t

import sqlalchemy.orm as orm

from ._release import DETACHED_BLOCK


class DetachedSessions:
    """Opens detached sessions from one app's sessionmaker."""

    def __init__(self, sessionmaker: orm.sessionmaker[t.Any]) -> None:
        self._sessionmaker = sessionmaker

    @contextlib.contextmanager
    def session(self) -> t.Iterator[orm.Session]:
        """A new session: commit on success, roll back on error, always close."""
        session: orm.Session = self._sessionmaker(expire_on_commit=False)
        session.info[DETACHED_BLOCK] = True
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.info.pop(DETACHED_BLOCK, None)
            session.close()
