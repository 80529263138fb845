"""gevent: greenlets in one OS thread keep their sessions, steps and reports apart.

Each test runs ``tests/gevent_app.py`` in a subprocess, because
``gevent.monkey.patch_all()`` cannot be undone in the test process. Mode
``preload`` builds the apps before patching (``gunicorn --preload``); mode
``patched`` patches first. The subprocess runs both integrations (plain and
Flask-SQLAlchemy) and prints what it saw as JSON.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa

from . import gevent_app
from .models import Base

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tables(uri: str) -> t.Iterator[str]:
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield uri
    Base.metadata.drop_all(engine)
    engine.dispose()


def run_gevent_app(mode: str, backend: str, uri: str) -> dict[str, t.Any]:
    process = subprocess.run(
        [sys.executable, "-m", "tests.gevent_app", mode, backend, uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    return t.cast(dict[str, t.Any], json.loads(process.stdout))


@pytest.mark.parametrize("mode", ["preload", "patched"])
def test_greenlets_keep_their_sessions_apart(tables: str, backend: str, mode: str) -> None:
    """One subprocess per mode and backend (imports are slow); both integrations."""
    pool = gevent_app.POOL
    assert pool["pool_size"] + pool["max_overflow"] < gevent_app.GREENLETS  # releases needed
    results = run_gevent_app(mode, backend, tables)
    assert results["threading patched"] is True
    # psycopg imported before the patching waits in C, blocking every greenlet: said once.
    assert results["blocking driver warnings"] == (mode == "preload" and backend == "postgresql")
    for integration in gevent_app.INTEGRATIONS:
        check_rendezvous(integration, results[integration])
        check_cross_greenlet(integration, results[integration]["cross greenlet"])
        check_workers_and_streams(integration, results[integration]["workers and streams"])
        check_units(integration, results[integration]["units"])


def check_rendezvous(integration: str, seen: dict[str, t.Any]) -> None:
    """20 greenlets inside their steps at once, on a pool of three."""
    where = f"{integration}: {seen}"
    assert seen["errors"] == [], where
    assert seen["unfinished greenlets"] == 0, where
    assert seen["distinct thread idents"] == gevent_app.GREENLETS, where
    # 19 greenlets in their steps: only the holder and the waiting observer
    # hold a connection; then all 20: only the holder.
    assert seen["checked out, 19 in steps"] == 2, where
    assert seen["checked out, all in steps"] == 1, where
    # Nobody else's step ended the observer's transaction or the holder's.
    assert seen["observer kept its transaction"] is True, where
    assert seen["holder still in its transaction"] is True, where
    assert seen["holder sees its row"] == 1, where
    # Every release was done by the greenlet owning the session.
    reports = seen["reports"]
    assert [r for r in reports if r["by"] != r["owner"]] == [], where
    assert collections.Counter(r["action"] for r in reports) == {"released": 19, "held": 1}
    assert [r["by"] for r in reports if r["action"] == "held"] == ["holder"]
    warned = [(w["category"], w["message"]) for w in seen["warnings"]]
    assert [c for c, _ in warned] == ["HeldConnectionWarning"], where
    assert "'llm'" in warned[0][1] and "'wfs.detached()' block" in warned[0][1]
    # 18 scoped + 18 detached writes, and the holder's, all committed.
    assert seen["rows"] == 2 * (gevent_app.GREENLETS - 2) + 1, where
    assert seen["checked out after"] == 0, where


def check_cross_greenlet(integration: str, seen: dict[str, t.Any]) -> None:
    """A greenlet from gevent.spawn using another greenlet's sessions."""
    assert seen["spawned greenlet has an app context"] is False  # gevent: a fresh context
    for attempt in (
        "scoped execute",
        "scoped commit",
        "scoped execute, own app context",
        "detached execute",
        "detached flush",
    ):
        assert seen[attempt] == "CrossThreadSessionError", (integration, attempt, seen)
    assert seen["detached object still unflushed"] == 1  # the flush wrote nothing
    assert seen["owner's scoped still works"] == 1
    assert seen["owner's detached still works"] == 1
    assert seen["checked out after"] == 0


def check_workers_and_streams(integration: str, seen: dict[str, t.Any]) -> None:
    """Greenlets from wfs.spawn and wfs.submit, and streamed responses, on a pool of three."""
    where = f"{integration}: {seen}"
    streams = gevent_app.STREAMS
    assert streams > gevent_app.POOL["pool_size"] + gevent_app.POOL["max_overflow"]
    assert seen["errors"] == [], where
    assert seen["unfinished"] == 0, where
    assert seen["attached object handed to spawn"] == "AttachedObjectError", where
    # Every worker and every stream inside its step at once, holding nothing.
    assert seen["checked out, all workers in steps"] == 0, where
    assert seen["checked out, all streams in steps"] == 0, where
    assert seen["distinct worker sessions"] == streams, where
    assert seen["distinct stream sessions"] == streams, where
    assert seen["worker rows"] == streams, where
    # Each stream read its own number back through its own session.
    assert seen["streams"] == [f"t0 {n}\nt1 {n}\nt2 {n}\n" for n in range(streams)], where
    assert seen["checked out after"] == 0, where


def check_units(integration: str, seen: dict[str, t.Any]) -> None:
    """Units of work in greenlets: each commits or rolls back only its own."""
    where = f"{integration}: {seen}"
    streams = gevent_app.STREAMS
    assert seen["errors"] == [], where
    assert seen["unfinished"] == 0, where
    # Every unit inside its step at once: read-only units gave their connections back.
    assert seen["checked out, all units in steps"] == 0, where
    assert seen["unit rows"] == list(range(0, streams, 2)), where
    assert collections.Counter(seen["signals"]) == {
        "committed": streams // 2,
        "rolled back": streams // 2,
    }, where
    assert seen["checked out after"] == 0, where
