"""The app the benchmark serves under gunicorn: one chat endpoint, four ways.

``BENCH_VARIANT`` picks the way:

* ``nodb``: the slow step alone, no database (the practical limit);
* ``plain``: plain Flask-SQLAlchemy, the session held across the step;
* ``manual``: the hand-written rule, ``db.session.close()`` before the step;
* ``wfsession``: flask-wfsession, the step decorated with ``@long_running``.

``BENCH_DATABASE_URL`` and ``BENCH_STEP`` (seconds) set the database and the
step's length. ``/short/<id>`` is an ordinary request with no slow step.
"""

from __future__ import annotations

import os
import time
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import WFSession, long_running

VARIANTS = ("nodb", "plain", "manual", "wfsession")


class Base(orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class BenchConversation(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(200))


class BenchMessage(db.Model):  # type: ignore[name-defined,misc]
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    conversation_id: orm.Mapped[int]
    content: orm.Mapped[str] = orm.mapped_column(sa.String(200))


def create_app(variant: str, database_url: str, step: float) -> Flask:
    if variant not in VARIANTS:
        raise ValueError(f"BENCH_VARIANT must be one of {VARIANTS}, not {variant!r}")
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    connect_args = {"application_name": f"wfsession-bench-{variant}"}
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": 5,
        "max_overflow": 0,
        **({"connect_args": connect_args} if database_url.startswith("postgresql") else {}),
    }
    db.init_app(app)
    if "BENCH_IDLE_WARNING" in os.environ:  # to measure telemetry's cost
        app.config["WFSESSION_IDLE_WARNING"] = os.environ["BENCH_IDLE_WARNING"]
    if variant == "wfsession":
        WFSession(app, db=db)

    def llm(prompt: str) -> str:
        time.sleep(step)  # stands for the LLM or HTTP call
        return prompt[::-1]

    slow = long_running("llm")(llm) if variant == "wfsession" else llm

    @app.post("/chat/<int:conversation_id>")
    def chat(conversation_id: int) -> dict[str, t.Any]:
        if variant == "nodb":
            return {"answer": slow("hello")}
        conversation = db.session.get_one(BenchConversation, conversation_id)
        prompt = conversation.title
        if variant == "manual":
            db.session.close()
        answer = slow(prompt)
        db.session.add(BenchMessage(conversation_id=conversation_id, content=answer))
        db.session.commit()
        return {"answer": answer}

    @app.get("/short/<int:conversation_id>")
    def short(conversation_id: int) -> dict[str, t.Any]:
        return {"title": db.session.get_one(BenchConversation, conversation_id).title}

    @app.get("/health")
    def health() -> str:
        return "ok"

    return app


def app_from_env() -> Flask:
    return create_app(
        os.environ.get("BENCH_VARIANT", "wfsession"),
        os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        float(os.environ.get("BENCH_STEP", "0.5")),
    )
