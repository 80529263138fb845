"""Receivers cannot break the extension: a raising one fails only its own step or request.

Flask's threaded servers (gunicorn gthread, werkzeug) run many requests on
one thread, so state a failed step leaves behind would fail every later
request on that thread. Each test here raises from a receiver, then checks
the next step and request on the same thread.
"""

from __future__ import annotations

import logging
import typing as t

import pytest
import sqlalchemy as sa
from flask import current_app

from flask_wfsession import DiscardedWritesWarning, StepGuardError, long_running, signals

from .conftest import Setup, checked_out
from .models import Conversation


class ReceiverDown(Exception):
    """A metrics or alerting backend that is down."""


def failing(*args: t.Any, **kwargs: t.Any) -> None:
    raise ReceiverDown


@pytest.fixture
def strict(make: t.Callable[..., Setup]) -> Setup:
    return make(WFSESSION_GUARD="raise")


def add_chat_view(setup: Setup) -> None:
    @long_running("llm")
    def ask() -> int:
        return checked_out(setup.engine)

    @setup.app.get("/chat")
    def chat() -> dict[str, int]:
        setup.wfs.session.scalars(sa.select(Conversation)).all()
        held = ask()
        count = len(setup.wfs.session.scalars(sa.select(Conversation)).all())
        return {"held": held, "count": count}


@pytest.mark.parametrize("signal", [signals.long_running_started, signals.long_running_finished])
def test_a_raising_step_receiver_fails_only_its_own_request(strict: Setup, signal: t.Any) -> None:
    add_chat_view(strict)
    strict.app.config["PROPAGATE_EXCEPTIONS"] = False
    client = strict.app.test_client()
    with signal.connected_to(failing, strict.app):
        assert client.get("/chat").status_code == 500
    # The same thread serves the next requests: no step mark was left behind.
    for _ in range(3):
        response = client.get("/chat")
        assert response.status_code == 200
        assert response.get_json()["held"] == 0
    assert checked_out(strict.engine) == 0


def test_a_raising_session_released_receiver_fails_the_step_only(strict: Setup) -> None:
    ran = []
    with strict.app.app_context():
        strict.wfs.session.execute(sa.select(Conversation))
        with signals.session_released.connected_to(failing, strict.app):
            with pytest.raises(ReceiverDown), long_running("llm"):
                ran.append("step")
        assert ran == []
        assert checked_out(strict.engine) == 0  # released before the report
        strict.wfs.session.execute(sa.select(Conversation))  # not inside a step
        with long_running("llm"):
            ran.append("next step")
        with pytest.raises(StepGuardError):  # the guard still works in the next step
            with long_running("llm"):
                strict.wfs.session.execute(sa.select(Conversation))
    assert ran == ["next step"]


def test_a_raising_discard_receiver_still_closes_the_session(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.app.config["PROPAGATE_EXCEPTIONS"] = False

    @setup.app.post("/forget")
    def forget() -> str:
        setup.wfs.session.add(Conversation(title="never committed"))
        setup.wfs.session.flush()
        return "ok"

    with signals.session_discarded.connected_to(failing, setup.app):
        with pytest.warns(DiscardedWritesWarning):
            assert setup.app.test_client().post("/forget").status_code == 200
    assert checked_out(setup.engine) == 0
    if setup.db is not None:
        with setup.app.app_context():
            assert not setup.db.session.registry.has()  # removed, not leaked
    assert any(
        r.levelno == logging.ERROR and "session-discarded" in r.getMessage() for r in caplog.records
    )
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Conversation)).all() == []


def test_every_receiver_hears_a_signal_though_one_raises_unless_muted(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    @setup.app.post("/forget")
    def forget() -> str:
        setup.wfs.session.add(Conversation(title="never committed"))
        return "ok"

    def listening(name: str) -> t.Any:
        return signals.session_discarded.connected_to(
            lambda sender, **kwargs: heard.append(name), setup.app
        )

    client = setup.app.test_client()
    with listening("first"), signals.session_discarded.connected_to(failing), listening("last"):
        with pytest.warns(DiscardedWritesWarning):
            client.post("/forget")
        assert sorted(heard) == ["first", "last"]  # in whatever order blinker keeps them
        with signals.session_discarded.muted(), pytest.warns(DiscardedWritesWarning):
            client.post("/forget")  # still warned; no receiver called
    assert sorted(heard) == ["first", "last"]
    assert "session-discarded" in caplog.text


def test_signals_sent_with_current_app_as_sender(setup: Setup) -> None:
    """An HTTP-client hook that only has 'current_app' can release too."""
    with setup.app.app_context():
        setup.wfs.session.execute(sa.select(Conversation))
        signals.long_running_started.send(current_app, step="hook")
        try:
            assert checked_out(setup.engine) == 0
        finally:
            signals.long_running_finished.send(
                current_app, step="hook", duration=0.0, exception=None
            )
        setup.wfs.session.execute(sa.select(Conversation))  # the step is over
