"""Flask ``async def`` views: asgiref runs the coroutine in another thread.

The request's session belongs to its app context, so a sync
``before_request`` (the Flask-Login pattern) and the async view share it
although they run in different threads; a thread outside the context may not.
"""

from __future__ import annotations

import asyncio
import threading
import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import g

from flask_wfsession import CrossThreadSessionError, HeldConnectionWarning, long_running, signals

from .conftest import Setup, checked_out
from .models import Conversation, Message


def count_messages(setup: Setup) -> int:
    with setup.wfs.detached(setup.app) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message)) or 0


def title_of(session: orm.Session, conversation_id: int) -> str:
    """A query every time (``session.get`` could answer from the identity map)."""
    query = sa.select(Conversation.title).where(Conversation.id == conversation_id)
    return session.execute(query).scalar_one()


def test_sync_before_request_then_async_view_with_a_step(
    setup: Setup, conversation_id: int
) -> None:
    seen: dict[str, t.Any] = {}

    @setup.app.before_request
    def load_user() -> None:
        g.user = title_of(setup.wfs.session, conversation_id)
        seen["before_request thread"] = threading.get_ident()
        seen["before_request session"] = setup.wfs.session

    @long_running("llm")
    async def ask_llm(prompt: str) -> str:
        seen.setdefault("checked out in step", []).append(checked_out(setup.engine))
        await asyncio.sleep(0)
        return prompt.upper()

    @setup.app.post("/chat")
    async def chat() -> str:
        seen["view thread"] = threading.get_ident()
        session = setup.wfs.session
        seen["same session"] = session is seen["before_request session"]
        assert session.in_transaction()  # the before_request's transaction
        answer = await ask_llm(title_of(session, conversation_id))
        assert title_of(session, conversation_id) == g.user  # works after the step
        with setup.wfs.detached() as detached:
            title_of(detached, conversation_id)
            answer += await ask_llm("!")  # a read-only detached block is released too
        session.add(Message(conversation_id=conversation_id, content=answer))
        session.commit()
        return answer

    response = setup.app.test_client().post("/chat")
    assert response.status_code == 200, response.text
    assert response.text == "HELLO!"
    assert seen["view thread"] != seen["before_request thread"]  # really another thread
    assert seen["same session"] is True
    assert seen["checked out in step"] == [0, 0]
    assert checked_out(setup.engine) == 0
    assert count_messages(setup) == 1


def test_async_view_with_pending_writes_holds_under_default_policy(
    setup: Setup, conversation_id: int
) -> None:
    seen: dict[str, t.Any] = {}
    actions: list[str] = []

    @long_running("llm")
    async def ask_llm() -> str:
        seen["checked out in step"] = checked_out(setup.engine)
        return "answer"

    @setup.app.post("/write")
    async def write() -> str:
        session = setup.wfs.session
        session.add(Message(conversation_id=conversation_id, content="question"))
        session.flush()
        seen["in transaction before"] = session.get_transaction()
        answer = await ask_llm()
        seen["same transaction after"] = session.get_transaction() is seen["in transaction before"]
        session.add(Message(conversation_id=conversation_id, content=answer))
        session.commit()
        return answer

    def on_released(sender: t.Any, *, action: str, **_: t.Any) -> None:
        actions.append(action)

    with signals.session_released.connected_to(on_released):
        with pytest.warns(HeldConnectionWarning, match="'llm'"):
            response = setup.app.test_client().post("/write")
    assert response.status_code == 200, response.text
    assert seen["checked out in step"] == 1  # held: the written transaction kept its connection
    assert seen["same transaction after"] is True
    assert actions == ["held"]
    assert checked_out(setup.engine) == 0
    assert count_messages(setup) == 2


@pytest.mark.parametrize("context", ["no app context", "its own app context"])
def test_plain_thread_cannot_use_the_async_views_session(
    setup: Setup, conversation_id: int, context: str
) -> None:
    errors: list[BaseException] = []
    seen: dict[str, int] = {}

    def borrower(session: orm.Session) -> None:
        try:
            if context == "no app context":
                title_of(session, conversation_id)
            else:
                with setup.app.app_context():
                    title_of(session, conversation_id)
        except BaseException as e:
            errors.append(e)

    @setup.app.get("/borrow")
    async def borrow() -> str:
        session = setup.wfs.session
        title = title_of(session, conversation_id)
        thread = threading.Thread(target=borrower, args=(session,), name="borrower")
        thread.start()
        thread.join()
        seen["checked out"] = checked_out(setup.engine)
        return title_of(session, conversation_id) + title  # the owner still can

    response = setup.app.test_client().get("/borrow")
    assert response.status_code == 200, response.text
    assert response.text == "hellohello"
    assert len(errors) == 1 and isinstance(errors[0], CrossThreadSessionError), errors
    assert "'borrower' tried to use it" in str(errors[0])
    assert seen["checked out"] == 1  # only the owner's connection
    assert checked_out(setup.engine) == 0
