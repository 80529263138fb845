"""Fixtures: a real app on each backend, with and without Flask-SQLAlchemy.

Every test using ``app`` runs on SQLite (a file), PostgreSQL and MariaDB. A
module where transaction pooling matters also runs on ``pgbouncer`` (the same
PostgreSQL database through PgBouncer in transaction mode, 127.0.0.1:6432,
started by ``.ci/services``): it overrides the fixture with
``backend = backend_fixture(pgbouncer=True)``. An unreachable server is an
error, never a skip. ``WFSESSION_TEST_BACKENDS`` (comma-separated) narrows the
list for a quick local run; ``WFSESSION_TEST_DATABASE`` picks another
(existing) database on both servers.
"""

from __future__ import annotations

import os
import threading
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import WFSession

from .models import Base, Conversation

pytest_plugins = ["pytester"]  # test_testing.py runs test files of its own

# WFSESSION_TEST_DATABASE names another database on both servers, so that
# two runs on one machine do not drop each other's tables.
_DATABASE = os.environ.get("WFSESSION_TEST_DATABASE", "test")
SERVERS = {
    "postgresql": f"postgresql+psycopg://postgres@127.0.0.1:5432/{_DATABASE}",
    "mysql": f"mysql+pymysql://root@127.0.0.1:3306/{_DATABASE}",
    "pgbouncer": f"postgresql+psycopg://postgres@127.0.0.1:6432/{_DATABASE}",
}
BACKENDS = os.environ.get("WFSESSION_TEST_BACKENDS", "sqlite,postgresql,mysql,pgbouncer").split(",")
# Every connection through PgBouncer in transaction mode needs this: psycopg
# would otherwise prepare a statement after 5 runs on one server connection and
# run it later on another ("prepared statement "_pg3_0" does not exist").
PGBOUNCER_ARGS: dict[str, t.Any] = {"prepare_threshold": None}
# A tiny pool makes a held connection visible: a third checkout times out.
POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5}
# A leaked transaction must fail the test, not hang the table drop.
CONNECT_ARGS = {
    "postgresql": {"options": "-c lock_timeout=10000", "application_name": "wfsession-tests"},
    "mysql": {"init_command": "SET SESSION lock_wait_timeout=10, innodb_lock_wait_timeout=10"},
    "sqlite": {"timeout": 10},
    # PgBouncer refuses the "options" startup parameter; its connect_query sets
    # the same lock_timeout on each server connection (.ci/services).
    "pgbouncer": {**PGBOUNCER_ARGS, "application_name": "wfsession-tests"},
}


def database_uri(backend: str, tmp_path: Path) -> str:
    return SERVERS.get(backend) or f"sqlite:///{tmp_path / 'test.db'}"


def engine_options(backend: str) -> dict[str, t.Any]:
    return {**POOL, "connect_args": CONNECT_ARGS[backend]}


def dialect(backend: str) -> str:
    """The database behind ``backend``: PgBouncer's is PostgreSQL."""
    return "postgresql" if backend == "pgbouncer" else backend


def helper_args(backend: str) -> dict[str, t.Any]:
    """``connect_args`` for the tests' own helper engines: none, but through PgBouncer."""
    return PGBOUNCER_ARGS if backend == "pgbouncer" else {}


def _backend(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


def backend_fixture(*, pgbouncer: bool) -> t.Any:
    """The ``backend`` fixture over :data:`BACKENDS`; ``pgbouncer`` only if asked.

    A module where transaction pooling matters overrides the fixture with
    ``backend = backend_fixture(pgbouncer=True)``.
    """
    params = [b for b in BACKENDS if pgbouncer or b != "pgbouncer"]
    return pytest.fixture(params=params, name="backend")(_backend)


backend = backend_fixture(pgbouncer=False)


@pytest.fixture
def uri(backend: str, tmp_path: Path) -> str:
    return database_uri(backend, tmp_path)


@pytest.fixture(params=["plain", "flask-sqlalchemy"])
def integration(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


class Setup(t.NamedTuple):
    app: Flask
    wfs: WFSession
    engine: sa.Engine
    db: SQLAlchemy | None


def make_app(
    integration: str,
    backend: str,
    uri: str,
    *,
    name: str = __name__,
    pool: t.Mapping[str, t.Any] | None = None,
    **config: t.Any,
) -> Setup:
    """Build an app the way the README shows, with or without Flask-SQLAlchemy.

    :param pool: pool options over the tests' tiny pool.
    """
    app = Flask(name)
    app.config.update(TESTING=True, **config)
    options = {**engine_options(backend), **(pool or {})}
    wfs = WFSession()
    db = None
    if integration == "flask-sqlalchemy":
        app.config["SQLALCHEMY_DATABASE_URI"] = uri
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
        db = SQLAlchemy()
        db.init_app(app)
        wfs.init_app(app, db=db)
    else:
        app.config["WFSESSION_DATABASE_URI"] = uri
        app.config["WFSESSION_ENGINE_OPTIONS"] = options
        wfs.init_app(app)
    with app.app_context():
        engine = wfs.engine
    return Setup(app, wfs, engine, db)


def run_in_thread(
    fn: t.Callable[[], object], in_context: t.Callable[[], t.Any] | None = None
) -> BaseException | None:
    """Run ``fn`` in a new thread named "borrower" (inside ``in_context()`` if
    given) and wait for it; return what it raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if in_context is None:
                fn()
            else:
                with in_context():
                    fn()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name="borrower")
    thread.start()
    thread.join()
    return errors[0] if errors else None


def checked_out(engine: sa.Engine) -> int:
    pool = t.cast(sa.pool.QueuePool, engine.pool)
    return pool.checkedout()


@pytest.fixture
def make(integration: str, backend: str, uri: str) -> t.Iterator[t.Callable[..., Setup]]:
    """Make apps on the current backend; check each returns every connection."""
    made: list[Setup] = []

    def factory(**config: t.Any) -> Setup:
        setup = make_app(integration, backend, uri, **config)
        if not made:
            Base.metadata.create_all(setup.engine)
        made.append(setup)
        return setup

    yield factory
    leaked = {s.app.name: checked_out(s.engine) for s in made if checked_out(s.engine)}
    for setup in made:
        setup.engine.dispose()
    if made:
        cleanup = sa.create_engine(
            uri, poolclass=sa.pool.NullPool, connect_args=helper_args(backend)
        )
        Base.metadata.drop_all(cleanup)
        cleanup.dispose()
    assert not leaked, f"connections still checked out after the test: {leaked}"


@pytest.fixture
def setup(make: t.Callable[..., Setup]) -> Setup:
    return make()


@pytest.fixture
def app(setup: Setup) -> Flask:
    return setup.app


@pytest.fixture
def wfs(setup: Setup) -> WFSession:
    return setup.wfs


@pytest.fixture
def engine(setup: Setup) -> sa.Engine:
    return setup.engine


@pytest.fixture
def conversation_id(setup: Setup) -> int:
    """The id of a committed conversation row."""
    with setup.app.app_context(), setup.wfs.detached() as session:
        conversation = Conversation(title="hello")
        session.add(conversation)
        session.flush()
        return conversation.id


def idle_in_transaction(uri: str) -> int:
    """How many of the tests' PostgreSQL connections sit idle in a transaction."""
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        count = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'wfsession-tests' AND state LIKE 'idle in transaction%'"
            )
        )
    engine.dispose()
    return int(count or 0)
