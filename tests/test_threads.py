"""Workers from wfs.spawn / wfs.submit, refused hand-overs, cross-thread use."""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import copy_current_request_context, g, has_app_context, has_request_context

from flask_wfsession import AttachedObjectError, CrossThreadSessionError, long_running

from .conftest import Setup, backend_fixture, checked_out, run_in_thread
from .models import Conversation, Message

# Also through PgBouncer in transaction mode.
backend = backend_fixture(pgbouncer=True)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def test_submit_runs_in_a_new_context_with_its_own_session(
    setup: Setup, conversation_id: int
) -> None:
    def worker(conversation_id: int) -> dict[str, t.Any]:
        conversation = setup.wfs.session.get_one(Conversation, conversation_id)
        setup.wfs.session.add(Message(conversation_id=conversation.id, content="summary"))
        setup.wfs.session.commit()
        return {
            "session": setup.wfs.session,
            "g": g._get_current_object(),
            "app context": has_app_context(),
            "request context": has_request_context(),
            "request id": request_id.get(),
        }

    @setup.app.post("/summarize")
    def summarize() -> str:
        request_id.set("req-42")
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            seen = setup.wfs.submit(executor, worker, conversation_id).result()
        assert seen["session"] is not setup.wfs.session
        assert seen["g"] is not g._get_current_object()
        assert seen["app context"] and not seen["request context"]
        assert seen["request id"] == "req-42"  # context variables carried over
        return "ok"

    assert setup.app.test_client().post("/summarize").status_code == 200
    assert checked_out(setup.engine) == 0
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Message.content)).all() == ["summary"]


def test_submit_exception_reaches_the_caller(setup: Setup) -> None:
    def worker() -> None:
        setup.wfs.session.execute(sa.text("SELECT 1"))
        raise ValueError("node failed")

    with setup.app.app_context(), concurrent.futures.ThreadPoolExecutor(1) as executor:
        future = setup.wfs.submit(executor, worker)
        with pytest.raises(ValueError, match="node failed"):
            future.result()
    assert checked_out(setup.engine) == 0


