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
import warnings

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

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
_LOCK_TIMEOUT_S = 10  # a restore waiting longer on a row lock: a session left open


@dataclasses.dataclass
class _Snapshot:
    """What one engine's database held before the test."""

    tables: dict[sa.Table, Rows]
    sequences: dict[str, tuple[t.Any, ...]]  # PostgreSQL: name -> setval() arguments


def _tables(connection: sa.Connection) -> list[sa.Table]:
    """The tables of the connection's default schema, parents before children.

    PostgreSQL's partitioned tables hold no rows of their own: their
    partitions are restored, as tables.
    """
    metadata = sa.MetaData()
    metadata.reflect(connection, views=False)
    partitioned: set[str] = set()
    if connection.dialect.name == "postgresql":
        partitioned = set(
            connection.exec_driver_sql(
                "SELECT relname FROM pg_class WHERE relkind = 'p'"
                " AND relnamespace = current_schema()::regnamespace"
            ).scalars()
        )
    with warnings.catch_warnings():  # foreign-key cycles: any order will do, checks are off
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        return [t for t in metadata.sorted_tables if t.name not in partitioned]


def _raw(connection: sa.Connection, column: sa.Column[t.Any]) -> t.Any:
    """``column`` as the driver has it: on SQLite, where SQLAlchemy's types
    convert stored text (dates, JSON), the stored value, unconverted."""
    if connection.dialect.name == "sqlite":
        return sa.type_coerce(column, sa.types.NullType()).label(column.key)
    return column


def _read(connection: sa.Connection, table: sa.Table) -> Rows:
    """The table's rows (its own: PostgreSQL's ``ONLY``), in primary key order;
    without a primary key, sorted here (a column such as PostgreSQL's ``json``
    has no order in SQL)."""
    query = sa.select(*(_raw(connection, c) for c in table.columns))
    query = query.with_hint(table, "ONLY", "postgresql")
    if table.primary_key.columns:
        query = query.order_by(*table.primary_key.columns)
        return [tuple(r) for r in connection.execute(query)]
    return sorted((tuple(r) for r in connection.execute(query)), key=repr)


def _differ(rows: Rows, saved: Rows) -> bool:
    """Whether ``rows`` differ from ``saved`` (compared by ``repr``: a float NaN
    equals itself)."""
    return rows != saved and repr(rows) != repr(saved)


def _sequences(connection: sa.Connection) -> dict[str, tuple[t.Any, ...]]:
    """PostgreSQL's sequences in the default schema, as ``setval()`` arguments: a
    test that restarts one (``TRUNCATE ... RESTART IDENTITY``) must not leave
    the next test's ids colliding with the restored rows."""
    if connection.dialect.name != "postgresql":
        return {}
    rows = connection.exec_driver_sql(
        "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename),"
        " coalesce(last_value, start_value), last_value IS NOT NULL"
        " FROM pg_sequences WHERE schemaname = current_schema()"
    )
    return {name: (value, called) for name, value, called in rows}


def _snapshot(engine: sa.Engine) -> _Snapshot:
    with engine.connect() as connection:
        tables = {table: _read(connection, table) for table in _tables(connection)}
        return _Snapshot(tables, _sequences(connection))


_SETTINGS_BACK = {  # after the restore: the connection goes back to the pool as it was
    "mysql": (
        "SET FOREIGN_KEY_CHECKS = {mysql_foreign_key_checks}",
        "SET SESSION innodb_lock_wait_timeout = {mysql_lock_wait_timeout}",
    ),
    "sqlite": ("PRAGMA foreign_keys = {sqlite_foreign_keys}",),
}


def _checks_off(connection: sa.Connection) -> tuple[bool, dict[str, t.Any]]:
    """Turn foreign-key checks and actions (cascades) off for the restore, where
    the database allows; return whether it did, and what to set back."""
    dialect = connection.dialect.name
    if dialect in ("mysql", "mariadb"):
        checks, timeout = connection.exec_driver_sql(
            "SELECT @@session.foreign_key_checks, @@session.innodb_lock_wait_timeout"
        ).one()
        values = {"mysql_foreign_key_checks": int(checks), "mysql_lock_wait_timeout": int(timeout)}
        connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        connection.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {_LOCK_TIMEOUT_S}")
        return True, values
    if dialect == "postgresql":  # SET LOCAL: undone with the transaction
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT_S}s'")
        try:  # also keeps triggers quiet; needs a superuser or the table owner's role
            with connection.begin_nested():
                connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        except sa.exc.DBAPIError:
            return False, {}
        return True, {}
    if dialect == "sqlite":
        # Only outside a transaction; Python's sqlite3 has none open before a write.
        was = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        off = not connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        return off, {"sqlite_foreign_keys": int(bool(was))}
    return False, {}


def _settings_back(connection: sa.Connection, values: dict[str, t.Any]) -> None:
    if not values:  # nothing was changed (or reading the settings failed first)
        return
    name = "mysql" if connection.dialect.name == "mariadb" else connection.dialect.name
    for statement in _SETTINGS_BACK.get(name, ()):
        connection.exec_driver_sql(statement.format(**values))


def _dependents(tables: list[sa.Table], changed: set[sa.Table]) -> set[sa.Table]:
    """``changed`` and every table that references one of them, directly or not:
    deleting a parent's rows deletes (cascades) or blocks its children's."""
    result = set(changed)
    grew = True
    while grew:
        grew = False
        for table in tables:
            if table not in result and any(fk.column.table in result for fk in table.foreign_keys):
                result.add(table)
                grew = True
    return result


