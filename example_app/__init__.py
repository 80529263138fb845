"""A small Flask app that uses flask-wfsession's scoped and detached modes."""

from __future__ import annotations

import os
import typing as t

from flask import Flask

from flask_wfsession import WFSession

from .models import Base

wfs = WFSession()


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Create the app; SQLite in the instance folder unless ``DATABASE_URL`` is set."""
    app = Flask(__name__)
    os.makedirs(app.instance_path, exist_ok=True)
    default_uri = f"sqlite:///{os.path.join(app.instance_path, 'example.db')}"
    app.config.update(
        WFSESSION_DATABASE_URI=os.environ.get("DATABASE_URL", default_uri),
        WFSESSION_ENGINE_OPTIONS={"pool_size": 5, "max_overflow": 0, "pool_timeout": 5},
    )
    app.config.update(config or {})
    wfs.init_app(app)
    with app.app_context():
        Base.metadata.create_all(wfs.engine)

    from . import views

    app.register_blueprint(views.bp)
    return app
