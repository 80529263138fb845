"""The release decides from the database, never splits a unit of work, and reports.

Each case here was committed or dropped silently by the first release, which
classified statements instead of asking the database.
"""

from __future__ import annotations

import logging
import logging.config
import threading
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm

from flask_wfsession import (
    DiscardedWritesWarning,
    HeldConnectionWarning,
    PendingChangesError,
    long_running,
    signals,
)

from .conftest import BACKENDS, Setup, backend_fixture, checked_out, dialect, helper_args
from .models import Conversation, Message

# Also through PgBouncer in transaction mode.
backend = backend_fixture(pgbouncer=True)

INSERT = "INSERT INTO wfs_test_conversation (title) VALUES ('hidden')"


def _returning(session: orm.Session) -> None:
    statement = sa.text(f"{INSERT} RETURNING id").columns(id=sa.Integer)
    session.execute(statement).all()


def _cte_in_select(session: orm.Session) -> None:
    table = Conversation.__table__
    inserted = sa.insert(table).values(title="hidden").returning(table.c.id).cte()
    session.execute(sa.select(inserted.c.id)).all()


def _explain_analyze(session: orm.Session) -> None:
    session.execute(sa.text(f"EXPLAIN ANALYZE {INSERT}")).all()


def _two_statements(session: orm.Session) -> None:
    session.execute(sa.text(f"SELECT 1; {INSERT}"))


def _bulk_mappings(session: orm.Session) -> None:
    session.bulk_insert_mappings(Conversation, [{"title": "hidden"}])  # type: ignore[arg-type]


def _bulk_objects(session: orm.Session) -> None:
    session.bulk_save_objects([Conversation(title="hidden")])


def _raw_connection(session: orm.Session) -> None:
    session.connection().exec_driver_sql(INSERT)


HIDDEN_WRITES: dict[str, tuple[t.Callable[[orm.Session], None], tuple[str, ...]]] = {
    "text RETURNING as a select": (_returning, ("sqlite", "postgresql", "mysql")),
    "data-modifying CTE in a select()": (_cte_in_select, ("postgresql",)),
    "EXPLAIN ANALYZE INSERT": (_explain_analyze, ("postgresql",)),
    "SELECT 1; INSERT": (_two_statements, ("postgresql",)),
    "bulk_insert_mappings": (_bulk_mappings, ("sqlite", "postgresql", "mysql")),
    "bulk_save_objects": (_bulk_objects, ("sqlite", "postgresql", "mysql")),
    "SQL on session.connection()": (_raw_connection, ("sqlite", "postgresql", "mysql")),
}


def titles(setup: Setup) -> list[str]:
    with setup.wfs.detached(setup.app) as session:
        return sorted(session.scalars(sa.select(Conversation.title)))


@pytest.mark.parametrize("write", HIDDEN_WRITES)
def test_hidden_writes_are_held_not_committed(setup: Setup, backend: str, write: str) -> None:
    run, backends = HIDDEN_WRITES[write]
    if dialect(backend) not in backends:  # the backend cannot run this statement at all
        return
    held = []
    # The view ends without committing: the teardown rolls back and reports it.
    with pytest.warns(DiscardedWritesWarning, match="writes already sent"):
        with setup.app.app_context():
            run(setup.wfs.session)
            with pytest.warns(HeldConnectionWarning, match="writes already sent"):
                with long_running("llm"):
                    held.append(checked_out(setup.engine))
            assert titles(setup) == []  # not committed by the release
    assert held == [1]
    assert titles(setup) == []


@pytest.mark.parametrize("write", HIDDEN_WRITES)
def test_hidden_writes_are_refused_when_strict(
    make: t.Callable[..., Setup], backend: str, write: str
) -> None:
    run, backends = HIDDEN_WRITES[write]
    if dialect(backend) not in backends:
        return
    setup = make(WFSESSION_PENDING="raise")
    with setup.app.app_context():
        run(setup.wfs.session)
        with pytest.raises(PendingChangesError, match="writes already sent"):
            with long_running("llm"):
                pass
        setup.wfs.session.rollback()
    assert titles(setup) == []


