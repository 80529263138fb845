"""Streamed responses hold no connection while the body is sent."""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Response, abort, stream_with_context

from flask_wfsession import DiscardedWritesWarning, long_running, signals

from .conftest import Setup, backend_fixture, checked_out
from .models import Conversation

# Also through PgBouncer in transaction mode.
backend = backend_fixture(pgbouncer=True)


def add_stream_view(setup: Setup, events: list[str]) -> None:
    @setup.app.get("/stream")
    def stream() -> Response:
        title = setup.wfs.session.scalars(sa.select(Conversation.title)).first()

        @long_running("llm")
        def llm_tokens() -> t.Iterator[str]:
            yield from ("a", "b", "c")

        def body() -> t.Iterator[str]:
            try:
                yield f"{title}:"
                for token in llm_tokens():
                    # Work between chunks opens a transaction; it is released
                    # after the chunk is produced.
                    setup.wfs.session.execute(sa.text("SELECT 1"))
                    yield token
            finally:
                events.append("body closed")

        return Response(stream_with_context(body()), mimetype="text/plain")

    @setup.app.teardown_appcontext
    def note_teardown(exc: BaseException | None) -> None:
        events.append("teardown")


def test_no_connection_held_while_streaming(setup: Setup, conversation_id: int) -> None:
    events: list[str] = []
    add_stream_view(setup, events)
    response = setup.app.test_client().get("/stream", buffered=False)
    chunks = []
    held = []
    for chunk in response.response:
        chunks.append(chunk)
        held.append(checked_out(setup.engine))
    response.close()
    assert b"".join(chunks) == b"hello:abc"
    assert held == [0, 0, 0, 0]
    # Flask 3.1 also tears the context down once when the view returns.
    assert events[-2:] == ["body closed", "teardown"]


def test_abandoned_stream_closes_its_sessions(setup: Setup, conversation_id: int) -> None:
    events: list[str] = []
    add_stream_view(setup, events)
    response = setup.app.test_client().get("/stream", buffered=False)
    assert next(iter(response.response)) == b"hello:"
    response.close()  # the client went away
    assert events[-2:] == ["body closed", "teardown"]
    assert checked_out(setup.engine) == 0


def add_uncommitted_stream_view(setup: Setup) -> None:
    @setup.app.get("/stream")
    def stream() -> Response:
        setup.wfs.session.add(Conversation(title="never committed"))

        def body() -> t.Iterator[str]:
            yield "x"

        return Response(body())


def test_uncommitted_writes_before_a_stream_keep_the_response(setup: Setup) -> None:
    """As without the extension: 200, nothing committed; the loss is reported."""
    add_uncommitted_stream_view(setup)
    with pytest.warns(DiscardedWritesWarning, match="new Conversation"):
        response = setup.app.test_client().get("/stream")
    assert (response.status_code, response.data) == (200, b"x")
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Conversation)).all() == []


def test_uncommitted_writes_before_a_stream_are_refused_when_strict(
    make: t.Callable[..., Setup],
) -> None:
    setup = make(WFSESSION_PENDING="raise")
    setup.app.config["PROPAGATE_EXCEPTIONS"] = False
    add_uncommitted_stream_view(setup)
    with pytest.warns(DiscardedWritesWarning):
        assert setup.app.test_client().get("/stream").status_code == 500
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Conversation)).all() == []


@pytest.mark.parametrize("status", [400, 404, 500])
def test_error_responses_are_not_streams(make: t.Callable[..., Setup], status: int) -> None:
    """abort() bodies look streamed to Werkzeug; they keep the normal teardown."""
    setup = make(WFSESSION_PENDING="commit")
    setup.app.config["PROPAGATE_EXCEPTIONS"] = False
    released: list[object] = []

    @setup.app.post("/fail")
    def fail() -> str:
        setup.wfs.session.add(Conversation(title="of a failed request"))
        abort(status)

    with signals.session_released.connected_to(lambda app, **kw: released.append(kw)):
        with pytest.warns(DiscardedWritesWarning, match="app context teardown"):
            assert setup.app.test_client().post("/fail").status_code == status
    assert released == []
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Conversation)).all() == []


def test_streams_can_be_left_alone(make: t.Callable[..., Setup], conversation_id: int) -> None:
    setup = make(WFSESSION_RELEASE_STREAMS=False)
    events: list[str] = []
    add_stream_view(setup, events)
    response = setup.app.test_client().get("/stream", buffered=False)
    chunks = iter(response.response)
    assert [next(chunks), next(chunks)] == [b"hello:", b"a"]
    assert checked_out(setup.engine) == 1  # held: the default would release it
    response.close()
    assert checked_out(setup.engine) == 0


def test_a_session_kept_by_the_view_is_released_and_closed_with_the_stream(
    setup: Setup, conversation_id: int
) -> None:
    """The view keeps its session (and an object of it) in variables the body uses.

    Flask 3.1 tears the context down when the view returns, closing that
    session, then sends the body in the same context: the session, used
    again, is released between chunks and closed after the last one.
    """
    sessions: list[t.Any] = []
    held_in_step: list[int] = []

    @long_running("llm")
    def llm_tokens() -> t.Iterator[str]:
        for token in ("a", "b"):
            held_in_step.append(checked_out(setup.engine))
            yield token

    @setup.app.get("/kept")
    def kept() -> Response:
        session = setup.wfs.session
        sessions.append(session)
        conversation = session.get_one(Conversation, conversation_id)

        def body() -> t.Iterator[str]:
            for token in llm_tokens():  # each token: the read before it is released
                yield f"{token}{session.merge(conversation).title} "

        return Response(stream_with_context(body()), mimetype="text/plain")

    response = setup.app.test_client().get("/kept", buffered=False)
    chunks, held = [], []
    for chunk in response.response:
        chunks.append(chunk)
        held.append(checked_out(setup.engine))
    response.close()
    assert b"".join(chunks) == b"ahello bhello "
    assert held_in_step == [0, 0]
    assert held == [0, 0]
    assert not sessions[0].in_transaction()  # closed with the stream
    assert checked_out(setup.engine) == 0
