"""Telemetry finds the undecorated slow call and names who holds the connections."""

from __future__ import annotations

import json
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from flask_wfsession import (
    IdleInTransactionWarning,
    PoolTimeoutError,
    long_running,
    signals,
)

from .conftest import Setup, make_app
from .models import Base, Conversation

HERE = Path(__file__).name

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


@pytest.fixture
def watched(integration: str, backend: str, uri: str) -> t.Iterator[t.Callable[..., Setup]]:
    made: list[Setup] = []

    def factory(pool: dict[str, t.Any] | None = None, **config: t.Any) -> Setup:
        pool = pool or {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5}
        config.setdefault("WFSESSION_IDLE_WARNING", 5.0)
        setup = make_app(integration, backend, uri, pool=pool, **config)
        Base.metadata.create_all(setup.engine)
        made.append(setup)
        return setup

    yield factory
    for setup in made:
        setup.engine.dispose()
    cleanup = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    Base.metadata.drop_all(cleanup)
    cleanup.dispose()


def add_slow_view(setup: Setup, slow: t.Callable[[], None]) -> dict[str, int]:
    lines: dict[str, int] = {}

    @setup.app.get("/report")
    def report() -> str:
        if setup.db is not None:  # through Flask-SQLAlchemy's own helper
            setup.db.one_or_404(sa.select(sa.literal(1)))
            lines["before"] = _line() - 1
        else:
            setup.wfs.session.scalars(sa.select(Conversation)).all()
            lines["before"] = _line() - 1
        slow()
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        lines["after"] = _line() - 1
        return "ok"

    return lines


def _line() -> int:
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def test_an_undecorated_slow_call_is_reported_once(watched: t.Callable[..., Setup]) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=0.5)
    lines = add_slow_view(setup, lambda: time.sleep(0.7))  # the slow call under test
    reports: list[dict[str, t.Any]] = []
    with signals.idle_in_transaction.connected_to(lambda app, **kw: reports.append(kw), setup.app):
        with pytest.warns(IdleInTransactionWarning, match="decorate that call"):
            assert setup.app.test_client().get("/report").status_code == 200
    assert len(reports) == 1
    report = reports[0]
    assert report["endpoint"] == "report"
    assert report["duration"] >= 0.7
    assert report["began_at"] == f"tests/{HERE}:{lines['before']}"
    assert report["idle_from"] == f"tests/{HERE}:{lines['before']}"
    assert report["idle_until"] == f"tests/{HERE}:{lines['after']}"


def test_the_same_call_decorated_is_not_reported(watched: t.Callable[..., Setup]) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=0.5)
    add_slow_view(setup, long_running("llm")(lambda: time.sleep(0.7)))
    reports: list[object] = []
    with signals.idle_in_transaction.connected_to(lambda app, **kw: reports.append(kw)):
        assert setup.app.test_client().get("/report").status_code == 200
    assert reports == []


def test_on_by_default(integration: str, backend: str, uri: str) -> None:
    setup = make_app(integration, backend, uri)
    assert setup.app.config["WFSESSION_IDLE_WARNING"] == 1.0


def test_a_gap_before_the_end_of_the_request_is_reported(
    watched: t.Callable[..., Setup],
) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=0.5)
    lines: list[int] = []

    @setup.app.get("/last")
    def last() -> str:
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        lines.append(_line() - 1)
        time.sleep(0.7)  # the undecorated slow call, and no statement after it
        return "ok"

    reports: list[dict[str, t.Any]] = []
    with signals.idle_in_transaction.connected_to(lambda app, **kw: reports.append(kw), setup.app):
        with pytest.warns(IdleInTransactionWarning):
            assert setup.app.test_client().get("/last").status_code == 200
    assert [(r["endpoint"], r["idle_from"], r["idle_until"]) for r in reports] == [
        ("last", f"tests/{HERE}:{lines[0]}", "the app context's teardown")
    ]


