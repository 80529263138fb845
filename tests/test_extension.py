from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import NoAppContextError, SettingError, SetupError, WFSession

from .conftest import Setup
from .models import Conversation


def test_init_twice_raises(setup: Setup) -> None:
    with pytest.raises(SetupError, match="already registered on app"):
        setup.wfs.init_app(setup.app)


def test_unregistered_app_says_forgot_init_app(wfs: WFSession) -> None:
    other = Flask("other")
    with other.app_context(), pytest.raises(SetupError, match="forget to call 'init_app'"):
        _ = wfs.session


def test_no_database_configured() -> None:
    with pytest.raises(SetupError, match="WFSESSION_DATABASE_URI"):
        WFSession(Flask(__name__))


def test_db_and_engine_together_rejected(uri: str) -> None:
    engine = sa.create_engine(uri)
    with pytest.raises(SetupError, match="not both"):
        WFSession(Flask(__name__), db=SQLAlchemy(), engine=engine)
    engine.dispose()


def test_db_must_be_initialised_first(uri: str) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = uri
    db = SQLAlchemy()
    with pytest.raises(SetupError, match=r"Call 'db.init_app\(app\)' before"):
        WFSession().init_app(app, db=db)


@pytest.mark.parametrize(
    ("key", "value"), [("WFSESSION_PENDING", "keep"), ("WFSESSION_GUARD", "loud")]
)
def test_config_value_out_of_range(uri: str, key: str, value: str) -> None:
    app = Flask(__name__)
    app.config.update(WFSESSION_DATABASE_URI=uri, **{key: value})
    with pytest.raises(SettingError, match=f"'{key}' is '{value}'; it must be one of"):
        WFSession(app)


@pytest.mark.parametrize(
    ("key", "value"),
    [("WFSESSION_PENDING", "Raise"), ("WFSESSION_PENDING", "comit"), ("WFSESSION_GUARD", None)],
)
def test_a_misspelled_policy_is_refused(uri: str, key: str, value: object) -> None:
    app = Flask(__name__)
    app.config.update(WFSESSION_DATABASE_URI=uri, **{key: value})
    with pytest.raises(SettingError, match=f"'{key}' is {value!r}"):
        WFSession(app)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("false", False), ("0", False), ("no", False), ("Off", False), (0, False)],
        *[("true", True), ("1", True), ("YES", True), (True, True), (1, True)],
    ],
)
def test_booleans_from_environment_strings(uri: str, value: object, expected: bool) -> None:
    app = Flask(__name__)
    app.config.update(WFSESSION_DATABASE_URI=uri, WFSESSION_EXPIRE_ON_RELEASE=value)
    WFSession(app)
    state = app.extensions["wfsession"]._app_state[app]
    assert state.expire_on_release is expected
    state.engines[None].dispose()


@pytest.mark.parametrize("value", ["maybe", 2, "", None])
def test_a_boolean_that_is_not_one_is_refused(uri: str, value: object) -> None:
    app = Flask(__name__)
    app.config.update(WFSESSION_DATABASE_URI=uri, WFSESSION_RELEASE_STREAMS=value)
    with pytest.raises(SettingError, match=r"'WFSESSION_RELEASE_STREAMS' is .* must be a boolean"):
        WFSession(app)


def test_defaults_published_in_config(app: Flask) -> None:
    assert app.config["WFSESSION_PENDING"] == "hold"
    assert app.config["WFSESSION_GUARD"] == "warn"
    assert app.config["WFSESSION_EXPIRE_ON_RELEASE"] is False
    assert app.config["WFSESSION_RELEASE_STREAMS"] is True


def test_engine_argument_is_used(uri: str) -> None:
    engine = sa.create_engine(uri)
    app = Flask(__name__)
    wfs = WFSession(app, engine=engine)
    with app.app_context():
        assert wfs.engine is engine
        assert wfs.session.get_bind() is engine
    engine.dispose()


def test_one_extension_serves_two_apps(make: t.Callable[..., Setup], uri: str) -> None:
    first = make()
    second = Flask("second")
    second.config.update(WFSESSION_DATABASE_URI=uri)
    first.wfs.init_app(second)
    with first.app.app_context():
        first.wfs.session.add(Conversation(title="from first"))
        first.wfs.session.commit()
    with second.app_context():
        assert first.wfs.engine is not first.engine
        titles = first.wfs.session.scalars(sa.select(Conversation.title)).all()
        assert titles == ["from first"]
        second_engine = first.wfs.engine
        first.wfs.session.close()
    second_engine.dispose()


def test_engine_outside_context_points_to_detached(wfs: WFSession) -> None:
    with pytest.raises(NoAppContextError, match=r"wfs\.detached"):
        _ = wfs.engine