LOCK_WAITS = {
    "postgresql": "SELECT count(*) FROM pg_locks WHERE NOT granted",
    "mysql": "SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'",
}


@pytest.mark.filterwarnings("ignore::flask_wfsession.HeldConnectionWarning")
@pytest.mark.parametrize(
    "backend", [b for b in BACKENDS if b in ("postgresql", "mysql", "pgbouncer")], indirect=True
)
def test_select_for_update_keeps_its_lock_through_the_step(
    setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    """Two workers increment one counter around a slow step: no update is lost.

    The first one's step lasts until the second has either read the row
    (its lock was dropped: the update will be lost) or is seen waiting for
    the lock by the database.
    """
    first_locked, second_read = threading.Event(), threading.Event()
    actions: list[str] = []
    errors: list[BaseException] = []
    monitor = sa.create_engine(uri, poolclass=sa.pool.NullPool, connect_args=helper_args(backend))

    def second_blocked_or_read() -> None:
        # InnoDB serves INNODB_TRX from a cache that a read within 100 ms of the
        # previous one does not refresh: poll less often than that.
        with monitor.connect() as conn:
            for _ in range(60):  # bounded: 9 s
                if second_read.wait(0.15) or conn.scalar(sa.text(LOCK_WAITS[dialect(backend)])):
                    return
                conn.rollback()

    def increment(first: bool) -> None:
        try:
            with setup.app.app_context():
                session = setup.wfs.session
                statement = sa.select(Conversation).where(Conversation.id == conversation_id)
                row = session.scalars(statement.with_for_update()).one()
                (first_locked if first else second_read).set()
                with long_running("llm"):
                    if first:
                        second_blocked_or_read()
                row.title = str(int(row.title) + 1)
                session.commit()
        except BaseException as e:
            errors.append(e)

    with setup.wfs.detached(setup.app) as session:
        session.get_one(Conversation, conversation_id).title = "0"
    with signals.session_released.connected_to(lambda app, **kw: actions.append(kw["action"])):
        first = threading.Thread(target=increment, args=(True,))
        first.start()
        assert first_locked.wait(10)
        second = threading.Thread(target=increment, args=(False,))
        second.start()
        first.join()
        second.join()
    monitor.dispose()
    assert errors == []
    assert actions == ["held", "held"]
    assert titles(setup) == ["2"]


def test_unflushed_changes_cross_the_step_and_commit_exactly(
    setup: Setup, conversation_id: int
) -> None:
    """Load a row, add one, change another, delete a third; step; commit.

    No connection during the step, and the commit sends exactly the
    statements it sends without a step in between.
    """

    def unit_of_work(step: bool) -> tuple[list[str], list[int]]:
        statements: list[str] = []
        held: list[int] = []

        def record(conn: t.Any, cursor: t.Any, statement: str, params: t.Any, *_: t.Any) -> None:
            if not statement.lstrip().upper().startswith(("SELECT", "SHOW")):
                statements.append(" ".join(statement.split()))

        with setup.app.app_context():
            session = setup.wfs.session
            session.expire_on_commit = False
            conversation = session.get_one(Conversation, conversation_id)
            gone, kept = session.scalars(
                sa.select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id)
            ).all()
            conversation.title = f"renamed {step}"
            session.add(Message(conversation_id=conversation_id, content=f"new 1 {step}"))
            session.add(Message(conversation=conversation, content=f"new 2 {step}"))
            session.delete(gone)
            kept.content = f"edited {step}"
            if step:
                with long_running("llm"):
                    held.append(checked_out(setup.engine))
            sa.event.listen(setup.engine, "before_cursor_execute", record)
            try:
                session.commit()
            finally:
                sa.event.remove(setup.engine, "before_cursor_execute", record)
        return statements, held

    def reset() -> None:
        with setup.wfs.detached(setup.app) as session:
            session.execute(sa.delete(Message))
            session.add_all(Message(conversation_id=conversation_id, content=c) for c in ("a", "b"))

    reset()
    without_step, _ = unit_of_work(step=False)
    reset()
    with_step, held = unit_of_work(step=True)
    assert held == [0]
    assert with_step == without_step
    assert any(s.startswith("DELETE") for s in with_step)
    with setup.wfs.detached(setup.app) as session:
        contents = sorted(session.scalars(sa.select(Message.content)))
        title = session.get_one(Conversation, conversation_id).title
    assert contents == ["edited True", "new 1 True", "new 2 True"]
    assert title == "renamed True"


