"""pytest fixtures for apps that use flask-wfsession.

A pytest plugin, registered through the ``pytest11`` entry point: installing
the package makes the fixtures available, and nothing happens until a test
asks for one. Each fixture works on the Flask app that your own ``app``
fixture returns (the name pytest-flask uses too).

``wfs_isolation``
    The rows every table held before the test are back after it, whatever
    wrote them: the test's requests, ``wfs.spawn`` and ``wfs.submit``
    workers, detached sessions, Celery tasks run eagerly. Each table is read
    before and after the test, and only a table that changed is restored.
    This works across threads and connections, unlike one rolled-back
    connection, and on every backend.
``wfs_leak_check``
    Fails the test that leaves a connection checked out (a transaction left
    open, idle) or has uncommitted writes discarded, naming where;
    ``@pytest.mark.wfsession(leak_check=False)`` opts a test out (one that
    expects its writes to be discarded, say).
``wfs_strict``
    ``WFSESSION_PENDING = "raise"`` and ``WFSESSION_GUARD = "raise"`` for the
    test; ``@pytest.mark.wfsession(strict=False)`` opts a test out.
``wfs_step``
    Makes fake long-running steps that return at once, still releasing
    before and guarding during the step, and record what they were called
    with and how many connections were checked out meanwhile.
"""

from __future__ import annotations

import dataclasses
import threading
import typing as t

import pytest
import sqlalchemy as sa

from . import signals
from ._extension import _EXTENSION_KEY, WFSession, _State
from ._long_running import long_running
from ._telemetry import watch_of

if t.TYPE_CHECKING:
    from flask import Flask

_WORKER_PREFIX = "wfsession:"  # the names of wfs.spawn's threads
_JOIN_TIMEOUT = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "wfsession(strict=True, leak_check=True): opt a test out of flask-wfsession's"
        " wfs_strict or wfs_leak_check fixture",
    )


def _opted_out(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether the test's ``wfsession`` marker turns ``fixture`` off."""
    marker = request.node.get_closest_marker("wfsession")
    return marker is not None and not marker.kwargs.get(fixture, True)


def _app(request: pytest.FixtureRequest) -> tuple[Flask, _State]:
    try:
        app: Flask = request.getfixturevalue("app")
    except pytest.FixtureLookupError:
        raise pytest.UsageError(
            "flask-wfsession's fixtures use your 'app' fixture: define one that returns"
            " the Flask app (with 'wfs.init_app(app)' done)."
        ) from None
    ext = app.extensions.get(_EXTENSION_KEY)
    if not isinstance(ext, WFSession):
        raise pytest.UsageError(
            f"The app {app.name!r} of your 'app' fixture has no flask-wfsession: call"
            " 'wfs.init_app(app)' in the fixture."
        )
    return app, ext._get_state(app)


# -- Isolation ---------------------------------------------------------------------

Rows = list[tuple[t.Any, ...]]


def _tables(engine: sa.Engine) -> list[sa.Table]:
    """The engine's tables, parents before children."""
    metadata = sa.MetaData()
    metadata.reflect(engine)
    return list(metadata.sorted_tables)


def _read(connection: sa.Connection, table: sa.Table) -> Rows:
    columns = list(table.primary_key.columns) or list(table.columns)
    return [tuple(r) for r in connection.execute(sa.select(table).order_by(*columns))]


def _restore(engine: sa.Engine, saved: dict[sa.Table, Rows]) -> list[str]:
    """Put back the rows of every table that changed; return their names."""
    with engine.connect() as connection:
        changed = [table for table, rows in saved.items() if _read(connection, table) != rows]
    if not changed:
        return []
    with engine.begin() as connection:
        if engine.dialect.name in ("mysql", "mariadb"):
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        for table in reversed(changed):
            connection.execute(table.delete())
        for table in changed:
            if saved[table]:
                keys = [c.key for c in table.columns]
                connection.execute(
                    table.insert(), [dict(zip(keys, r, strict=True)) for r in saved[table]]
                )
        if engine.dialect.name in ("mysql", "mariadb"):
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    return [table.name for table in changed]


def _spawned() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(_WORKER_PREFIX)}


