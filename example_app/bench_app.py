"""The app the benchmark serves under gunicorn: one chat endpoint, four ways.

``BENCH_VARIANT`` picks the way:

* ``nodb``: the slow step alone, no database (the practical limit);
* ``plain``: plain Flask-SQLAlchemy, the session held across the step;
* ``manual``: the hand-written rule, ``db.session.close()`` before the step;
* ``wfsession``: flask-wfsession, the step decorated with ``@long_running``.

``BENCH_DATABASE_URL`` and ``BENCH_STEP`` (seconds) set the database and the
step's length. ``/short/<id>`` is an ordinary request with no slow step.

``GET /stream/<id>`` is the streamed chat of :mod:`example_app.scale`: in
the streamed body, read the conversation, send the answer as server-sent
events, one per token of the fake LLM at ``BENCH_LLM_URL`` (read over real
HTTP), then store the answer. ``plain`` holds its session, and so its
transaction and connection, across the stream; ``manual`` closes
``db.session`` before streaming and stores the answer with a session of its
own; ``wfsession`` reads the tokens in a ``@long_running`` generator, its
streamed response is released between chunks, and it stores the answer with
``wfs.detached()``. ``BENCH_POOL_TIMEOUT`` (seconds) sets ``pool_timeout``.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask, Response, stream_with_context
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
    if "BENCH_POOL_TIMEOUT" in os.environ:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_timeout"] = float(
            os.environ["BENCH_POOL_TIMEOUT"]
        )
    db.init_app(app)
    if "BENCH_IDLE_WARNING" in os.environ:  # to measure telemetry's cost
        app.config["WFSESSION_IDLE_WARNING"] = os.environ["BENCH_IDLE_WARNING"]
    wfs = WFSession(app, db=db) if variant == "wfsession" else None

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

    add_stream(app, variant, wfs, os.environ.get("BENCH_LLM_URL", "http://127.0.0.1:8765"))

    @app.get("/health")
    def health() -> str:
        return "ok"

    return app


class _Tokens:
    """The LLM client of the streamed chat: tokens from the fake LLM's ``/v1/stream``.

    ``SHARDS`` ``httpx.Client`` objects per app, made on first use (after
    gevent has patched the sockets and locks they use), shared by the worker's
    threads or greenlets, each stream taking the next in turn. Their pools have
    no connection limit (httpx's default of 100 would queue streams 101 to
    1,000 behind the first). Several pools, not one: httpcore's pool looks at
    every one of its connections when a request starts and when a response
    is closed (``ConnectionPool._assign_requests_to_connections``), so with
    one pool of 500 open streams that scan took 75% of the worker's CPU
    (py-spy); 64 pools of a few connections each make it negligible.
    """

    SHARDS = 64

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: list[t.Any] = []
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def _client(self) -> t.Any:
        with self._lock:
            if not self._clients:
                import ssl

                import httpx

                limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
                verify = ssl.create_default_context()  # one for all: each costs milliseconds
                self._clients = [
                    httpx.Client(base_url=self.url, timeout=60, limits=limits, verify=verify)
                    for _ in range(self.SHARDS)
                ]
        return self._clients[next(self._turn) % self.SHARDS]

    def __call__(self, prompt: str) -> t.Iterator[str]:
        http = self._client()
        with http.stream("POST", "/v1/stream", json={"prompt": prompt}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)["token"]


def add_stream(app: Flask, variant: str, wfs: WFSession | None, llm_url: str) -> None:
    """Add ``GET /stream/<id>``, the streamed chat, to ``app``, done the ``variant``'s way."""
    tokens = _Tokens(llm_url)
    # The wfsession variant marks the token generator as a long-running step:
    # its sessions are released before each token is awaited.
    stream = long_running("llm-stream")(tokens.__call__) if wfs is not None else tokens.__call__

    def sse(event: str, data: str) -> str:
        return f"event: {event}\ndata: {json.dumps(data)}\n\n"

    @app.get("/stream/<int:conversation_id>")
    def chat_stream(conversation_id: int) -> Response:
        # The conversation is read in the stream, not here: Flask (3.1) runs the
        # request's teardown when the view returns, before a streamed body is
        # sent, which would end a transaction begun here under every variant.
        @stream_with_context
        def events() -> t.Iterator[str]:
            prompt = "hello"
            if variant != "nodb":
                prompt = db.session.get_one(BenchConversation, conversation_id).title
            if variant == "manual":
                db.session.close()  # the hand-written rule: give the connection back first
            answer = []
            for token in stream(prompt):
                answer.append(token)
                yield sse("token", token)
            message = BenchMessage(conversation_id=conversation_id, content="".join(answer)[:200])
            if variant == "plain":  # the request's session, still in its transaction
                db.session.add(message)
                db.session.commit()
            elif variant == "manual":
                with orm.Session(db.engine) as session, session.begin():
                    session.add(message)
            elif wfs is not None:
                with wfs.detached() as session:
                    session.add(message)
            yield sse("done", str(len(answer)))

        return Response(events(), mimetype="text/event-stream")


def app_from_env() -> Flask:
    return create_app(
        os.environ.get("BENCH_VARIANT", "wfsession"),
        os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        float(os.environ.get("BENCH_STEP", "0.5")),
    )
