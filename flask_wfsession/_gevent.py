"""gevent: a warning when the PostgreSQL driver would block every greenlet.

psycopg 3 chooses how to wait for the server when it is imported. Imported
before gevent's monkey-patching (gunicorn ``--preload`` with the gevent
worker, or an app module that imports it before patching), it waits in C,
and each query blocks every greenlet of the process for as long as it runs:
the app still works, one query at a time. Each new connection of a psycopg
engine checks this, once the process is patched, and warns once.
"""

from __future__ import annotations

import sys
import typing as t

import sqlalchemy as sa

from . import _report
from ._errors import BlockingDriverWarning

_warned: list[bool] = []


def watch(engine: sa.Engine) -> None:
    """Check each new connection of ``engine`` if it is a psycopg 3 engine."""
    if engine.dialect.driver == "psycopg":
        sa.event.listen(engine, "connect", _check)


def blocking() -> bool:
    """Whether gevent has patched this process but psycopg still waits in C."""
    monkey = sys.modules.get("gevent.monkey")
    waiting = sys.modules.get("psycopg.waiting")
    if monkey is None or waiting is None or not monkey.is_module_patched("select"):
        return False
    return getattr(waiting, "wait", None) is getattr(waiting, "wait_c", False)


def _check(dbapi_connection: t.Any, record: t.Any) -> None:
    if _warned or not blocking():
        return
    _warned.append(True)
    _report.warn(
        "psycopg was imported before gevent patched this process, so each query"
        " blocks every greenlet while it runs. Patch first ('from gevent import"
        " monkey; monkey.patch_all()' before anything imports psycopg), or set the"
        " environment variable PSYCOPG_WAIT_FUNC=wait_poll for the server process"
        " (gunicorn --preload with the gevent worker needs one of the two).",
        BlockingDriverWarning,
        stacklevel=2,
    )
