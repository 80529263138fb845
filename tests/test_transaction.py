"""Units of work: one commit however many functions join, savepoints, on_commit.

COMMITs are counted where SQLAlchemy hands them to the driver (the engine's
``commit`` event); rows are read back through a separate session, so a test
sees what another request would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import typing as t
import weakref
from concurrent.futures import ThreadPoolExecutor

import click
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import (
    DiscardedWritesWarning,
    DroppedCallbacksWarning,
    HeldConnectionWarning,
    NoAppContextError,
    PendingChangesError,
    UnitOfWorkError,
    WFSession,
    long_running,
    signals,
)
from flask_wfsession.testing import FakeStep

from .conftest import Setup, checked_out, dialect
from .models import Base, Conversation, Message
from .test_dead_connections import SERVER_BACKENDS, backend_id, kill

P = t.ParamSpec("P")
R = t.TypeVar("R")


@contextlib.contextmanager
def counting(engine: sa.Engine) -> t.Iterator[dict[str, int]]:
    """Count the COMMITs, ROLLBACKs and savepoints sent on ``engine`` in the block."""
    counts = {"commit": 0, "rollback": 0, "savepoint": 0, "release_savepoint": 0}

    def counter(name: str) -> t.Callable[..., None]:
        def count(*args: t.Any) -> None:
            counts[name] += 1

        return count

    listeners = [(name, counter(name)) for name in counts]
    for name, fn in listeners:
        sa.event.listen(engine, name, fn)
    try:
        yield counts
    finally:
        for name, fn in listeners:
            sa.event.remove(engine, name, fn)


def titles(setup: Setup) -> list[str]:
    """The committed conversation titles, as another process sees them (its own
    engine, so that its reads are not counted with the app's)."""
    engine = sa.create_engine(setup.engine.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return sorted(connection.scalars(sa.select(Conversation.title)))
    finally:
        engine.dispose()


def add(setup: Setup, title: str, **values: t.Any) -> None:
    setup.wfs.session.add(Conversation(title=title, **values))
    setup.wfs.session.flush()


@contextlib.contextmanager
def units(setup: Setup) -> t.Iterator[list[tuple[str, str]]]:
    """Record the unit signals sent in the block, as (signal, name)."""
    seen: list[tuple[str, str]] = []

    def committed(sender: t.Any, *, name: str, duration: float) -> None:
        assert sender is setup.app and duration >= 0
        seen.append(("committed", name))

    def rolled_back(sender: t.Any, *, name: str, duration: float) -> None:
        assert sender is setup.app and duration >= 0
        seen.append(("rolled back", name))

    with (
        signals.unit_committed.connected_to(committed),
        signals.unit_rolled_back.connected_to(rolled_back),
    ):
        yield seen


# -- Commit once ---------------------------------------------------------------


def test_nested_units_commit_once_when_the_outermost_returns(setup: Setup) -> None:
    wfs = setup.wfs
    seen_inside: list[list[str]] = []

    @wfs.transaction
    def audit(title: str) -> None:
        add(setup, f"audit {title}")

    @wfs.transaction
    def rename(title: str) -> None:
        add(setup, title)
        audit(title)  # joins: commits nothing
        seen_inside.append(titles(setup))

    with units(setup) as seen, counting(setup.engine) as counts, setup.app.app_context():
        rename("chat")
    assert seen_inside == [[]]  # nothing committed before the outermost returned
    assert titles(setup) == ["audit chat", "chat"]
    assert counts["commit"] == 1
    assert seen == [
        ("committed", "test_nested_units_commit_once_when_the_outermost_returns.<locals>.rename")
    ]


def test_with_block_gives_the_session_and_commits_it(setup: Setup) -> None:
    with setup.app.app_context(), counting(setup.engine) as counts:
        with setup.wfs.transaction() as session:
            assert session is setup.wfs.session
            session.add(Conversation(title="from a with block"))
        assert counts["commit"] == 1
    assert titles(setup) == ["from a with block"]


def test_an_exception_rolls_the_whole_unit_back(setup: Setup) -> None:
    wfs = setup.wfs

    @wfs.transaction
    def inner() -> None:
        add(setup, "inner")
        raise LookupError("no such model")

    @wfs.transaction(name="outer")
    def outer() -> None:
        add(setup, "outer")
        inner()

    with units(setup) as seen, counting(setup.engine) as counts, setup.app.app_context():
        with pytest.raises(LookupError):
            outer()
        assert not wfs.session.in_transaction()
    assert counts["commit"] == 0
    assert titles(setup) == []
    assert seen == [("rolled back", "outer")]


def test_a_failed_joined_unit_fails_the_whole_unit_even_if_caught(setup: Setup) -> None:
    """Like Django's atomic: a part that raised cannot be half-kept without a savepoint."""
    wfs = setup.wfs

    @wfs.transaction
    def inner() -> None:
        add(setup, "inner")
        raise LookupError("no such model")

    with setup.app.app_context(), counting(setup.engine) as counts:
        with pytest.raises(UnitOfWorkError, match=r"rolled back, not committed.*'.*inner'"):
            with wfs.transaction(name="outer"):
                add(setup, "outer")
                with contextlib.suppress(LookupError):
                    inner()
    assert counts["commit"] == 0
    assert titles(setup) == []


# -- Savepoints ----------------------------------------------------------------


def test_a_savepoint_undoes_only_its_part(setup: Setup) -> None:
    wfs = setup.wfs
    with setup.app.app_context(), counting(setup.engine) as counts:
        with wfs.transaction():
            add(setup, "before")
            with contextlib.suppress(LookupError), wfs.transaction(savepoint=True):
                add(setup, "undone")
                raise LookupError
            add(setup, "after")
    assert titles(setup) == ["after", "before"]
    assert counts["commit"] == 1
    assert counts["savepoint"] == 1


@pytest.mark.parametrize("flushed", [True, False], ids=["flushed-inside", "flushed-at-release"])
def test_a_savepoint_whose_flush_failed_undoes_only_its_part(setup: Setup, flushed: bool) -> None:
    """The docs' example: a unique violation raised by the savepoint's flush,
    inside the block or when the block ends and the savepoint is released."""
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        with wfs.transaction():
            add(setup, "order")
            wfs.on_commit(lambda: ran.append("order"))
            with pytest.raises(sa.exc.IntegrityError), wfs.transaction(savepoint=True):
                wfs.on_commit(lambda: ran.append("coupon"))
                wfs.session.add(Conversation(id=7, title="coupon"))
                if flushed:
                    wfs.session.flush()
            add(setup, "after")
    assert titles(setup) == ["after", "order", "taken"]
    assert ran == ["order"]


@pytest.mark.parametrize("savepoint", [False, True])
def test_writes_from_before_the_unit_rolled_back_with_it_are_reported(
    setup: Setup, savepoint: bool
) -> None:
    """The outermost unit ends the whole transaction, earlier writes included
    (it needs no savepoint, so ``savepoint=True`` changes nothing): when it
    rolls back, they are not lost silently."""
    wfs = setup.wfs
    with setup.app.app_context():
        add(setup, "order, before the unit")
        with (
            pytest.warns(DiscardedWritesWarning, match="'coupon'.*made before it began"),
            pytest.raises(LookupError),
            wfs.transaction(savepoint=savepoint, name="coupon"),
        ):
            add(setup, "coupon")
            raise LookupError
        with pytest.raises(LookupError), wfs.transaction():  # nothing from before: no report
            add(setup, "undone")
            raise LookupError
    assert titles(setup) == []


def test_a_savepoint_that_succeeds_is_still_undone_with_its_unit(setup: Setup) -> None:
    """The savepoint comes first, after reads only: on SQLite, Python's sqlite3
    module has no transaction open then, and releasing the savepoint would
    commit its part unless the unit begins the transaction first."""
    wfs = setup.wfs
    with setup.app.app_context():
        with pytest.raises(LookupError), wfs.transaction():
            wfs.session.scalars(sa.select(Conversation)).all()
            with wfs.transaction(savepoint=True):
                add(setup, "inside the savepoint")
            raise LookupError
    assert titles(setup) == []


def test_the_outermost_unit_needs_no_savepoint(setup: Setup) -> None:
    with setup.app.app_context(), counting(setup.engine) as counts:
        with setup.wfs.transaction(savepoint=True):
            add(setup, "one")
    assert counts == {"commit": 1, "rollback": 0, "savepoint": 0, "release_savepoint": 0}


# -- Commit and rollback inside a unit -----------------------------------------


def test_commit_inside_a_unit_raises_and_commits_nothing(setup: Setup) -> None:
    wfs = setup.wfs
    commit = setup.db.session.commit if setup.db is not None else lambda: wfs.session.commit()

    @wfs.transaction
    def create() -> None:
        add(setup, "written")
        wfs.session.add(Conversation(title="unflushed"))
        commit()

    with setup.app.app_context(), counting(setup.engine) as counts:
        with pytest.raises(UnitOfWorkError) as raised:
            create()
    message = str(raised.value)
    assert "'session.commit()' at tests/test_transaction.py:" in message
    assert "test_commit_inside_a_unit_raises_and_commits_nothing.<locals>.create" in message
    assert "nothing was committed" in message
    assert counts["commit"] == 0
    assert titles(setup) == []


def test_a_helper_that_commits_cannot_split_the_unit_even_if_the_error_is_caught(
    setup: Setup,
) -> None:
    wfs = setup.wfs
    with setup.app.app_context():
        with pytest.raises(LookupError), wfs.transaction():
            add(setup, "first half")
            with pytest.raises(UnitOfWorkError):
                wfs.session.commit()
            add(setup, "second half")
            raise LookupError
    assert titles(setup) == []


def test_a_commit_on_the_sessions_connection_inside_a_unit_is_refused(setup: Setup) -> None:
    """A repository helper doing Core work commits the connection itself: the
    COMMIT is stopped before the driver sends it."""
    wfs = setup.wfs
    with setup.app.app_context(), counting(setup.engine) as counts:
        with pytest.raises(UnitOfWorkError, match="rolled back, not committed: a COMMIT was sent"):
            with wfs.transaction(name="import"):
                add(setup, "first half")
                with pytest.raises(UnitOfWorkError, match=r"session\.connection\(\)\.commit"):
                    wfs.session.connection().commit()
    assert counts["commit"] == 0
    assert titles(setup) == []


@pytest.mark.parametrize("integration", ["flask-sqlalchemy"], indirect=True)
def test_a_session_removed_before_the_units_first_statement_cannot_split_it(
    setup: Setup,
) -> None:
    """``db.session.remove()`` with no transaction yet ends nothing the unit can
    see; the new session that takes its place cannot commit inside the unit,
    and the unit fails."""
    wfs, db = setup.wfs, t.cast(t.Any, setup.db)
    with (
        pytest.warns(DiscardedWritesWarning, match="teardown"),
        setup.app.app_context(),
        counting(setup.engine) as counts,
    ):
        with pytest.raises(UnitOfWorkError, match="session was closed and replaced"):
            with wfs.transaction(name="import"):
                db.session.remove()  # a helper that "starts clean"
                db.session.add(Conversation(title="first half"))
                with pytest.raises(UnitOfWorkError, match="nothing was committed"):
                    db.session.commit()
    assert counts["commit"] == 0
    assert titles(setup) == []


@pytest.mark.parametrize("integration", ["flask-sqlalchemy"], indirect=True)
def test_a_unit_entered_on_a_session_that_replaced_the_units_own_is_refused(
    setup: Setup,
) -> None:
    wfs, db = setup.wfs, t.cast(t.Any, setup.db)

    @wfs.transaction(name="save")
    def save() -> None:
        add(setup, "inner")

    with (
        pytest.warns(DiscardedWritesWarning, match="teardown"),
        setup.app.app_context(),
    ):
        with pytest.raises(UnitOfWorkError, match="rolled back, not committed"):
            with wfs.transaction(name="outer"):
                db.session.remove()
                db.session.add(Conversation(title="pending"))
                with pytest.raises(UnitOfWorkError, match="'save' was entered inside"):
                    save()
    assert titles(setup) == []


@pytest.mark.parametrize("integration", ["flask-sqlalchemy"], indirect=True)
def test_the_apps_own_sessions_commit_freely_inside_a_unit(setup: Setup) -> None:
    """A session from ``db.session.session_factory()`` is not the unit's, nor one
    that replaced it: it commits on its own, as without the extension."""
    wfs, db = setup.wfs, t.cast(t.Any, setup.db)
    with setup.app.app_context():
        with wfs.transaction():
            wfs.session.execute(sa.select(Conversation.id)).all()  # no write lock (SQLite)
            own = db.session.session_factory()
            try:
                own.add(Conversation(title="own session"))
                own.commit()
            finally:
                own.close()
            add(setup, "unit")
    assert titles(setup) == ["own session", "unit"]


def test_on_a_pool_of_one_shared_connection_another_sessions_commit_is_refused(
    integration: str,
) -> None:
    """Flask-SQLAlchemy's ``sqlite://`` (a StaticPool): a detached session shares
    the unit's one connection, so its COMMIT would commit the unit's writes,
    and its rollback undoes them. The COMMIT is refused, and the unit, whose
    writes are gone, fails instead of committing the rest."""
    app = Flask(__name__)
    wfs = WFSession()
    if integration == "flask-sqlalchemy":
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
        db = SQLAlchemy()
        db.init_app(app)
        wfs.init_app(app, db=db)
    else:
        wfs.init_app(app, engine=sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool))
    with app.app_context():
        assert isinstance(wfs.engine.pool, sa.pool.StaticPool)
        Base.metadata.create_all(wfs.engine)
        with pytest.raises(UnitOfWorkError, match="rolled back, not committed: its writes"):
            with wfs.transaction():
                wfs.session.add(Conversation(title="unit"))
                wfs.session.flush()
                with pytest.raises(UnitOfWorkError, match="StaticPool"):
                    with wfs.detached() as session:
                        session.add(Conversation(title="audit"))
                wfs.session.add(Conversation(title="the rest"))
        assert wfs.session.scalars(sa.select(Conversation.title)).all() == []
        wfs.session.commit()
        wfs.engine.dispose()


@pytest.mark.parametrize("how", ["rollback", "close"])
def test_rollback_or_close_inside_a_unit_raises_and_the_rest_is_not_committed(
    setup: Setup, how: str
) -> None:
    wfs = setup.wfs
    with setup.app.app_context(), counting(setup.engine) as counts:
        with pytest.raises(UnitOfWorkError, match="rolled back, not committed") as ended:
            with wfs.transaction(name="import"):
                add(setup, "first half")
                with pytest.raises(UnitOfWorkError, match="rolled back or closed at tests/"):
                    getattr(wfs.session, how)()
                add(setup, "second half")
        assert "'import'" in str(ended.value)
    assert counts["commit"] == 0
    assert titles(setup) == []


def test_savepoints_the_app_opens_itself_work_inside_a_unit(setup: Setup) -> None:
    """``session.begin_nested()`` is not a commit of the unit."""
    wfs = setup.wfs
    with setup.app.app_context(), wfs.transaction():
        with wfs.session.begin_nested():
            add(setup, "kept")
        with contextlib.suppress(LookupError), wfs.session.begin_nested():
            add(setup, "undone")
            raise LookupError
    assert titles(setup) == ["kept"]


@pytest.mark.parametrize("read_first", [True, False], ids=["after-a-read", "first"])
def test_a_savepoint_the_app_opens_itself_is_undone_with_its_unit(
    setup: Setup, read_first: bool
) -> None:
    """The app's own ``begin_nested()``, before any write: on SQLite the unit
    begins the transaction first, so releasing the savepoint commits nothing."""
    wfs = setup.wfs
    with setup.app.app_context():
        with pytest.raises(LookupError), wfs.transaction():
            if read_first:
                wfs.session.scalars(sa.select(Conversation)).all()
            with wfs.session.begin_nested():
                add(setup, "inside the app's savepoint")
            raise LookupError
        # Outside units the app's savepoints behave exactly as without the extension.
        with wfs.session.begin_nested():
            add(setup, "outside a unit")
        wfs.session.commit()
    assert titles(setup) == ["outside a unit"]


@pytest.mark.parametrize("in_unit", [True, False], ids=["in-a-unit", "outside-units"])
def test_on_commit_inside_the_apps_own_savepoint_whose_flush_failed_is_dropped(
    setup: Setup, in_unit: bool
) -> None:
    """The failed flush ends the app's savepoint without a rollback() call of its own."""
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        with wfs.transaction() if in_unit else contextlib.nullcontext():
            add(setup, "order")
            with pytest.raises(sa.exc.IntegrityError), wfs.session.begin_nested():
                wfs.on_commit(lambda: ran.append("coupon"))
                add(setup, "coupon", id=7)
            wfs.on_commit(lambda: ran.append("order"))
        if not in_unit:
            wfs.session.commit()
    assert titles(setup) == ["order", "taken"]
    assert ran == ["order"]


@pytest.mark.parametrize("how", ["session.commit()", "savepoint.commit()"])
def test_committing_inside_a_savepoint_unit_raises_and_keeps_the_savepoint(
    setup: Setup, how: str
) -> None:
    """The refusal comes before the savepoint is released: the error caught,
    a later error still undoes exactly the savepoint's part."""
    wfs = setup.wfs
    with setup.app.app_context(), wfs.transaction():
        add(setup, "before")
        with contextlib.suppress(LookupError), wfs.transaction(savepoint=True, name="coupon"):
            add(setup, "undone")
            with pytest.raises(UnitOfWorkError, match="nothing was committed"):
                if how == "session.commit()":
                    wfs.session.commit()
                else:
                    t.cast(sa.orm.SessionTransaction, wfs.session.get_nested_transaction()).commit()
            raise LookupError
        add(setup, "after")
    assert titles(setup) == ["after", "before"]


def test_a_savepoint_rolled_back_by_the_app_fails_its_unit(setup: Setup) -> None:
    """Someone else ended the unit's savepoint: the unit cannot vouch for its
    part any more, so it refuses to commit rather than guess."""
    wfs = setup.wfs
    with setup.app.app_context():
        with pytest.raises(UnitOfWorkError, match="savepoint 'coupon' was ended inside it"):
            with wfs.transaction():
                add(setup, "before")
                with wfs.transaction(savepoint=True, name="coupon"):
                    add(setup, "coupon")
                    t.cast(
                        sa.orm.SessionTransaction, wfs.session.get_nested_transaction()
                    ).rollback()
    assert titles(setup) == []


@pytest.mark.parametrize("block", ["begin", "begin_nested"])
def test_a_unit_inside_the_apps_own_transaction_block_is_refused(setup: Setup, block: str) -> None:
    """The app's block ends the transaction; a unit opened inside it would
    commit it halfway."""
    wfs = setup.wfs
    with setup.app.app_context():
        with getattr(wfs.session, block)():
            add(setup, "the block's")
            with pytest.raises(UnitOfWorkError, match=r"inside an open 'session\.begin"):
                with wfs.transaction(name="inner"):
                    add(setup, "never written")
        if block == "begin_nested":
            wfs.session.commit()
    assert titles(setup) == ["the block's"]


# -- Nothing written, nothing committed -----------------------------------------


def test_a_unit_that_sent_nothing_sends_nothing(setup: Setup) -> None:
    wfs = setup.wfs

    @wfs.transaction
    def nothing() -> str:
        return "done"

    with units(setup) as seen, counting(setup.engine) as counts, setup.app.app_context():
        assert nothing() == "done"
        assert checked_out(setup.engine) == 0
    assert counts["commit"] == counts["rollback"] == 0
    assert [s for s, _ in seen] == ["committed"]


def test_a_unit_that_only_read_sends_no_commit_and_keeps_objects_loaded(
    setup: Setup, conversation_id: int
) -> None:
    wfs = setup.wfs
    with setup.app.app_context(), counting(setup.engine) as counts:
        with wfs.transaction():
            conversation = wfs.session.get_one(Conversation, conversation_id)
        assert "title" in conversation.__dict__  # not expired by a commit
        assert counts["commit"] == 0


def test_a_select_that_wrote_is_committed_because_the_database_says_so(
    setup: Setup, backend: str
) -> None:
    """A ``select()`` construct is no write by its statement; PostgreSQL says it was."""
    if dialect(backend) != "postgresql":  # only PostgreSQL runs data-modifying CTEs
        return
    table = Conversation.__table__
    inserted = sa.insert(table).values(title="from a CTE").returning(table.c.id).cte()
    with setup.app.app_context(), counting(setup.engine) as counts:
        with setup.wfs.transaction():
            setup.wfs.session.execute(sa.select(inserted.c.id)).all()
    assert counts["commit"] == 1
    assert titles(setup) == ["from a CTE"]


def test_statements_that_are_not_selects_are_committed_without_asking(setup: Setup) -> None:
    """DDL writes nothing the database counts as a write (nor does ``NOTIFY``, or
    an ``UPDATE`` that only locked a row): the unit commits what it sent."""
    with setup.app.app_context(), counting(setup.engine) as counts:
        with setup.wfs.transaction():
            setup.wfs.session.execute(sa.text("CREATE TABLE wfs_test_ddl (id INTEGER)"))
    engine = sa.create_engine(setup.engine.url, poolclass=sa.pool.NullPool)
    try:
        assert sa.inspect(engine).has_table("wfs_test_ddl")
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE wfs_test_ddl")
    finally:
        engine.dispose()
    assert counts["commit"] == 1


@pytest.mark.parametrize("how", ["flush", "execute"])
def test_an_error_caught_inside_a_unit_never_passes_for_a_commit(
    setup: Setup, backend: str, how: str
) -> None:
    """A unique violation caught inside the unit. A failed flush rolls the
    transaction back (SQLAlchemy), a failed statement aborts it on PostgreSQL
    (the server): the unit fails, and no callback runs. Elsewhere a failed
    statement leaves the transaction going, and the unit commits the rest.
    Either way the signal and the callbacks tell the truth about the rows."""
    wfs = setup.wfs
    ran: list[str] = []
    failed: list[UnitOfWorkError] = []
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        with units(setup) as seen:
            try:
                with wfs.transaction(name="order"):
                    add(setup, "order")
                    wfs.on_commit(lambda: ran.append("confirm"))
                    with pytest.raises(sa.exc.IntegrityError):
                        if how == "flush":
                            add(setup, "duplicate", id=7)
                        else:
                            duplicate = sa.insert(Conversation).values(id=7, title="dup")
                            wfs.session.execute(duplicate)
            except UnitOfWorkError as error:
                failed.append(error)
    if how == "execute" and dialect(backend) != "postgresql":
        assert titles(setup) == ["order", "taken"]
        assert (seen, ran, failed) == ([("committed", "order")], ["confirm"], [])
    else:
        assert titles(setup) == ["taken"]
        assert (seen, ran) == ([("rolled back", "order")], [])
        [error] = failed
        assert "a statement inside it failed, and its error was caught" in str(error)


# -- on_commit -----------------------------------------------------------------


BULK_WRITES: dict[str, t.Callable[[sa.orm.Session], object]] = {
    "bulk insert": lambda session: session.execute(
        sa.insert(Conversation), [{"title": "bulk"}, {"title": "bulk"}]
    ),
    "bulk update": lambda session: session.execute(sa.update(Conversation).values(title="bulk")),
    "raw connection": lambda session: session.connection().exec_driver_sql(
        f"UPDATE {Conversation.__table__.name} SET title = 'bulk'"
    ),
}


@pytest.mark.parametrize("write", BULK_WRITES)
def test_bulk_and_raw_writes_commit_and_roll_back_with_their_unit(
    setup: Setup, conversation_id: int, write: str
) -> None:
    """Writes the session has no object for: the database says they wrote."""
    wfs = setup.wfs
    with setup.app.app_context(), counting(setup.engine) as counts:
        with pytest.raises(LookupError), wfs.transaction():
            BULK_WRITES[write](wfs.session)
            raise LookupError
        assert titles(setup) == ["hello"]
        with wfs.transaction():
            wfs.session.execute(sa.select(Conversation.id)).all()
            BULK_WRITES[write](wfs.session)
    assert counts["commit"] == 1
    expected = ["bulk", "bulk", "hello"] if write == "bulk insert" else ["bulk"]
    assert titles(setup) == expected


def test_on_commit_callbacks_run_in_order_after_the_commit(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[tuple[str, list[str]]] = []

    @wfs.transaction
    def create(title: str) -> None:
        add(setup, title)
        wfs.on_commit(lambda: ran.append(("first", titles(setup))))
        wfs.on_commit(lambda: ran.append(("second", titles(setup))))

    with setup.app.app_context():
        with wfs.transaction():
            create("a")
            assert ran == []  # the joined unit did not commit
    assert ran == [("first", ["a"]), ("second", ["a"])]


def test_on_commit_callbacks_never_run_after_a_rollback(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context():
        with pytest.raises(LookupError), wfs.transaction():
            add(setup, "a")
            wfs.on_commit(lambda: ran.append("after"))
            raise LookupError
        with wfs.transaction():  # a later unit's commit does not run them either
            add(setup, "b")
    assert ran == []


def test_on_commit_inside_a_savepoint_that_rolled_back_is_dropped(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context(), wfs.transaction():
        wfs.on_commit(lambda: ran.append("outer"))
        with contextlib.suppress(LookupError), wfs.transaction(savepoint=True):
            wfs.on_commit(lambda: ran.append("undone"))
            with wfs.transaction(savepoint=True):  # released into the one that rolls back
                wfs.on_commit(lambda: ran.append("undone, nested"))
            raise LookupError
        with wfs.transaction(savepoint=True):
            wfs.on_commit(lambda: ran.append("kept"))
    assert ran == ["outer", "kept"]


def test_on_commit_outside_a_unit_waits_for_the_apps_own_commit(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[list[str]] = []
    commit = setup.db.session.commit if setup.db is not None else lambda: wfs.session.commit()
    with setup.app.app_context():
        add(setup, "legacy")
        wfs.on_commit(lambda: ran.append(titles(setup)))
        assert ran == []
        commit()
        assert ran == [["legacy"]]


def test_on_commit_outside_a_unit_waits_for_a_commit_that_really_commits(
    setup: Setup, backend: str
) -> None:
    """On PostgreSQL a caught statement error aborts the transaction, and the
    app's COMMIT then rolls back: the callbacks do not run."""
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        add(setup, "order")
        wfs.on_commit(lambda: ran.append("confirm"))
        with pytest.raises(sa.exc.IntegrityError):
            wfs.session.execute(sa.insert(Conversation).values(id=7, title="duplicate"))
        wfs.session.commit()
    if dialect(backend) == "postgresql":
        assert (titles(setup), ran) == (["taken"], [])
    else:
        assert (titles(setup), ran) == (["order", "taken"], ["confirm"])


def test_a_failed_commit_does_not_cost_the_next_commit_its_callbacks(
    setup: Setup, backend: str
) -> None:
    """A caught error, then a commit that fails and a rollback: the next commit
    is a real one, and its callbacks run."""
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        wfs.on_commit(lambda: ran.append("first"))
        with pytest.raises(sa.exc.IntegrityError):
            wfs.session.execute(sa.insert(Conversation).values(id=7, title="duplicate"))
        wfs.session.add(Conversation(id=7, title="duplicate again"))  # flushed by the commit
        with pytest.raises(sa.exc.DatabaseError):
            wfs.session.commit()
        wfs.session.rollback()
        wfs.on_commit(lambda: ran.append("second"))
        add(setup, "next")
        wfs.session.commit()
    assert titles(setup) == ["next", "taken"]
    assert ran == ["second"]


def test_a_raising_callback_is_logged_and_the_others_run(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    wfs = setup.wfs
    ran: list[str] = []

    def broken() -> None:
        raise ConnectionError("broker down")

    @wfs.transaction
    def create() -> str:
        add(setup, "kept")
        wfs.on_commit(broken)
        wfs.on_commit(lambda: ran.append("second"))
        return "returned"

    with caplog.at_level(logging.ERROR, "flask_wfsession"), setup.app.app_context():
        assert create() == "returned"
    assert ran == ["second"]
    assert titles(setup) == ["kept"]
    [record] = caplog.records
    assert "'on_commit' callback registered at tests/test_transaction.py:" in record.message
    assert record.exc_info and isinstance(record.exc_info[1], ConnectionError)


def test_callbacks_left_when_the_context_ends_are_reported(setup: Setup) -> None:
    ran: list[str] = []
    with (
        pytest.warns(DroppedCallbacksWarning, match=r"registered at tests/test_transaction.py:\d+"),
        pytest.warns(DiscardedWritesWarning, match="app context teardown"),
        setup.app.app_context(),
    ):
        add(setup, "never committed")
        setup.wfs.on_commit(lambda: ran.append("after"))
    assert ran == []


def test_a_release_before_a_step_is_not_the_commit_callbacks_wait_for(
    setup: Setup, conversation_id: int
) -> None:
    wfs = setup.wfs
    ran: list[list[str]] = []

    @long_running("llm")
    def ask_llm() -> str:
        return "answer"

    with setup.app.app_context(), counting(setup.engine) as counts:
        wfs.session.get_one(Conversation, conversation_id)
        wfs.on_commit(lambda: ran.append(titles(setup)))
        ask_llm()  # ends the read-only transaction: a COMMIT, but not the app's
        assert counts["commit"] == 1 and ran == []
        add(setup, "answer")
        wfs.session.commit()
    assert ran == [["answer", "hello"]]


# -- Long-running steps inside a unit -------------------------------------------


def test_a_step_inside_a_unit_that_wrote_holds_the_unit_whole(setup: Setup) -> None:
    wfs = setup.wfs
    held: list[int] = []

    @long_running("llm")
    def ask_llm() -> str:
        held.append(checked_out(setup.engine))
        return "answer"

    with setup.app.app_context(), counting(setup.engine) as counts:
        with wfs.transaction(name="chat"):
            add(setup, "question")
            with pytest.warns(HeldConnectionWarning, match="inside the unit of work 'chat'"):
                answer = ask_llm()
            assert titles(setup) == []  # the step committed nothing
            add(setup, answer)
    assert held == [1]
    assert counts["commit"] == 1
    assert titles(setup) == ["answer", "question"]


@pytest.mark.parametrize("pending", ["raise", "commit", "rollback"])
def test_no_policy_commits_or_rolls_back_a_unit_that_wrote(setup: Setup, pending: str) -> None:
    wfs = setup.wfs

    @long_running("llm", pending=pending)  # type: ignore[call-overload]
    def ask_llm() -> str:
        return "answer"

    with setup.app.app_context(), counting(setup.engine) as counts:
        with wfs.transaction(name="chat"):
            add(setup, "question")
            if pending == "raise":
                with pytest.raises(PendingChangesError, match="Keep slow steps outside units"):
                    ask_llm()
            else:
                with pytest.warns(HeldConnectionWarning, match="unit of work 'chat'"):
                    ask_llm()
            assert counts["commit"] == counts["rollback"] == 0
            add(setup, "after")
    assert titles(setup) == ["after", "question"]


def test_a_step_inside_a_read_only_unit_releases_it(
    setup: Setup, conversation_id: int, wfs_step: t.Callable[..., FakeStep]
) -> None:
    wfs = setup.wfs
    ask_llm = wfs_step("answer", name="llm")  # the package's own test fixture

    @wfs.transaction
    def chat() -> None:
        conversation = wfs.session.get_one(Conversation, conversation_id)
        answer = ask_llm()
        conversation.messages.append(Message(content=answer))

    with setup.app.app_context(), counting(setup.engine) as counts:
        chat()
    assert ask_llm.held == [0]
    assert counts["commit"] == 2  # the release's end of the read, then the unit's
    engine = sa.create_engine(setup.engine.url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        assert connection.scalars(sa.select(Message.content)).all() == ["answer"]
    engine.dispose()


def test_a_step_inside_a_savepoint_holds(setup: Setup) -> None:
    wfs = setup.wfs
    with setup.app.app_context(), wfs.transaction():
        wfs.session.scalars(sa.select(Conversation)).all()  # read only, but in a savepoint:
        with wfs.transaction(savepoint=True):
            with pytest.warns(HeldConnectionWarning, match="unit of work"), long_running("llm"):
                assert checked_out(setup.engine) == 1


# -- Where units run -------------------------------------------------------------


def test_a_view_that_fails_rolls_back_its_unit(setup: Setup) -> None:
    app, wfs = setup.app, setup.wfs

    @app.post("/conversations/<title>")
    @wfs.transaction
    def create(title: str) -> dict[str, str]:
        add(setup, title)
        if title == "bad":
            raise ValueError(title)
        return {"title": title}

    app.config["TESTING"] = False  # a 500 response, as in production
    client = app.test_client()
    assert client.post("/conversations/good").status_code == 200
    assert client.post("/conversations/bad").status_code == 500
    assert titles(setup) == ["good"]


def test_an_async_view_and_the_units_it_awaits_are_one_unit(setup: Setup) -> None:
    app, wfs = setup.app, setup.wfs

    @wfs.transaction
    def audit(title: str) -> None:
        add(setup, f"audit {title}")

    @wfs.transaction
    async def create(title: str) -> None:
        await asyncio.sleep(0)
        add(setup, title)
        audit(title)

    @app.post("/async/<title>")
    @wfs.transaction
    async def view(title: str) -> dict[str, str]:
        await create(title)
        if title == "bad":
            raise ValueError(title)
        return {"title": title}

    app.config["TESTING"] = False  # a 500 response, as in production
    client = app.test_client()
    with counting(setup.engine) as counts:
        assert client.post("/async/good").status_code == 200
        assert client.post("/async/bad").status_code == 500
    assert counts["commit"] == 1
    assert titles(setup) == ["audit good", "good"]


def test_a_cli_command_runs_as_one_unit(setup: Setup) -> None:
    app, wfs = setup.app, setup.wfs

    @app.cli.command("import-titles")
    @click.argument("names", nargs=-1)
    @wfs.transaction
    def import_titles(names: tuple[str, ...]) -> None:
        for name in names:
            if name == "bad":
                raise click.ClickException("bad title")
            add(setup, name)

    runner = app.test_cli_runner()
    assert runner.invoke(args=["import-titles", "a", "bad", "b"]).exit_code == 1
    assert titles(setup) == []
    assert runner.invoke(args=["import-titles", "a", "b"]).exit_code == 0
    assert titles(setup) == ["a", "b"]


def test_workers_each_commit_their_own_unit_at_the_same_time(setup: Setup) -> None:
    """Two workers hold their units open at once: one decorated function, two
    app contexts, two sessions, two commits (the pool has two connections)."""
    wfs = setup.wfs
    both_inside = threading.Barrier(2, timeout=10)

    @wfs.transaction
    def create(title: str) -> None:
        wfs.session.scalars(sa.select(Conversation)).all()  # each holds a connection
        wfs.session.add(Conversation(title=title))  # flushed by its commit (SQLite: one writer)
        both_inside.wait()

    with setup.app.app_context(), counting(setup.engine) as counts:
        workers = [wfs.spawn(create, title) for title in ("one", "two")]
        for worker in workers:
            worker.join()
    assert counts["commit"] == 2
    assert titles(setup) == ["one", "two"]


def test_async_functions_are_units_too(setup: Setup) -> None:
    wfs = setup.wfs

    @wfs.transaction
    async def create(title: str) -> str:
        await asyncio.sleep(0)
        add(setup, title)
        return title

    with setup.app.app_context():
        assert asyncio.run(create("async")) == "async"
    assert titles(setup) == ["async"]


def test_units_must_end_in_the_order_they_began(setup: Setup) -> None:
    wfs = setup.wfs
    outer, inner = wfs.transaction(name="outer"), wfs.transaction(name="inner")
    with setup.app.app_context():
        outer.__enter__()
        add(setup, "written")
        inner.__enter__()
        with pytest.raises(UnitOfWorkError, match="'outer' ended while a unit entered after"):
            outer.__exit__(None, None, None)
        with pytest.raises(UnitOfWorkError, match=r"rolled back, not committed.*out of order"):
            inner.__exit__(None, None, None)
    assert titles(setup) == []


def test_tasks_started_inside_a_unit_join_it(setup: Setup) -> None:
    """``asyncio.wait_for`` (a task before Python 3.12) and ``asyncio.shield``
    run the awaited unit in a task started inside the unit: part of its call."""
    wfs = setup.wfs

    @wfs.transaction
    async def create(title: str) -> None:
        add(setup, title)

    @wfs.transaction(name="outer")
    async def outer() -> None:
        add(setup, "outer")
        await asyncio.create_task(create("in a task"))
        await asyncio.wait_for(create("in wait_for"), timeout=10)
        await asyncio.shield(create("shielded"))

    with setup.app.app_context(), counting(setup.engine) as counts:
        asyncio.run(outer())
    assert counts["commit"] == 1
    assert titles(setup) == ["in a task", "in wait_for", "outer", "shielded"]


@pytest.mark.parametrize("wrapper", ["ExitStack", "contextmanager"])
def test_units_entered_through_contextlib_can_be_joined(setup: Setup, wrapper: str) -> None:
    """``ExitStack.enter_context`` and an app's own ``@contextmanager`` helper
    enter the unit for the code around them, which joins it."""
    wfs = setup.wfs

    @wfs.transaction
    def audit(action: str) -> None:
        add(setup, action)

    @contextlib.contextmanager
    def atomic() -> t.Iterator[None]:
        with wfs.transaction(name="atomic"):
            yield

    with setup.app.app_context(), counting(setup.engine) as counts:
        with contextlib.ExitStack() as stack:
            stack.enter_context(wfs.transaction() if wrapper == "ExitStack" else atomic())
            add(setup, "work")
            audit("audit")
    assert counts["commit"] == 1
    assert titles(setup) == ["audit", "work"]


def test_threads_and_tasks_the_unit_awaits_join_it(setup: Setup) -> None:
    """``asyncio.to_thread`` runs a function in a thread with the unit's context;
    an eager task's own unit in a nested app context leaves the outer one whole."""
    wfs = setup.wfs

    @wfs.transaction
    def create(title: str) -> None:
        add(setup, title)

    @wfs.transaction(name="outer")
    async def outer() -> None:
        with setup.app.app_context():  # an eager task, say: its own unit, committed
            create("in a nested context")
        await asyncio.to_thread(create, "in a thread")  # after the nested unit ended
        await asyncio.wait_for(asyncio.to_thread(create, "in wait_for"), 10)
        add(setup, "outer")

    with setup.app.app_context():
        asyncio.run(outer())
    assert titles(setup) == ["in a nested context", "in a thread", "in wait_for", "outer"]


def test_a_task_sharing_the_context_cannot_join_another_tasks_unit(setup: Setup) -> None:
    """The second task's unit would silently join the first one's and be undone
    with it: it is refused, and the first unit, shared against its will, too."""
    wfs = setup.wfs
    errors: list[BaseException] = []

    async def both() -> None:
        first_entered = asyncio.Event()
        second_done = asyncio.Event()

        async def first() -> None:
            async with wfs.transaction(name="first"):
                add(setup, "first")
                first_entered.set()
                await second_done.wait()

        async def second() -> None:
            await first_entered.wait()
            try:
                async with wfs.transaction(name="second"):
                    add(setup, "second")
            except UnitOfWorkError as error:
                errors.append(error)
            finally:
                second_done.set()

        await asyncio.gather(first(), second())

    with setup.app.app_context(), pytest.raises(UnitOfWorkError, match=r"'first'.*rolled back"):
        asyncio.run(both())
    [error] = errors
    assert "'second'" in str(error) and "another asyncio task" in str(error)
    assert titles(setup) == []


def test_a_unit_paused_in_a_generator_does_not_swallow_the_callers_unit(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    wfs = setup.wfs

    def rows() -> t.Iterator[int]:
        with wfs.transaction(name="paused"):
            add(setup, "from the generator")
            yield 1

    with caplog.at_level(logging.WARNING, "flask_wfsession"):
        with (
            pytest.warns(DiscardedWritesWarning, match="app context teardown"),
            setup.app.app_context(),
        ):
            paused = rows()
            next(paused)
            with pytest.raises(UnitOfWorkError, match=r"'caller'.*paused generator"):
                with wfs.transaction(name="caller"):
                    add(setup, "from the caller")
    assert "unit of work 'paused'" in caplog.text and "still open" in caplog.text
    assert titles(setup) == []
    paused.close()


def test_one_with_object_serves_several_threads_at_once(setup: Setup) -> None:
    """A ``wfs.transaction()`` object made once (at import time, say) and used by
    two workers whose blocks overlap: each ends its own unit."""
    wfs = setup.wfs
    shared = wfs.transaction(name="shared")
    first_inside, second_inside = threading.Event(), threading.Event()

    def first() -> None:
        with shared:
            wfs.session.add(Conversation(title="first"))
            first_inside.set()
            assert second_inside.wait(10)
        # leaves first, while the second thread is still inside

    def second() -> None:
        assert first_inside.wait(10)
        with shared:
            wfs.session.add(Conversation(title="second"))  # flushed by its commit
            second_inside.set()

    with setup.app.app_context(), ThreadPoolExecutor(2) as executor:
        for worker in [wfs.submit(executor, first), wfs.submit(executor, second)]:
            worker.result()
    assert titles(setup) == ["first", "second"]


# -- Failures --------------------------------------------------------------------


def test_a_failed_commit_rolls_back_drops_callbacks_and_raises(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[str] = []
    with setup.app.app_context(), units(setup) as seen:
        with pytest.raises(sa.exc.IntegrityError), wfs.transaction(name="duplicate"):
            wfs.session.add(Conversation(id=7, title="a"))
            wfs.session.flush()
            wfs.session.expunge_all()
            wfs.session.add(Conversation(id=7, title="b"))  # flushed by the commit: fails
            wfs.on_commit(lambda: ran.append("after"))
        assert not wfs.session.in_transaction()
    assert ran == []
    assert seen == [("rolled back", "duplicate")]
    assert titles(setup) == []


def test_a_raising_signal_receiver_does_not_undo_the_commit(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: t.Any, **kwargs: t.Any) -> None:
        raise RuntimeError("metrics down")

    with signals.unit_committed.connected_to(broken), setup.app.app_context():
        with caplog.at_level(logging.ERROR, "flask_wfsession"):
            with setup.wfs.transaction():
                add(setup, "kept")
        with setup.wfs.transaction():  # the next unit starts clean
            add(setup, "next")
    assert titles(setup) == ["kept", "next"]
    assert "unit-committed" in caplog.text


@pytest.mark.parametrize("first", [False, True], ids=["after-ours", "before-ours"])
def test_a_commit_listener_that_raises_after_the_commit_does_not_hide_it(
    make: t.Callable[..., Setup], first: bool
) -> None:
    """Flask-SQLAlchemy's ``models_committed`` receivers run after the COMMIT:
    one that raises leaves the unit committed, its callbacks run, and its
    error reaches the caller unchanged. Also for a listener the app put
    before ours (``insert=True``)."""
    setup = make(SQLALCHEMY_TRACK_MODIFICATIONS=True)
    wfs = setup.wfs
    ran: list[str] = []

    def broken(*args: t.Any, **kwargs: t.Any) -> None:
        raise RuntimeError("search index down")

    listening: t.ContextManager[object] = contextlib.nullcontext()
    with setup.app.app_context():
        target = setup.db.session if setup.db is not None else wfs.sessionmaker
    if first:
        sa.event.listen(target, "after_commit", broken, insert=True)
    elif setup.db is not None:
        from flask_sqlalchemy.track_modifications import models_committed

        listening = models_committed.connected_to(broken)
    else:
        sa.event.listen(target, "after_commit", broken)
    with listening, setup.app.app_context(), units(setup) as seen:
        with pytest.raises(RuntimeError, match="search index down"):
            with wfs.transaction(name="indexed"):
                add(setup, "kept")
                wfs.on_commit(lambda: ran.append("after"))
    assert titles(setup) == ["kept"]
    assert ran == ["after"]
    assert seen == [("committed", "indexed")]


def test_misuse_raises_errors_that_say_what_to_do(setup: Setup) -> None:
    wfs = setup.wfs
    with pytest.raises(NoAppContextError, match="app_context"), wfs.transaction():
        pass
    with pytest.raises(NoAppContextError):
        wfs.on_commit(lambda: None)
    with pytest.raises(TypeError, match=r"generator function .*'with wfs.transaction\(\):'"):

        @wfs.transaction
        def tokens() -> t.Iterator[str]:
            yield "a"

    with setup.app.app_context(), pytest.raises(TypeError, match="lambda"):
        wfs.on_commit("summarize")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"put '@classmethod' above '@wfs\.transaction'"):

        class Repository:
            @wfs.transaction  # type: ignore[arg-type]
            @classmethod
            def create(cls) -> None:
                pass


def logged(func: t.Callable[P, R]) -> t.Callable[P, R]:
    """Another decorator, under which ``wfs.transaction`` cannot see the function."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return func(*args, **kwargs)

    return wrapper


def test_a_generator_or_coroutine_under_another_decorator_is_seen_through(
    setup: Setup,
) -> None:
    wfs = setup.wfs
    with pytest.raises(TypeError, match="generator function"):

        @wfs.transaction
        @logged
        def tokens() -> t.Iterator[str]:
            yield "a"

    @wfs.transaction
    @logged
    async def create() -> None:
        add(setup, "awaited inside the unit")

    def undecorated() -> t.Iterator[None]:
        add(setup, "never in a unit")
        yield

    @wfs.transaction
    def hides_a_generator() -> t.Iterator[None]:
        return undecorated()

    with setup.app.app_context():
        asyncio.run(create())
        with pytest.raises(TypeError, match=r"returned 'generator' object.*rolled back"):
            hides_a_generator()
    assert titles(setup) == ["awaited inside the unit"]


def test_a_unit_may_return_a_generator_expression_over_what_it_loaded(setup: Setup) -> None:
    @setup.wfs.transaction
    def create(titles_: list[str]) -> t.Iterator[str]:
        made = [Conversation(title=title) for title in titles_]
        setup.wfs.session.add_all(made)
        setup.wfs.session.flush()
        return (c.title for c in made)

    with setup.app.app_context():
        assert list(create(["a", "b"])) == ["a", "b"]
    assert titles(setup) == ["a", "b"]


def test_a_unit_entered_on_an_aborted_transaction_is_refused(setup: Setup, backend: str) -> None:
    """PostgreSQL aborted the transaction after a caught error: no unit can
    commit on it, and it says so at once."""
    wfs = setup.wfs
    with setup.app.app_context():
        wfs.session.add(Conversation(id=7, title="taken"))
        wfs.session.commit()
        with pytest.raises(sa.exc.IntegrityError):
            wfs.session.execute(sa.insert(Conversation).values(id=7, title="duplicate"))
        if dialect(backend) == "postgresql":
            with pytest.raises(UnitOfWorkError, match="entered on a transaction that can no"):
                with wfs.transaction():
                    pass
            wfs.session.rollback()
        with wfs.transaction():
            add(setup, "after")
    assert titles(setup) == ["after", "taken"]


def test_a_unit_keeps_nothing_of_its_callers_alive_in_workers(setup: Setup) -> None:
    """A worker started inside a unit does not inherit it: once the unit and
    its function are over, their locals are freed while the worker runs."""
    wfs = setup.wfs
    release = threading.Event()

    class Big:
        pass

    def view() -> weakref.ref[Big]:
        local = Big()  # in the frame that enters the unit
        with wfs.transaction():
            wfs.spawn(release.wait, 10)
            add(setup, "row")
        return weakref.ref(local)

    with setup.app.app_context():
        alive = view()
    try:
        assert alive() is None
    finally:
        release.set()


def test_an_interrupted_callback_reports_the_ones_it_stopped(setup: Setup) -> None:
    wfs = setup.wfs
    ran: list[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    with setup.app.app_context():
        with (
            pytest.raises(KeyboardInterrupt),
            pytest.warns(DroppedCallbacksWarning, match="interrupted by KeyboardInterrupt"),
        ):
            with wfs.transaction():
                add(setup, "kept")
                wfs.on_commit(lambda: ran.append("first"))
                wfs.on_commit(interrupted)
                wfs.on_commit(lambda: ran.append("never"))
    assert titles(setup) == ["kept"]
    assert ran == ["first"]


@pytest.mark.filterwarnings("ignore::flask_wfsession.IdleInTransactionWarning")  # the kill
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_writes_lost_with_their_connection_fail_the_unit(
    setup: Setup, backend: str, uri: str
) -> None:
    """The server rolled back the first half: the unit must not commit the second."""
    wfs = setup.wfs

    @long_running("llm")
    def ask_llm() -> str:
        return "answer"

    with setup.app.app_context():
        with pytest.raises(UnitOfWorkError, match="writes were lost: the connection died"):
            with wfs.transaction(name="chat"):
                add(setup, "question")
                kill(uri, backend, backend_id(wfs.session, backend))
                with (
                    pytest.warns(DiscardedWritesWarning, match="connection lost"),
                    pytest.raises(PendingChangesError, match="lost"),
                ):
                    ask_llm()
                add(setup, "answer")  # on a new connection
    assert titles(setup) == []
