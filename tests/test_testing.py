"""The pytest plugin: each fixture runs in a test file of its own (pytester),
against the same database, and this test checks what that run left behind."""

from __future__ import annotations

import textwrap

import pytest
import sqlalchemy as sa

from .conftest import Setup
from .models import Conversation

HEADER = """
import threading

import pytest
import sqlalchemy as sa
from celery import Celery

from flask_wfsession import (
    HeldConnectionWarning,
    PendingChangesError,
    StepGuardError,
    long_running,
)
from tests.conftest import make_app
from tests.models import Conversation


@pytest.fixture
def app():
    setup = make_app({integration!r}, {backend!r}, {uri!r}, name="inner")
    yield setup.app
    if hasattr(setup.app, "leaked"):  # after the leak check has looked
        setup.app.leaked.close()
    setup.engine.dispose()
"""


def run(pytester: pytest.Pytester, setup: Setup, body: str) -> pytest.RunResult:
    """Run a test file made of the header and ``body``, on ``setup``'s database."""
    integration = "flask-sqlalchemy" if setup.db is not None else "plain"
    header = HEADER.format(
        integration=integration,
        backend=setup.engine.dialect.name.replace("mariadb", "mysql"),
        uri=setup.engine.url.render_as_string(hide_password=False),
    )
    pytester.makepyfile(test_inner=header + textwrap.dedent(body))
    return pytester.runpytest("-p", "no:cacheprovider")


def titles(setup: Setup) -> list[str]:
    with setup.wfs.detached(setup.app) as session:
        return sorted(session.scalars(sa.select(Conversation.title)))


