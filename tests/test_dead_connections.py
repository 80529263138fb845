"""A session whose server connection was killed, before or during a step.

PostgreSQL (``pg_terminate_backend``) and MariaDB (``KILL CONNECTION``) only:
SQLite has no server to lose, so these tests are parametrized over the server
backends explicitly.
"""

from __future__ import annotations

import time
import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm

from flask_wfsession import (
    DiscardedWritesWarning,
    PendingChangesError,
    long_running,
    signals,
)

from . import conftest
from .conftest import Setup, checked_out
from .models import Conversation, Message

SERVER_BACKENDS = ["postgresql", "mysql"]
# select() statements: a textual SELECT would count as "may have written".
BACKEND_ID = {"postgresql": sa.func.pg_backend_pid, "mysql": sa.func.connection_id}


def backend_id(session: orm.Session, backend: str) -> int:
    return int(session.execute(sa.select(BACKEND_ID[backend]())).scalar_one())


def kill(uri: str, backend: str, victim: int) -> None:
    """Kill server connection ``victim`` from another connection; return once it is gone."""
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        if backend == "postgresql":
            # With a timeout, PostgreSQL waits until the backend has exited.
            query = "SELECT pg_terminate_backend(:id, 10000)"
            assert conn.execute(sa.text(query), {"id": victim}).scalar() is True
        else:
            conn.execute(sa.text(f"KILL CONNECTION {int(victim)}"))
            alive = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = :id"
            deadline = time.monotonic() + 10
            while conn.execute(sa.text(alive), {"id": victim}).scalar():
                assert time.monotonic() < deadline, f"connection {victim} outlived KILL"
                time.sleep(0.01)
    engine.dispose()


def idle_in_transaction(uri: str, backend: str, victim: int) -> bool:
    """Whether server connection ``victim`` sits in an open transaction, doing nothing."""
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        if backend == "postgresql":
            query = "SELECT state FROM pg_stat_activity WHERE pid = :id"
            found = conn.execute(sa.text(query), {"id": victim}).scalar() == "idle in transaction"
        else:
            query = "SELECT COMMAND FROM information_schema.PROCESSLIST WHERE ID = :id"
            # MariaDB shows no transaction state here; the session's own
            # in_transaction() answers for that part.
            found = conn.execute(sa.text(query), {"id": victim}).scalar() == "Sleep"
    engine.dispose()
    return found


def title_of(setup: Setup, conversation_id: int) -> str:
    with setup.wfs.detached(setup.app) as session:
        return session.get_one(Conversation, conversation_id).title


def count_messages(setup: Setup) -> int:
    with setup.wfs.detached(setup.app) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message)) or 0


@pytest.mark.filterwarnings("ignore::flask_wfsession.IdleInTransactionWarning")  # the kill
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_killed_while_idle_in_a_read_only_transaction(
    setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    ran: list[int] = []

    @long_running("llm")
    def ask_llm() -> None:
        ran.append(checked_out(setup.engine))

    with setup.app.app_context():
        session = setup.wfs.session
        conversation = session.get_one(Conversation, conversation_id)
        before = backend_id(session, backend)
        assert session.in_transaction() and idle_in_transaction(uri, backend, before)
        conversation.title = "renamed"  # unflushed: carried through the step
        kill(uri, backend, before)
        ask_llm()
        assert ran == [0]
        after = backend_id(session, backend)  # a new connection, no error
        assert after != before
        assert conversation.title == "renamed"
        session.commit()
    assert checked_out(setup.engine) == 0
    assert title_of(setup, conversation_id) == "renamed"


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_killed_after_a_flushed_write_loses_it_and_the_step_does_not_run(
    setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    ran: list[bool] = []
    discarded: list[dict[str, t.Any]] = []

    @long_running("llm")
    def ask_llm() -> None:
        ran.append(True)

    def on_discarded(sender: t.Any, **kwargs: t.Any) -> None:
        discarded.append(kwargs)

    with setup.app.app_context():
        session = setup.wfs.session
        session.add(Message(conversation_id=conversation_id, content="flushed"))
        session.flush()
        before = backend_id(session, backend)
        session.add(Conversation(title="unflushed"))  # after the query: no autoflush
        kill(uri, backend, before)
        with signals.session_discarded.connected_to(on_discarded):
            with pytest.warns(DiscardedWritesWarning, match="connection lost") as warned:
                with pytest.raises(PendingChangesError, match="lost; the step did not run"):
                    ask_llm()
        assert ran == []
        # Usable afterwards, on a new connection, with nothing left of the lost work.
        assert backend_id(session, backend) != before
        assert not session.new
        session.add(Message(conversation_id=conversation_id, content="redone"))
        session.commit()
    assert len(discarded) == 1 and discarded[0]["session"] is session
    assert "'llm'" in discarded[0]["reason"]
    assert discarded[0]["changes"] == [
        "new Conversation (not yet inserted)",
        "writes sent in the transaction",
    ]
    [message] = [str(w.message) for w in warned if w.category is DiscardedWritesWarning]
    assert "writes sent in the transaction" in message and "'llm'" in message
    assert checked_out(setup.engine) == 0
    assert count_messages(setup) == 1  # only the redone one


@pytest.fixture
def pre_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines with pool_pre_ping and a pool of one: the step's connection comes back."""
    options = conftest.engine_options

    def with_pre_ping(backend: str) -> dict[str, t.Any]:
        return {**options(backend), "pool_pre_ping": True, "pool_size": 1}

    monkeypatch.setattr(conftest, "engine_options", with_pre_ping)


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_pre_ping_recovers_a_connection_killed_during_the_step(
    pre_ping: None, setup: Setup, backend: str, uri: str, conversation_id: int
) -> None:
    seen: dict[str, int] = {}

    @long_running("llm")
    def ask_llm(victim: int) -> None:
        seen["checked out in step"] = checked_out(setup.engine)
        kill(uri, backend, victim)  # the released connection, waiting in the pool

    @setup.app.get("/chat")
    def chat() -> dict[str, t.Any]:
        session = setup.wfs.session
        title = session.get_one(Conversation, conversation_id).title
        before = backend_id(session, backend)
        ask_llm(before)
        after = backend_id(session, backend)
        session.add(Message(conversation_id=conversation_id, content=title))
        session.commit()
        return {"before": before, "after": after}

    response = setup.app.test_client().get("/chat")
    assert response.status_code == 200, response.text
    assert response.json is not None and response.json["before"] != response.json["after"]
    assert seen["checked out in step"] == 0
    assert checked_out(setup.engine) == 0
    assert count_messages(setup) == 1
