"""Sessions that hold a database connection, and the thread or greenlet that took it.

A session is entered when its transaction takes its first connection and
removed when its outermost transaction ends, so the registry is never larger
than the number of connections checked out. The thread is read at call time
with :func:`threading.get_ident`, which gevent's monkey-patching makes
per-greenlet, so an app built before ``monkey.patch_all()`` (gunicorn
``--preload``) still keeps greenlets apart.
"""

from __future__ import annotations

import threading
import weakref

import sqlalchemy.orm as orm

_lock = threading.Lock()
_holding: weakref.WeakKeyDictionary[orm.Session, int] = weakref.WeakKeyDictionary()


def add(session: orm.Session) -> None:
    """Note that ``session`` holds a connection taken in the calling thread."""
    with _lock:
        _holding[session] = threading.get_ident()


def discard(session: orm.Session) -> None:
    """Note that ``session`` holds no connection any more."""
    with _lock:
        _holding.pop(session, None)


def in_this_thread() -> list[orm.Session]:
    """The sessions holding a connection taken in the calling thread or greenlet."""
    ident = threading.get_ident()
    with _lock:
        return [session for session, owner in _holding.items() if owner == ident]


def all_holding() -> list[tuple[orm.Session, int]]:
    """Every session holding a connection, with its thread's ident."""
    with _lock:
        return list(_holding.items())


def reset_after_fork() -> None:
    """In a forked child: a new lock, in case another thread held it at the fork."""
    global _lock
    _lock = threading.Lock()