def test_raw_sql_on_the_sessions_connection_is_timed(watched: t.Callable[..., Setup]) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=0.5)
    lines: list[int] = []

    @setup.app.get("/raw")
    def raw() -> str:
        setup.wfs.session.connection().execute(sa.text("SELECT 1"))
        lines.append(_line() - 1)
        time.sleep(0.7)
        setup.wfs.session.connection().execute(sa.text("SELECT 2"))
        lines.append(_line() - 1)
        return "ok"

    reports: list[dict[str, t.Any]] = []
    with signals.idle_in_transaction.connected_to(lambda app, **kw: reports.append(kw), setup.app):
        with pytest.warns(IdleInTransactionWarning):
            assert setup.app.test_client().get("/raw").status_code == 200
    assert [(r["idle_from"], r["idle_until"]) for r in reports] == [
        (f"tests/{HERE}:{lines[0]}", f"tests/{HERE}:{lines[1]}")
    ]


def test_a_raising_receiver_fails_nothing(watched: t.Callable[..., Setup]) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=0.5)
    add_slow_view(setup, lambda: time.sleep(0.7))

    def failing(app: object, **kwargs: object) -> None:
        raise RuntimeError("the alerting backend is down")

    with signals.idle_in_transaction.connected_to(failing, setup.app):
        with pytest.warns(IdleInTransactionWarning):
            assert setup.app.test_client().get("/report").status_code == 200
    with setup.app.app_context():
        assert setup.wfs.pool_status()[None]["checked_out"] == 0