def _restore(engine: sa.Engine, snapshot: _Snapshot) -> list[str]:
    """Put back the rows of every table that changed; return their names.

    The restore runs with foreign-key checks and cascades off where the
    database allows (else the tables that reference a changed one are
    restored too), and with a lock timeout; its settings are set back
    afterwards (or, failing that, its connection is discarded), so none
    leaks into the pool. PostgreSQL's sequences are set back too.
    """
    restored: set[str] = set()
    for _ in range(_PASSES):
        changed = _restore_once(engine, snapshot)
        if not changed:
            return sorted(restored)
        restored |= changed
    raise RuntimeError(
        f"wfs_isolation restored {sorted(restored)} {_PASSES} times, and they still differ"
        " from before the test: a trigger writes to a table each time another is restored."
        " Keep such triggers out of the test database, or drop them in a fixture."
    )


_PASSES = 3  # a trigger that writes on restore: restore what it wrote, then check again


class _OverridingInsert(sa.sql.Insert):
    """An INSERT that sets PostgreSQL's ``GENERATED ALWAYS AS IDENTITY`` columns."""

    inherit_cache = True


@compiles(_OverridingInsert, "postgresql")
def _overriding(insert: _OverridingInsert, compiler: t.Any, **kw: t.Any) -> str:
    sql: str = compiler.visit_insert(insert, **kw)
    return sql.replace(" VALUES ", " OVERRIDING SYSTEM VALUE VALUES ", 1)


def _insert(connection: sa.Connection, table: sa.Table, rows: Rows) -> None:
    kept = [i for i, c in enumerate(table.columns) if c.computed is None]  # generated: skip
    if connection.dialect.name == "sqlite":  # the stored values, as read: unconverted
        quote = connection.dialect.identifier_preparer.quote
        names = ", ".join(quote(table.columns[i].name) for i in kept)
        marks = ", ".join("?" for _ in kept)
        connection.exec_driver_sql(
            f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})",
            [tuple(row[i] for i in kept) for row in rows],
        )
        return
    keys = [table.columns[i].key for i in kept]
    values = [{k: row[i] for k, i in zip(keys, kept, strict=True)} for row in rows]
    connection.execute(_OverridingInsert(table), values)


def _restore_once(engine: sa.Engine, snapshot: _Snapshot) -> set[str]:
    """One pass of :func:`_restore`: the names of what it restored."""
    saved = snapshot.tables
    tables = list(saved)
    with engine.connect() as connection:
        changed = {table for table in tables if _differ(_read(connection, table), saved[table])}
        sequences = {
            name: args
            for name, args in _sequences(connection).items()
            if snapshot.sequences.get(name, args) != args
        }
    if not changed and not sequences:
        return set()
    connection = engine.connect()
    values: dict[str, t.Any] = {}
    try:
        off, values = _checks_off(connection)
        if not off:
            changed = _dependents(tables, changed)
        order = [table for table in tables if table in changed]
        for table in reversed(order):
            connection.execute(table.delete().with_hint("ONLY", dialect_name="postgresql"))
        for table in order:
            if saved[table]:
                _insert(connection, table, saved[table])
        for name, (value, called) in snapshot.sequences.items():
            if name in sequences:
                connection.execute(
                    sa.text("SELECT setval(:name, :value, :called)"),
                    {"name": name, "value": value, "called": called},
                )
        connection.commit()
    except sa.exc.DBAPIError as error:
        locked = isinstance(error, sa.exc.OperationalError)
        raise RuntimeError(
            f"wfs_isolation could not restore {sorted(t.name for t in changed)}: {error.orig}."
            + (
                " A session or connection the test left open may hold a lock on those"
                " rows (wfs_leak_check names it)."
                if locked
                else " The database differs from before the test; recreate it."
            )
        ) from error
    finally:
        try:
            if connection.in_transaction():
                connection.rollback()
            _settings_back(connection, values)
            connection.commit()
        except sa.exc.DBAPIError:
            connection.invalidate()  # its settings (checks off) must not go back to the pool
        connection.close()
    return {table.name for table in changed} | set(sequences)


def _spawned() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(_WORKER_PREFIX)}


@pytest.fixture
def wfs_isolation(request: pytest.FixtureRequest) -> t.Iterator[list[str]]:
    """Undo every row the test wrote, on each of the app's engines.

    Before the restore, waits for the ``wfs.spawn`` workers the test started
    (up to 30 s); futures of ``wfs.submit`` must be waited for by the test.

    :return: after the test, the names of what was restored: tables, and
        PostgreSQL sequences.
    """
    state = _app(request)[1]
    saved = {engine: _snapshot(engine) for engine in set(state.engines.values())}
    before = _spawned()
    restored: list[str] = []
    yield restored
    _join(_spawned() - before)
    for engine, snapshot in saved.items():
        restored += _restore(engine, snapshot)


def _join(workers: set[threading.Thread]) -> None:
    for worker in workers:
        worker.join(_JOIN_TIMEOUT)


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

    before = _spawned()
    with signals.session_discarded.connected_to(on_discarded, app):
        yield
        _join(_spawned() - before)  # what they leave counts, whatever the fixture order
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