@pytest.fixture
def wfs_isolation(request: pytest.FixtureRequest) -> t.Iterator[list[str]]:
    """Undo every row the test wrote, on each of the app's engines.

    Before the restore, waits for the ``wfs.spawn`` workers the test started
    (up to 30 s); futures of ``wfs.submit`` must be waited for by the test.

    :return: after the test, the names of the tables that were restored.
    """
    state = _app(request)[1]
    saved: dict[sa.Engine, dict[sa.Table, Rows]] = {}
    for engine in set(state.engines.values()):
        with engine.connect() as connection:
            saved[engine] = {table: _read(connection, table) for table in _tables(engine)}
    before = _spawned()
    restored: list[str] = []
    yield restored
    for worker in _spawned() - before:
        worker.join(_JOIN_TIMEOUT)
    for engine, tables in saved.items():
        restored += _restore(engine, tables)


# -- Leak check --------------------------------------------------------------------


@pytest.fixture
def wfs_leak_check(request: pytest.FixtureRequest) -> t.Iterator[None]:
    """Fail the test if it leaves a connection checked out or has writes discarded.

    Opt a test out with ``@pytest.mark.wfsession(leak_check=False)``.
    """
    app, state = _app(request)
    if _opted_out(request, "leak_check"):
        yield
        return
    discarded: list[str] = []

    def on_discarded(sender: t.Any, *, changes: list[str], reason: str, **_: t.Any) -> None:
        discarded.append(f"{'; '.join(changes)} ({reason})")

    with signals.session_discarded.connected_to(on_discarded, app):
        yield
    problems = [f"uncommitted writes were discarded: {d}" for d in discarded]
    for key, engine in state.engines.items():
        pool = engine.pool
        if isinstance(pool, sa.pool.QueuePool) and pool.checkedout():
            watched = watch_of(engine)
            holders = watched.snapshot() if watched else []
            who = "; ".join(
                f"{h['endpoint']} ({h['state']}, began at {h['began_at']})" for h in holders
            )
            problems.append(
                f"{pool.checkedout()} connection(s) of engine {key or 'default'!r} still"
                f" checked out{f': {who}' if who else ''}"
            )
    if problems:
        pytest.fail(
            f"{request.node.nodeid} left: {'; and '.join(problems)}. Commit or roll back"
            " before the test ends, and join the workers it started.",
            pytrace=False,
        )


# -- Strict policy -----------------------------------------------------------------


@pytest.fixture
def wfs_strict(request: pytest.FixtureRequest) -> t.Iterator[None]:
    """Run the test with ``pending="raise"`` and the guard raising.

    Opt a test out with ``@pytest.mark.wfsession(strict=False)``.
    """
    state = _app(request)[1]
    if _opted_out(request, "strict"):
        yield
        return
    saved = state.pending, state.guard
    state.pending, state.guard = "raise", "raise"
    try:
        yield
    finally:
        state.pending, state.guard = saved


# -- Fake slow steps ---------------------------------------------------------------


@dataclasses.dataclass
class FakeStep:
    """A long-running step that returns ``result`` at once; made by ``wfs_step``.

    :ivar calls: the arguments of each call, as ``(args, kwargs)``.
    :ivar held: for each call, the app's connections checked out during the step.
    """

    name: str
    result: t.Any
    engines: list[sa.Engine]
    calls: list[tuple[tuple[t.Any, ...], dict[str, t.Any]]] = dataclasses.field(
        default_factory=list
    )
    held: list[int] = dataclasses.field(default_factory=list)

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        with long_running(self.name):
            self.calls.append((args, kwargs))
            self.held.append(
                sum(
                    e.pool.checkedout()
                    for e in self.engines
                    if isinstance(e.pool, sa.pool.QueuePool)
                )
            )
            return self.result


@pytest.fixture
def wfs_step(request: pytest.FixtureRequest) -> t.Callable[..., FakeStep]:
    """Make fake long-running steps: ``ask_llm = wfs_step("an answer")``.

    Patch the app's slow client with one (``monkeypatch.setattr``) to test the
    code around the step: the release before it, the guard during it, and
    what it returns.
    """
    engines = list(set(_app(request)[1].engines.values()))

    def make(result: t.Any = None, *, name: str = "fake-step") -> FakeStep:
        return FakeStep(name, result, engines)

    return make