def test_isolation_undoes_what_workers_eager_tasks_and_detached_sessions_wrote(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    with setup.wfs.detached(setup.app) as session:
        session.add(Conversation(title="seed"))
    result = run(
        pytester,
        setup,
        """
        import flask_wfsession.testing

        # monkeypatch first: its patch stays until wfs_isolation has restored.
        def test_writes_everywhere(monkeypatch, app, wfs_isolation):
            wfs = app.extensions["wfsession"]
            tasks = Celery("eager", set_as_current=False)
            tasks.conf.update(task_always_eager=True, task_eager_propagates=True)
            wfs.init_celery(tasks, app)
            restoring = threading.Event()
            restore = flask_wfsession.testing._restore

            def checked_restore(*args):
                restoring.set()
                assert not late.is_alive(), "restored while a worker was still writing"
                return restore(*args)

            monkeypatch.setattr(flask_wfsession.testing, "_restore", checked_restore)

            @tasks.task
            def write_in_task():
                wfs.session.add(Conversation(title="task"))
                wfs.session.commit()

            def write_late():  # still running when the test's body has ended
                restoring.wait(1)  # a slow worker: set at once if the fixture did not wait
                wfs.session.add(Conversation(title="late worker"))
                wfs.session.commit()

            with app.app_context():
                late = wfs.spawn(write_late)
                write_in_task.delay()
                with wfs.detached() as session:
                    session.add(Conversation(title="detached"))
                    seed = sa.select(Conversation).filter_by(title="seed")
                    session.scalars(seed).one().title = "changed"
                wfs.session.add(Conversation(title="view"))
                wfs.session.commit()
                seen = sorted(wfs.session.scalars(sa.select(Conversation.title)))
                wfs.session.commit()
            assert seen == ["changed", "detached", "task", "view"]
        """,
    )
    result.assert_outcomes(passed=1)
    assert titles(setup) == ["seed"]


def test_isolation_restores_related_tables_generated_columns_and_sequences(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    """A parent row changed: its children (cascaded away on delete, or blocking
    it) come back unchanged; a self-reference, a generated column and, on
    PostgreSQL, a sequence restarted by the test are restored too."""
    result = run(
        pytester,
        setup,
        """
        metadata = sa.MetaData()
        parent = sa.Table(
            "wfs_test_parent", metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("price", sa.Integer),
            sa.Column("doubled", sa.Integer, sa.Computed("price * 2", persisted=True)),
        )
        child = sa.Table(
            "wfs_test_child", metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("parent_id", sa.ForeignKey("wfs_test_parent.id", ondelete="CASCADE")),
        )
        node = sa.Table(
            "wfs_test_node", metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("parent_id", sa.ForeignKey("wfs_test_node.id")),
        )
        SEED = {
            parent: [{"id": 1, "price": 5}],
            child: [{"id": 1, "parent_id": 1}, {"id": 2, "parent_id": 1}],
            node: [{"parent_id": None}, {"parent_id": None}],  # ids from the sequence
        }

        @pytest.fixture
        def engine(app):
            engine = app.extensions["wfsession"]._get_state(app).engines[None]
            if engine.dialect.name == "sqlite":
                sa.event.listen(engine, "connect", lambda c, _: c.execute("PRAGMA foreign_keys=ON"))
                engine.dispose()
            metadata.drop_all(engine)
            metadata.create_all(engine)
            with engine.begin() as connection:
                for table, rows in SEED.items():
                    connection.execute(table.insert(), rows)
                connection.execute(node.update().where(node.c.id == 1).values(parent_id=2))
            yield engine
            metadata.drop_all(engine)

        def state(engine):
            with engine.connect() as connection:
                return {t.name: connection.execute(sa.select(t).order_by(t.c.id)).all()
                        for t in (parent, child, node)}

        def test_isolated(engine, wfs_isolation):
            before = state(engine)
            with engine.begin() as connection:
                connection.execute(parent.update().values(price=6))
                connection.execute(node.insert().values(id=3, parent_id=1))
                connection.execute(child.delete().where(child.c.id == 2))
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql("TRUNCATE wfs_test_node RESTART IDENTITY")
            yield_before.append(before)

        yield_before = []

        def test_after(engine):
            assert state(engine) == yield_before[0]
            assert state(engine)["wfs_test_parent"] == [(1, 5, 10)]
            with engine.begin() as connection:  # the next id is free
                connection.execute(node.insert().values(parent_id=None))
        """,
    )
    result.assert_outcomes(passed=2)


def test_isolation_compares_and_restores_stored_values_exactly(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    """SQLite: text a type would convert (a date without microseconds, compact
    JSON) comes back as stored. PostgreSQL: a NaN, which equals nothing, is
    not taken for a change, and a partitioned table's rows come back once."""
    result = run(
        pytester,
        setup,
        """
        SEEDS = {
            "sqlite": [
                "CREATE TABLE wfs_test_raw (id INTEGER PRIMARY KEY, at DATETIME, doc JSON)",
                "INSERT INTO wfs_test_raw VALUES (1, '2024-01-05 10:00:00', '{\\"a\\":1}')",
            ],
            "postgresql": [
                "CREATE TABLE wfs_test_raw (id INTEGER PRIMARY KEY, value FLOAT)",
                "INSERT INTO wfs_test_raw VALUES (1, 'NaN')",
                "CREATE TABLE wfs_test_part (id INTEGER, day DATE) PARTITION BY RANGE (day)",
                "CREATE TABLE wfs_test_part_2024 PARTITION OF wfs_test_part"
                " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
                "INSERT INTO wfs_test_part VALUES (1, '2024-05-01')",
            ],
            "mysql": [
                "CREATE TABLE wfs_test_raw (id INTEGER PRIMARY KEY, value FLOAT)",
                "INSERT INTO wfs_test_raw VALUES (1, 1.5)",
            ],
        }
        DROP = ["DROP TABLE IF EXISTS wfs_test_part", "DROP TABLE IF EXISTS wfs_test_raw"]

        @pytest.fixture
        def engine(app):
            engine = app.extensions["wfsession"]._get_state(app).engines[None]
            name = "mysql" if engine.dialect.name == "mariadb" else engine.dialect.name
            with engine.begin() as connection:
                for statement in DROP + SEEDS[name]:
                    connection.exec_driver_sql(statement)
            yield engine
            with engine.begin() as connection:
                for statement in DROP:
                    connection.exec_driver_sql(statement)

        def raw(engine):
            with engine.connect() as connection:
                tables = ["wfs_test_raw"]
                if engine.dialect.name == "postgresql":
                    tables.append("wfs_test_part")
                return [
                    sorted(map(repr, connection.exec_driver_sql(f"SELECT * FROM {t}").all()))
                    for t in tables
                ]

        seen = {}

        def test_nothing_written(engine, wfs_isolation):
            seen["before"] = raw(engine)
            yield_restored.append(wfs_isolation)

        yield_restored = []

        def test_written(engine, wfs_isolation):
            assert yield_restored[0] == []  # the NaN was no change
            with engine.begin() as connection:
                connection.exec_driver_sql("INSERT INTO wfs_test_raw (id) VALUES (2)")
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql("DELETE FROM wfs_test_part")

        def test_after(engine):
            assert raw(engine) == seen["before"]
        """,
    )
    result.assert_outcomes(passed=3)


def test_the_leak_check_waits_for_workers_and_hears_of_every_discard(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    """A worker still running when the test ends is waited for, not taken
    for a leak; a receiver of ``session_discarded`` that raises does not
    hide the discard from the check."""
    result = run(
        pytester,
        setup,
        """
        import warnings
        from flask_wfsession import signals

        def test_worker_still_working(app, wfs_leak_check, wfs_isolation):
            wfs = app.extensions["wfsession"]
            started = threading.Event()

            def work():
                wfs.session.scalars(sa.select(Conversation)).all()
                started.set()
                wfs.session.add(Conversation(title="worker"))
                wfs.session.commit()

            with app.app_context():
                wfs.spawn(work)
            assert started.wait(10)

        def broken(sender, **kwargs):
            raise RuntimeError("metrics down")

        @pytest.fixture
        def receiver_first(app):
            with signals.session_discarded.connected_to(broken):
                yield

        def test_discarded_writes(receiver_first, app, wfs_leak_check):
            warnings.simplefilter("ignore")
            with app.app_context():
                app.extensions["wfsession"].session.add(Conversation(title="never committed"))
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_discarded_writes left: uncommitted writes*"])
    assert titles(setup) == []


def test_leak_check_names_what_the_test_left(pytester: pytest.Pytester, setup: Setup) -> None:
    result = run(
        pytester,
        setup,
        """
        import warnings

        def test_open_transaction(app, wfs_leak_check):
            with app.app_context():
                session = app.extensions["wfsession"].sessionmaker()
            session.scalars(sa.select(Conversation)).all()
            app.leaked = session  # kept open past the test

        def test_discarded_writes(app, wfs_leak_check):
            warnings.simplefilter("ignore")
            with app.app_context():
                app.extensions["wfsession"].session.add(Conversation(title="never committed"))

        def test_clean(app, wfs_leak_check):
            with app.app_context():
                app.extensions["wfsession"].session.add(Conversation(title="kept"))
                app.extensions["wfsession"].session.commit()

        @pytest.mark.wfsession(leak_check=False)
        def test_expects_its_writes_discarded(app, wfs_leak_check):
            warnings.simplefilter("ignore")
            with app.app_context():
                app.extensions["wfsession"].session.add(Conversation(title="meant to go"))
        """,
    )
    result.assert_outcomes(passed=4, errors=2)  # the check fails them at teardown
    result.stdout.fnmatch_lines(
        [
            "*test_open_transaction left: 1 connection(s) of engine 'default' still checked out*",
            "*test_discarded_writes left: uncommitted writes were discarded: new Conversation*",
        ]
    )
    assert titles(setup) == ["kept"]


def test_strict_policy_raises_unless_the_test_opts_out(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    result = run(
        pytester,
        setup,
        """
        def write_then_step(app):
            with app.app_context():
                wfs = app.extensions["wfsession"]
                wfs.session.add(Conversation(title="pending"))
                wfs.session.flush()
                try:
                    with long_running("llm"):
                        pass
                finally:
                    wfs.session.rollback()

        def test_strict(app, wfs_strict):
            with pytest.raises(PendingChangesError):
                write_then_step(app)

        @pytest.mark.wfsession(strict=False)
        @pytest.mark.filterwarnings("ignore::flask_wfsession.HeldConnectionWarning")
        def test_opted_out(app, wfs_strict):
            write_then_step(app)  # held, as in production

        def test_after(app):
            with pytest.warns(HeldConnectionWarning):  # the app's own policy is back
                write_then_step(app)
        """,
    )
    result.assert_outcomes(passed=3)


def test_fake_steps_return_at_once_and_still_release(
    pytester: pytest.Pytester, setup: Setup
) -> None:
    result = run(
        pytester,
        setup,
        """
        def test_step(app, wfs_step, wfs_strict):
            ask_llm = wfs_step("an answer", name="llm")
            wfs = app.extensions["wfsession"]
            with app.app_context():
                wfs.session.scalars(sa.select(Conversation)).all()
                assert ask_llm("a question") == "an answer"
                with pytest.raises(StepGuardError, match="inside the long-running step 'llm'"):
                    with long_running("llm"):
                        wfs.session.scalars(sa.select(Conversation)).all()
            assert ask_llm.calls == [(("a question",), {})]
            assert ask_llm.held == [0]
        """,
    )
    result.assert_outcomes(passed=1)


def test_fixtures_without_an_app_fixture_say_what_to_define(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        def test_no_app(wfs_isolation):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*use your 'app' fixture: define one that returns the Flask app*"])
