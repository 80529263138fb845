"""Ownership checks on the paths that send no statement of their own.

``commit()`` and the bulk operations reach the database without passing
``do_orm_execute``: the checks must run before them (``before_commit``,
``after_transaction_create``), before any row is written. The step guard
covers bulk operations the same way.
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm

from flask_wfsession import CrossThreadSessionError, StepGuardError, long_running

from .conftest import Setup, checked_out, run_in_thread
from .models import Conversation, Message


def count_messages(session: orm.Session) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(Message)) or 0


def new_conversation(setup: Setup) -> int:
    with setup.wfs.detached(setup.app) as session:
        conversation = Conversation(title="hello")
        session.add(conversation)
        session.flush()
        return conversation.id


def committed_messages(setup: Setup) -> list[str]:
    with setup.wfs.detached(setup.app) as session:
        return list(session.scalars(sa.select(Message.content).order_by(Message.id)))


BULK: dict[str, t.Callable[[orm.Session, int], None]] = {
    "bulk_insert_mappings": lambda session, cid: session.bulk_insert_mappings(
        Message, [{"conversation_id": cid, "content": f"bulk {i}"} for i in range(3)]
    ),
    "bulk_save_objects": lambda session, cid: session.bulk_save_objects(
        [Message(conversation_id=cid, content=f"bulk {i}") for i in range(3)]
    ),
}


def test_first_use_from_another_thread_does_not_take_the_session(setup: Setup) -> None:
    """The scoped session belongs to its app context from the start, not to its first user."""
    one = sa.select(sa.literal(1))
    with setup.app.app_context():
        session = setup.wfs.session  # not used yet
        error = run_in_thread(lambda: session.execute(one), setup.app.app_context)
        assert isinstance(error, CrossThreadSessionError), error
        assert checked_out(setup.engine) == 0
        assert session.execute(one).scalar() == 1  # the owner still can
    assert checked_out(setup.engine) == 0


@pytest.mark.parametrize("context", ["no app context", "its own app context"])
def test_commit_from_another_thread_raises_and_writes_nothing(
    setup: Setup, conversation_id: int, context: str
) -> None:
    with setup.app.app_context():
        session = setup.wfs.session
        session.add(Message(conversation_id=conversation_id, content="flushed"))
        session.flush()
        session.add(Message(conversation_id=conversation_id, content="unflushed"))
        error = run_in_thread(
            session.commit, setup.app.app_context if context != "no app context" else None
        )
        assert isinstance(error, CrossThreadSessionError), error
        assert "'borrower' tried to use it" in str(error)
        assert checked_out(setup.engine) == 1  # only the owner's connection
        assert committed_messages(setup) == []  # nothing committed
        assert len(session.new) == 1  # nor flushed
        session.commit()  # the owner still can
    assert committed_messages(setup) == ["flushed", "unflushed"]
    assert checked_out(setup.engine) == 0


@pytest.mark.parametrize("op", BULK)
@pytest.mark.parametrize("owner_in_transaction", [False, True], ids=["idle", "in transaction"])
def test_bulk_from_another_thread_raises_before_writing(
    setup: Setup, conversation_id: int, op: str, owner_in_transaction: bool
) -> None:
    with setup.app.app_context():
        session = setup.wfs.session
        if owner_in_transaction:
            assert count_messages(session) == 0
        error = run_in_thread(lambda: BULK[op](session, conversation_id))
        assert isinstance(error, CrossThreadSessionError), error
        # The owner's transaction would see uncommitted rows the borrower wrote on it.
        assert count_messages(session) == 0
        assert checked_out(setup.engine) == 1
        session.commit()
    assert committed_messages(setup) == []
    assert checked_out(setup.engine) == 0


@pytest.mark.parametrize("op", BULK)
@pytest.mark.parametrize("kind", ["scoped", "detached"])
def test_bulk_inside_a_step_on_an_earlier_session_is_guarded(
    make: t.Callable[..., Setup], op: str, kind: str
) -> None:
    setup = make(WFSESSION_GUARD="raise")
    seen: dict[str, t.Any] = {}
    conversation_id = new_conversation(setup)

    @long_running("llm")
    def ask_llm(session: orm.Session) -> None:
        try:
            BULK[op](session, conversation_id)
        except StepGuardError as e:
            seen["error"] = e
        seen["checked out"] = checked_out(setup.engine)
        with setup.wfs.detached() as inner:  # made inside the step: allowed
            BULK[op](inner, conversation_id)

    with setup.app.app_context():
        if kind == "scoped":
            session = setup.wfs.session
            assert count_messages(session) == 0
            ask_llm(session)
            assert count_messages(session) == 3  # only the inner session's rows
        else:
            with setup.wfs.detached() as session:
                assert count_messages(session) == 0
                ask_llm(session)
                assert count_messages(session) == 3
    assert isinstance(seen.get("error"), StepGuardError), seen
    assert "'llm'" in str(seen["error"])
    assert seen["checked out"] == 0  # refused before a connection was taken
    assert committed_messages(setup) == ["bulk 0", "bulk 1", "bulk 2"]
    assert checked_out(setup.engine) == 0


@pytest.mark.parametrize("path", ["execute", "connection"])
def test_a_session_kept_past_its_app_context_is_refused_in_the_next(
    setup: Setup, path: str
) -> None:
    """A request's session kept in a global and used by a later request: refused.

    The first context's teardown closed it; a closed session can be used
    again, but only in its own context (a streamed body), never in another.
    """
    one = sa.select(sa.literal(1))
    with setup.app.app_context():
        kept = setup.wfs.session
        kept.execute(one)
    with setup.app.app_context():
        use = {"execute": lambda: kept.execute(one), "connection": kept.connection}[path]
        with pytest.raises(CrossThreadSessionError, match="A session must stay"):
            use()
        assert setup.wfs.session is not kept
        assert setup.wfs.session.execute(one).scalar() == 1
    kept.close()
    assert checked_out(setup.engine) == 0
