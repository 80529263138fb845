"""A small LLM chat and workflow service, written the way flask-wfsession recommends.

``create_app()`` uses SQLite in the instance folder unless ``DATABASE_URL``
is set, and starts a local fake LLM provider unless ``LLM_URL`` is set.
Run it with ``flask --app example_app run``; ``python -m example_app`` runs
the demo (see :mod:`example_app.demo`).
"""

from __future__ import annotations

import atexit
import os
import typing as t

from flask import Flask

from flask_wfsession import WFSession

from .models import Base

wfs = WFSession()


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Create the app.

    Configuration, besides ``WFSESSION_*``: ``LLM_URL`` (a provider; a fake
    one is started when unset), ``FAKE_LLM_LATENCY`` (seconds, default 1.0),
    ``RELEASE_DURING_LLM`` (default ``True``; ``False`` serves each chat as
    one unit of work, as a plain app would, unless the request asks
    ``?release=1``: see :func:`example_app.views.release_requested`),
    ``CELERY_BROKER_URL`` (run background jobs on Celery).
    """
    app = Flask(__name__)
    os.makedirs(app.instance_path, exist_ok=True)
    default_uri = f"sqlite:///{os.path.join(app.instance_path, 'example.db')}"
    app.config.update(
        WFSESSION_DATABASE_URI=os.environ.get("DATABASE_URL", default_uri),
        WFSESSION_ENGINE_OPTIONS={"pool_size": 5, "max_overflow": 0, "pool_timeout": 5},
        LLM_URL=os.environ.get("LLM_URL"),
        FAKE_LLM_LATENCY=1.0,
        RELEASE_DURING_LLM=True,
        CELERY_BROKER_URL=os.environ.get("CELERY_BROKER_URL"),
    )
    app.config.update(config or {})
    wfs.init_app(app)

    from .fake_llm import FakeLLM
    from .jobs import init_jobs
    from .llm import LLMClient
    from .pool import LLMWaits

    with app.app_context():
        Base.metadata.create_all(wfs.engine)
    waits = LLMWaits()
    if not app.config["LLM_URL"]:
        fake = FakeLLM(latency=app.config["FAKE_LLM_LATENCY"])
        atexit.register(fake.close)
        app.extensions["example_fake_llm"] = fake
        app.config["LLM_URL"] = fake.url
    app.extensions["example_llm_waits"] = waits
    app.extensions["example_llm"] = LLMClient(app.config["LLM_URL"], observe=waits.sample)
    init_jobs(app)

    from . import views

    app.register_blueprint(views.bp)
    return app
