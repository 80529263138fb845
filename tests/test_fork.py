"""Fork safety: a child process never reuses the parent's pooled connections."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm

from flask_wfsession import CrossThreadSessionError

from .conftest import Setup, checked_out
from .models import Conversation

CONNECTION_ID = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
    "sqlite": "SELECT 1",
}


# Python 3.12+ warns that forking a process with threads may deadlock.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_child_uses_new_connections_and_parent_keeps_its_own(setup: Setup, backend: str) -> None:
    query = sa.text(CONNECTION_ID[backend])
    pool = t.cast(sa.pool.QueuePool, setup.engine.pool)
    with setup.app.app_context():
        parent_connection = setup.wfs.session.scalar(query)
    assert pool.checkedin() == 1  # the parent's connection waits in the pool

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        try:
            inherited = t.cast(sa.pool.QueuePool, setup.engine.pool).checkedin()
            with setup.app.app_context():
                sender.send({"inherited": inherited, "connection": setup.wfs.session.scalar(query)})
        except BaseException as e:
            sender.send({"error": repr(e)})

    process = context.Process(target=child)
    process.start()
    result = receiver.recv()
    process.join()
    assert "error" not in result, result
    assert result["inherited"] == 0
    if backend != "sqlite":
        assert result["connection"] != parent_connection
    with setup.app.app_context():
        assert setup.wfs.session.scalar(query) == parent_connection


# What the fork tests compare: the server connection a session's query ran on.
BACKEND_ID = {"postgresql": sa.func.pg_backend_pid, "mysql": sa.func.connection_id}


def backend_id(session: orm.Session, backend: str) -> int | None:
    """The server connection's id (a select(): textual SQL counts as a write); SQLite: None."""
    if backend == "sqlite":
        return None
    return int(session.execute(sa.select(BACKEND_ID[backend]())).scalar_one())


def dbapi_connection(session: orm.Session) -> t.Any:
    return session.connection().connection.dbapi_connection


def in_child(fn: t.Callable[[], dict[str, t.Any]]) -> dict[str, t.Any]:
    """Run ``fn`` in a forked child; it collects garbage before it exits.

    The child's garbage collection runs the finalisers of everything it
    inherited and dropped, the parent's connections included: none may send
    a byte on, or close, the parent's side.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read)
            try:
                result = fn()
            except BaseException as e:
                result = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            result["collected"] = True
            with os.fdopen(write, "w") as out:
                json.dump(result, out)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as received:
        data = received.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, (status, data)
    return t.cast(dict[str, t.Any], json.loads(data))


def committed_elsewhere(uri: str) -> int:
    """Committed conversations, counted on a connection of its own."""
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        found = conn.scalar(sa.select(sa.func.count()).select_from(Conversation)) or 0
    engine.dispose()
    return found


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_fork_while_holding_a_read_only_transaction(
    setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    with setup.app.app_context():
        session = setup.wfs.session
        conversation = session.get_one(Conversation, conversation_id)
        transaction = session.get_transaction()
        parent_dbapi = [dbapi_connection(session)]  # the child drops it before collecting
        parent_id = backend_id(session, backend)
        if backend == "postgresql":
            started = session.execute(sa.select(sa.func.transaction_timestamp())).scalar_one()
        count = sa.select(sa.func.count()).select_from(Conversation)
        assert session.scalar(count) == 1  # MariaDB: the snapshot is taken here
        assert checked_out(setup.engine) == 1

        def child() -> dict[str, t.Any]:
            seen = {"id": backend_id(session, backend)}  # the first query in the child
            seen["same dbapi connection"] = dbapi_connection(session) is parent_dbapi[0]
            seen["title"] = session.get_one(Conversation, conversation_id).title
            parent_dbapi.clear()
            session.close()
            return seen

        seen = in_child(child)
        assert "error" not in seen, seen
        assert seen["collected"] is True
        assert seen["same dbapi connection"] is False
        assert seen["title"] == "hello"
        if backend != "sqlite":
            assert seen["id"] != parent_id

        # A row committed meanwhile elsewhere: the parent's transaction must not see it
        # (MariaDB's repeatable read) if it is still the same transaction.
        with setup.wfs.detached() as other:
            other.add(Conversation(title="meanwhile"))
        assert committed_elsewhere(uri) == 2
        # The parent: same connection, same server backend, same transaction.
        assert session.get_transaction() is transaction and session.in_transaction()
        assert dbapi_connection(session) is parent_dbapi[0]
        assert backend_id(session, backend) == parent_id
        if backend == "postgresql":
            now = session.execute(sa.select(sa.func.transaction_timestamp())).scalar_one()
            assert now == started
        if backend == "mysql":
            assert session.scalar(count) == 1
        assert conversation.title == "hello"
        session.commit()
    assert checked_out(setup.engine) == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_fork_after_a_write_refuses_the_parents_transaction_in_the_child(
    setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    with setup.app.app_context():
        session = setup.wfs.session
        session.add(Conversation(title="parent's"))
        session.flush()
        parent_dbapi = [dbapi_connection(session)]
        parent_id = backend_id(session, backend)

        def child() -> dict[str, t.Any]:
            seen: dict[str, t.Any] = {}
            for name, use in {
                "execute": lambda: session.execute(sa.select(Conversation.id)).all(),
                "commit": session.commit,
                "flush": lambda: (session.add(Conversation(title="child's")), session.flush()),
            }.items():
                try:
                    use()
                except CrossThreadSessionError as e:
                    seen[name] = str(e)
            session.rollback()
            seen["id"] = backend_id(session, backend)
            seen["same dbapi connection"] = dbapi_connection(session) is parent_dbapi[0]
            titles = session.scalars(sa.select(Conversation.title).order_by(Conversation.id))
            seen["titles"] = titles.all()
            parent_dbapi.clear()
            session.close()
            return seen

        seen = in_child(child)
        assert "error" not in seen, seen
        assert seen["collected"] is True
        for name in ("execute", "commit", "flush"):
            assert name in seen, (name, seen)
            assert "forked" in seen[name] and "'session.rollback()'" in seen[name], seen[name]
        assert seen["same dbapi connection"] is False
        if backend != "sqlite":
            assert seen["id"] != parent_id
        # The child saw only committed rows: not the parent's write, not its own.
        assert seen["titles"] == ["hello"]

        assert dbapi_connection(session) is parent_dbapi[0]
        assert backend_id(session, backend) == parent_id
        assert session.scalars(sa.select(Conversation.title)).all().count("parent's") == 1
        session.commit()
    assert checked_out(setup.engine) == 0
    assert committed_elsewhere(uri) == 2
    with setup.wfs.detached(setup.app) as session:
        titles = session.scalars(sa.select(Conversation.title).order_by(Conversation.id))
        assert titles.all() == ["hello", "parent's"]