def test_spawn_starts_a_thread_and_logs_its_failure(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def worker() -> None:
        done.set()
        raise ValueError("background job failed")

    with setup.app.app_context():
        thread = setup.wfs.spawn(worker)
    thread.join()
    assert done.is_set()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "failed" in failures[0].getMessage() and failures[0].exc_info is not None


def attached(setup: Setup, conversation_id: int) -> Conversation:
    return setup.wfs.session.get_one(Conversation, conversation_id)


@pytest.mark.parametrize(
    "hand_over",
    [
        lambda c: ((c,), {}),
        lambda c: (([c],), {}),
        lambda c: (({"conversation": c},), {}),
        lambda c: ((), {"conversation": c}),
    ],
    ids=["argument", "in a list", "in a dict", "keyword"],
)
def test_attached_objects_are_refused(
    setup: Setup,
    conversation_id: int,
    hand_over: t.Callable[[Conversation], tuple[tuple[t.Any, ...], dict[str, t.Any]]],
) -> None:
    with setup.app.app_context(), concurrent.futures.ThreadPoolExecutor(1) as executor:
        args, kwargs = hand_over(attached(setup, conversation_id))
        with pytest.raises(AttachedObjectError) as info:
            setup.wfs.submit(executor, print, *args, **kwargs)
        with pytest.raises(TypeError):
            setup.wfs.spawn(print, *args, **kwargs)
    message = str(info.value)
    assert f"Conversation {conversation_id!r} is attached to a session" in message
    assert f"'wfs.session.get(Conversation, {conversation_id!r})'" in message


def test_ids_and_unattached_objects_are_accepted(setup: Setup, conversation_id: int) -> None:
    with setup.app.app_context(), concurrent.futures.ThreadPoolExecutor(1) as executor:
        transient = Conversation(title="not in a session")
        future = setup.wfs.submit(executor, lambda c, i: (c.title, i), transient, conversation_id)
        assert future.result() == ("not in a session", conversation_id)


def test_scoped_session_used_from_another_thread_raises(setup: Setup) -> None:
    with setup.app.app_context():
        session = setup.wfs.session
        session.execute(sa.text("SELECT 1"))
        error = run_in_thread(lambda: session.execute(sa.text("SELECT 2")))
        assert checked_out(setup.engine) == 1  # only the owner's connection
    assert isinstance(error, CrossThreadSessionError)
    message = str(error)
    owner = threading.current_thread().name
    assert f"belongs to the app context of thread {owner!r}" in message
    assert "thread 'borrower' tried to use it" in message
    assert "'wfs.spawn()'" in message and "'wfs.detached()'" in message


def test_scoped_session_used_from_another_app_context_raises(setup: Setup) -> None:
    """A thread in an app context of its own may not use this context's session."""
    with setup.app.app_context():
        session = setup.wfs.session
        session.execute(sa.text("SELECT 1"))

        def borrower() -> None:
            with setup.app.app_context():
                session.commit()

        assert isinstance(run_in_thread(borrower), CrossThreadSessionError)
        session.execute(sa.text("SELECT 2"))  # still the owner's, still working


def test_copy_current_request_context_gives_the_thread_its_own_session(setup: Setup) -> None:
    """Flask's helper copies the request into a new app context: a new session."""
    seen: dict[str, object] = {}

    @setup.app.get("/")
    def view() -> str:
        seen["view"] = setup.wfs.session
        setup.wfs.session.execute(sa.text("SELECT 1"))

        @copy_current_request_context
        def worker() -> None:
            seen["worker"] = setup.wfs.session
            setup.wfs.session.execute(sa.text("SELECT 2"))

        assert run_in_thread(worker) is None
        return "ok"

    assert setup.app.test_client().get("/").status_code == 200
    assert seen["worker"] is not seen["view"]


def test_detached_session_handed_to_another_thread_raises(setup: Setup) -> None:
    with setup.wfs.detached(setup.app) as session:
        error = run_in_thread(lambda: session.execute(sa.text("SELECT 1")))
    assert isinstance(error, CrossThreadSessionError)


def test_flush_from_another_thread_raises(setup: Setup) -> None:
    with setup.wfs.detached(setup.app) as session:
        session.add(Conversation(title="half-made"))
        error = run_in_thread(session.flush)
        session.expunge_all()
    assert isinstance(error, CrossThreadSessionError)


def test_many_workers_with_slow_steps_on_a_pool_of_two(setup: Setup, conversation_id: int) -> None:
    workers = 8
    barrier = threading.Barrier(workers, timeout=10)

    @long_running("llm")
    def slow_step() -> None:
        barrier.wait()  # passes only if all workers are in the step at once

    def node(conversation_id: int, n: int) -> int:
        title = setup.wfs.session.get_one(Conversation, conversation_id).title
        slow_step()
        setup.wfs.session.add(Message(conversation_id=conversation_id, content=f"{title} {n}"))
        setup.wfs.session.commit()
        return n

    with setup.app.app_context(), concurrent.futures.ThreadPoolExecutor(workers) as executor:
        futures = [setup.wfs.submit(executor, node, conversation_id, n) for n in range(workers)]
        assert sorted(f.result() for f in futures) == list(range(workers))
    assert checked_out(setup.engine) == 0
    with setup.wfs.detached(setup.app) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == workers


def test_sessionmaker_sessions_belong_to_the_thread_that_made_them(setup: Setup) -> None:
    with setup.app.app_context():
        factory: orm.sessionmaker[orm.Session] = setup.wfs.sessionmaker
    made: list[orm.Session] = []
    assert run_in_thread(lambda: made.append(factory())) is None
    with pytest.raises(CrossThreadSessionError):
        made[0].execute(sa.text("SELECT 1"))
    made[0].close()