@pytest.mark.parametrize("value", ["none", None])
def test_switched_off(
    watched: t.Callable[..., Setup], value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = watched(WFSESSION_IDLE_WARNING=value)
    assert setup.app.config["WFSESSION_IDLE_WARNING"] == value
    add_slow_view(setup, lambda: time.sleep(0.2))
    reports: list[object] = []
    with signals.idle_in_transaction.connected_to(lambda app, **kw: reports.append(kw)):
        assert setup.app.test_client().get("/report").status_code == 200
    assert reports == []
    # Metrics still need the holders while opentelemetry-api is installed...
    with setup.app.app_context():
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        assert len(setup.wfs.pool_status()[None]["holders"]) == 1
    # ...and without it, nothing is watched at all.
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
    bare = watched(WFSESSION_IDLE_WARNING=value)
    with bare.app.app_context():
        bare.wfs.session.scalars(sa.select(Conversation)).all()
        assert bare.wfs.pool_status()[None]["holders"] == []
        assert type(bare.engine.pool) in (sa.pool.QueuePool, sa.pool.StaticPool)


@pytest.mark.filterwarnings("ignore::flask_wfsession.IdleInTransactionWarning")  # the holder's
def test_a_pool_timeout_names_the_holder(watched: t.Callable[..., Setup]) -> None:
    setup = watched({"pool_size": 1, "max_overflow": 0, "pool_timeout": 1})
    holding, done = threading.Event(), threading.Event()
    began: list[int] = []

    @setup.app.get("/holder")
    def holder() -> str:
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        began.append(_line() - 1)
        holding.set()
        done.wait(10)  # an undecorated slow call
        return "ok"

    @setup.app.get("/waiter")
    def waiter() -> str:
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        return "ok"

    status: list[int] = []
    first = threading.Thread(
        target=lambda: status.append(setup.app.test_client().get("/holder").status_code)
    )
    first.start()
    assert holding.wait(10)
    try:
        with pytest.raises(PoolTimeoutError) as info:
            setup.app.test_client().get("/waiter")
        with setup.app.app_context():
            snapshot = setup.wfs.pool_status()
    finally:
        done.set()
        first.join()
    assert status == [200]
    error = info.value
    assert isinstance(error, sa.exc.TimeoutError)  # existing except clauses still work
    assert "QueuePool limit of size 1 overflow 0 reached" in str(error)
    assert "'holder'" in str(error) and "decorate the slow call" in str(error)
    assert [h["endpoint"] for h in error.holders] == ["holder"]
    assert error.holders[0]["began_at"] == f"tests/{HERE}:{began[0]}"
    assert error.holders[0]["state"].startswith("idle in transaction")
    assert json.loads(json.dumps(snapshot))["null"]["checked_out"] == 1


def test_pool_status_counts_connections_beyond_the_pool_size(
    watched: t.Callable[..., Setup],
) -> None:
    setup = watched({"pool_size": 1, "max_overflow": 2, "pool_timeout": 5})
    with setup.app.app_context():
        assert setup.wfs.pool_status()[None]["overflow"] == 0  # none opened yet
        with setup.engine.connect(), setup.engine.connect():
            status = setup.wfs.pool_status()[None]
    assert (status["size"], status["overflow"], status["checked_out"]) == (1, 1, 2)


def test_pool_status_lists_holders(watched: t.Callable[..., Setup]) -> None:
    setup = watched()
    with setup.app.app_context():
        assert setup.wfs.pool_status() == {
            None: {"size": 2, "overflow": 0, "checked_out": 0, "holders": []}
        }
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        status = setup.wfs.pool_status()[None]
        with long_running("llm"):
            during = setup.wfs.pool_status()[None]
    assert status["checked_out"] == 1
    (holder,) = status["holders"]
    assert holder["thread"] == threading.current_thread().name
    assert holder["state"] == "idle in transaction for 0.0 s"
    assert during["checked_out"] == 0 and during["holders"] == []


def test_a_held_step_shows_in_pool_status(watched: t.Callable[..., Setup]) -> None:
    setup = watched()
    with setup.app.app_context():
        setup.wfs.session.add(Conversation(title="flushed"))
        setup.wfs.session.flush()
        with pytest.warns(Warning), long_running("llm"):
            (holder,) = setup.wfs.pool_status()[None]["holders"]
        setup.wfs.session.rollback()
    assert holder["state"] == "held by the 'hold' policy through step 'llm'"


POOL = "db.client.connection.pool.name"


def points(name: str, pool: str) -> list[t.Any]:
    """The data points of metric ``name`` for ``pool`` (cumulative since the start)."""
    data = reader.get_metrics_data()
    return [
        point
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if point.attributes[POOL] == pool
    ]


def totals(pool: str) -> dict[str, float]:
    return {
        "uses": sum(p.count for p in points("db.client.connection.use_time", pool)),
        "waits": sum(p.count for p in points("db.client.connection.wait_time", pool)),
        "timeouts": sum(p.value for p in points("db.client.connection.timeouts", pool)),
    }


def test_opentelemetry_connection_metrics(
    watched: t.Callable[..., Setup], integration: str, backend: str
) -> None:
    name = f"metrics-{integration}-{backend}"  # a pool name of this test's own
    setup = watched({"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}, name=name)
    before = totals(f"{name}:default")
    with setup.app.app_context():
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        counts = points("db.client.connection.count", f"{name}:default")
        with pytest.raises(PoolTimeoutError), setup.engine.connect():
            pass
        setup.wfs.session.close()
    after = totals(f"{name}:default")
    assert after["uses"] == before["uses"] + 1  # the session's connection, returned
    assert after["waits"] == before["waits"] + 2  # its checkout and the one that timed out
    assert after["timeouts"] == before["timeouts"] + 1
    assert {p.attributes["db.client.connection.state"]: p.value for p in counts} == {
        "used": 1,
        "idle": 0,
    }


def test_a_worker_threads_connection_is_named(watched: t.Callable[..., Setup]) -> None:
    setup = watched()
    holding, done = threading.Event(), threading.Event()

    def work() -> None:
        with setup.app.app_context():
            setup.wfs.session.scalars(sa.select(Conversation)).all()
            holding.set()
            done.wait(10)

    worker = threading.Thread(target=work, name="summarizer")
    worker.start()
    try:
        assert holding.wait(10)
        with setup.app.app_context():
            holders = setup.wfs.pool_status()[None]["holders"]
    finally:
        done.set()
        worker.join()
    assert [(h["endpoint"], h["thread"]) for h in holders] == [("summarizer", "summarizer")]
    assert holders[0]["state"].startswith("idle in transaction")
