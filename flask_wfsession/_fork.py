"""Fork safety: a child process never reuses its parent's pooled connections.

After ``fork`` (gunicorn ``--preload``, ``multiprocessing``, Celery prefork),
the child's copy of each managed engine's pool is replaced by an empty one,
without closing the parent's connections (``Engine.dispose(close=False)``).
"""

from __future__ import annotations

import os
import typing as t
import weakref

import sqlalchemy as sa

_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def manage(engine: sa.Engine) -> None:
    """Dispose ``engine``'s pool in every child forked from now on."""
    _engines.add(engine)


def dispose_pools(engines: t.Iterable[sa.Engine] | None = None) -> None:
    """Replace pools with empty ones, leaving the parent's connections open.

    :param engines: the engines to dispose; all managed engines by default.
    """
    for engine in list(_engines if engines is None else engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=dispose_pools)
