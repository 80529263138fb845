"""Sessions that hold a database connection, and the thread or greenlet that took it.

A session is entered when its transaction takes its first connection and
removed when its outermost transaction ends, so the registry is never larger
than the number of connections checked out. The thread is read at call time
with :func:`threading.get_ident`, which gevent's monkey-patching makes
per-greenlet, so an app built before ``monkey.patch_all()`` (gunicorn
``--preload``) still keeps greenlets apart.

Sessions are kept per thread: every long-running step and every chunk of a
streamed response asks for its own thread's, usually none, and gets the
answer from one dictionary lookup, without the lock or a scan of the other
threads' sessions (with a thousand streams, the scan and the lock showed up
in profiles).
"""

from __future__ import annotations

import threading
import weakref

import sqlalchemy.orm as orm

_lock = threading.Lock()
_by_thread: dict[int, weakref.WeakSet[orm.Session]] = {}
_owner: weakref.WeakKeyDictionary[orm.Session, int] = weakref.WeakKeyDictionary()


def add(session: orm.Session) -> None:
    """Note that ``session`` holds a connection taken in the calling thread."""
    ident = threading.get_ident()
    with _lock:
        _remove(session)
        _owner[session] = ident
        _by_thread.setdefault(ident, weakref.WeakSet()).add(session)


def discard(session: orm.Session) -> None:
    """Note that ``session`` holds no connection any more."""
    with _lock:
        _remove(session)


def _remove(session: orm.Session) -> None:
    ident = _owner.pop(session, None)
    held = _by_thread.get(ident) if ident is not None else None
    if held is not None:
        held.discard(session)
        if not held:
            del _by_thread[ident]  # type: ignore[arg-type]


def in_this_thread() -> list[orm.Session]:
    """The sessions holding a connection taken in the calling thread or greenlet."""
    held = _by_thread.get(threading.get_ident())
    if not held:  # the usual answer, without the lock
        return []
    with _lock:
        return list(held)


def all_holding() -> list[tuple[orm.Session, int]]:
    """Every session holding a connection, with its thread's ident."""
    with _lock:
        return list(_owner.items())


def reset_after_fork() -> None:
    """In a forked child: a new lock, in case another thread held it at the fork."""
    global _lock
    _lock = threading.Lock()