@pytest.mark.parametrize("policy", ["hold", "commit", "rollback"])
def test_a_step_inside_a_detached_block_never_splits_it(setup: Setup, policy: t.Any) -> None:
    """The block still commits all or nothing: here it fails after the step."""
    with setup.app.app_context(), pytest.raises(ZeroDivisionError):
        with setup.wfs.detached() as session:
            session.add(Conversation(title="before the step"))
            session.flush()
            with pytest.warns(HeldConnectionWarning, match="'wfs.detached\\(\\)' block"):
                with long_running("llm", pending=policy):
                    pass
            session.add(Conversation(title="after the step"))
            1 / 0  # noqa: B018
    assert titles(setup) == []


def test_a_read_only_detached_block_is_released(setup: Setup) -> None:
    with setup.app.app_context(), setup.wfs.detached() as session:
        session.scalars(sa.select(Conversation)).all()
        session.add(Conversation(title="unflushed, carried"))
        with long_running("llm"):
            assert checked_out(setup.engine) == 0
    assert titles(setup) == ["unflushed, carried"]


def test_sessionmaker_sessions_of_the_thread_are_released(setup: Setup) -> None:
    """A repository's session opened before the step gives its connection back."""
    with setup.app.app_context():
        repository_session = setup.wfs.sessionmaker()
        repository_session.scalars(sa.select(Conversation)).all()
        assert checked_out(setup.engine) == 1
        with long_running("llm"):
            assert checked_out(setup.engine) == 0
        repository_session.add(Conversation(title="saved after the step"))
        repository_session.commit()
        repository_session.close()
    assert titles(setup) == ["saved after the step"]


def test_held_steps_are_reported_with_the_call_site(setup: Setup) -> None:
    released: list[dict[str, t.Any]] = []
    with (
        signals.session_released.connected_to(lambda app, **kw: released.append(kw)),
        setup.app.app_context(),
    ):
        setup.wfs.session.add(Conversation(title="flushed"))
        setup.wfs.session.flush()
        with pytest.warns(HeldConnectionWarning) as warned:
            with long_running("llm"):  # the line the report names
                line = _this_line() - 1
        setup.wfs.session.rollback()
    message = str(warned[0].message)
    assert f"entered at tests/test_release.py:{line}" in message
    assert "the long-running step 'llm'" in message
    assert "Commit before the step" in message
    assert [(r["step"], r["action"]) for r in released] == [("llm", "held")]


def _this_line() -> int:
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


ALEMBIC_LOGGING = """
[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""


def test_reports_survive_logging_file_config(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Alembic's env.py calls fileConfig(), which disables existing loggers."""
    config = tmp_path / "alembic.ini"
    config.write_text(ALEMBIC_LOGGING)
    logger = logging.getLogger("flask_wfsession")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    disabled = {
        name: each.disabled
        for name, each in logging.root.manager.loggerDict.items()
        if isinstance(each, logging.Logger)
    }
    try:
        logging.config.fileConfig(config)
        assert logger.disabled
        with pytest.warns(DiscardedWritesWarning), setup.app.app_context():
            setup.wfs.session.add(Conversation(title="forgotten"))
    finally:
        root.handlers[:], root.level = saved
        for name, was in disabled.items():
            logging.getLogger(name).disabled = was
    assert "WARNI [flask_wfsession] Discarded uncommitted writes" in capsys.readouterr().err
    assert not logger.disabled
