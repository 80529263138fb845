"""The step guard: released sessions stay released while a step's body runs."""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa

from flask_wfsession import StepGuardError, StepGuardWarning, long_running

from .conftest import Setup, checked_out
from .models import Conversation


@pytest.fixture
def setup(make: t.Callable[..., Setup]) -> Setup:
    """Strict, as in tests and new code: the default ("warn") is below."""
    return make(WFSESSION_GUARD="raise")


def test_scoped_session_in_a_step_raises(setup: Setup) -> None:
    with setup.app.app_context():
        with long_running("llm"), pytest.raises(StepGuardError) as info:
            setup.wfs.session.execute(sa.select(Conversation))
        assert checked_out(setup.engine) == 0
    message = str(info.value)
    assert "long-running step 'llm'" in message
    assert "wfs.detached()" in message


@pytest.mark.parametrize("integration", ["flask-sqlalchemy"], indirect=True)
def test_flask_sqlalchemy_db_session_is_guarded_too(setup: Setup) -> None:
    assert setup.db is not None
    with setup.app.app_context(), long_running("llm"), pytest.raises(StepGuardError):
        setup.db.session.execute(sa.text("SELECT 1"))


def test_lazy_load_in_a_step_raises(setup: Setup, conversation_id: int) -> None:
    with setup.app.app_context():
        conversation = setup.wfs.session.get_one(Conversation, conversation_id)
        with long_running("llm"), pytest.raises(StepGuardError):
            _ = conversation.messages


def test_flush_in_a_step_raises(setup: Setup) -> None:
    with setup.app.app_context():
        with long_running("llm"):
            setup.wfs.session.add(Conversation(title="late"))
            with pytest.raises(StepGuardError):
                setup.wfs.session.flush()
        setup.wfs.session.rollback()


def test_detached_session_inside_a_step_is_allowed(setup: Setup) -> None:
    with setup.app.app_context(), long_running("llm"):
        with setup.wfs.detached() as session:
            session.add(Conversation(title="short write"))
        assert checked_out(setup.engine) == 0
    with setup.wfs.detached(setup.app) as session:
        assert session.scalars(sa.select(Conversation.title)).all() == ["short write"]


def test_detached_session_opened_before_the_step_is_guarded(setup: Setup) -> None:
    with setup.app.app_context(), setup.wfs.detached() as session:
        with long_running("llm"), pytest.raises(StepGuardError):
            session.execute(sa.text("SELECT 1"))


def test_guard_lifted_after_the_step_even_when_it_fails(setup: Setup) -> None:
    with setup.app.app_context():
        with pytest.raises(ConnectionError), long_running("llm"):
            raise ConnectionError
        assert setup.wfs.session.execute(sa.text("SELECT 1")).scalar() == 1


def test_generator_step_guarded_only_while_producing(setup: Setup) -> None:
    @long_running("stream")
    def tokens() -> t.Iterator[int]:
        yield 1
        setup.wfs.session.execute(sa.text("SELECT 1"))
        yield 2

    with setup.app.app_context():
        gen = tokens()
        assert next(gen) == 1
        setup.wfs.session.execute(sa.text("SELECT 1"))  # between items: allowed
        with pytest.raises(StepGuardError):
            next(gen)


def test_warn_mode_is_the_default_and_proceeds(make: t.Callable[..., Setup]) -> None:
    setup = make()
    assert setup.app.config["WFSESSION_GUARD"] == "warn"
    with setup.app.app_context():
        with long_running("llm"), pytest.warns(StepGuardWarning, match="'llm'"):
            assert setup.wfs.session.execute(sa.text("SELECT 1")).scalar() == 1
        setup.wfs.session.close()


def test_off_mode_allows(make: t.Callable[..., Setup]) -> None:
    setup = make(WFSESSION_GUARD="off")
    with setup.app.app_context(), long_running("llm"):
        assert setup.wfs.session.execute(sa.text("SELECT 1")).scalar() == 1
