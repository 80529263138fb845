"""Adopting Flask-SQLAlchemy: its db.session and its binds."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import SetupError, WFSession

from .conftest import Setup


@pytest.mark.parametrize("integration", ["flask-sqlalchemy"], indirect=True)
def test_session_is_db_session(setup: Setup) -> None:
    assert setup.db is not None
    with setup.app.app_context():
        assert setup.wfs.session is setup.db.session()


def test_binds_are_followed_without_app_context(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'main.db'}"
    app.config["SQLALCHEMY_BINDS"] = {"audit": f"sqlite:///{tmp_path / 'audit.db'}"}

    class Base(orm.DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Entry(db.Model):  # type: ignore[name-defined,misc]
        __bind_key__ = "audit"
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)

    db.init_app(app)
    wfs = WFSession(app, db=db)
    with app.app_context():
        db.create_all()
        factory = wfs.sessionmaker
        audit = db.engines["audit"]
    with factory() as session:
        session.add(Entry(id=7))
        session.commit()
    with audit.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM entry")).scalar() == 7
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_flask_sqlalchemy_lite_is_refused_with_what_to_do_instead(uri: str) -> None:
    """Flask-SQLAlchemy-Lite's 'db' is not adopted; its engine, as the message says, is."""
    from flask_sqlalchemy_lite import SQLAlchemy as LiteSQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_ENGINES"] = {"default": uri}
    lite = LiteSQLAlchemy(app)
    wfs = WFSession()
    with pytest.raises(SetupError, match="flask_sqlalchemy_lite") as refused:
        wfs.init_app(app, db=lite)
    assert "wfs.init_app(app, engine=db.engine)" in str(refused.value)
    assert "wfsession" not in app.extensions
    with app.app_context():
        wfs.init_app(app, engine=lite.engine)
    with app.app_context():
        assert wfs.engine is lite.engine
        assert wfs.session.execute(sa.select(sa.literal(1))).scalar() == 1
        engine = lite.engine
    engine.dispose()
