"""The app the fault suite (``tests/test_gunicorn_faults.py``) serves under gunicorn.

A small Flask-SQLAlchemy app adopted by flask-wfsession, built from the
environment by :func:`app_from_env`:

* ``FAULT_DATABASE_URL``: the PostgreSQL database;
* ``FAULT_APP_NAME``: the ``application_name`` of every connection, so the
  suite can find (and terminate) exactly this app's backends;
* ``FAULT_POOL_SIZE`` (default 2; ``max_overflow`` is 0, ``pool_timeout`` 3 s);
* ``FAULT_PRE_PING`` (default ``1``): ``pool_pre_ping``, recommended;
* ``FAULT_PREPARE_THRESHOLD`` (default: psycopg's, 5): ``none`` turns off
  psycopg's prepared statements, as PgBouncer in transaction mode needs
  (``tests/test_pgbouncer.py``);
* ``FAULT_STEP`` (seconds, default 0.05): the slow step of ``/step`` and ``/insert``,
  and the pause of ``/insert?early=1`` between its write and its step;
* ``FAULT_TICK`` (seconds, default 0.4): the wait between chunks of the streams;
* ``FAULT_TOKENS`` (default 100): the tokens of ``/sse/llm``.

The guard runs in ``"raise"`` mode, so a thread left marked as "inside a
step" fails its next request instead of only warning. Faults are asked for
per request with the ``X-Fault`` header; every response that can say so
names the worker (pid) and thread that served it, and ``/pool`` reports the
pool, the worker's pid and counters of what the app saw.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
from collections import Counter

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask, Response, has_request_context, request, stream_with_context
from flask_sqlalchemy import SQLAlchemy
from werkzeug.exceptions import InternalServerError

from flask_wfsession import WFSession, long_running, signals

RAISE_IN_STARTED = "raise-in-started"
RAISE_IN_DISCARDED = "raise-in-discarded"
_FAULT = "fault_app.fault"  # Session.info: the fault this request's session asked for


class Base(orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class FaultRow(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "wfs_fault_row"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    key: orm.Mapped[str] = orm.mapped_column(sa.String(64), unique=True)


class InjectedFault(RuntimeError):
    """Raised by the app's own signal receivers when a request asks for it."""


def connect_last(signal: t.Any, app: Flask, receiver: t.Callable[..., None]) -> bool:
    """Connect ``receiver`` so that it runs after every receiver already connected.

    blinker calls receivers in the order of a set of ids, which is arbitrary.
    A raising receiver that runs before the extension's own receiver never
    sees the step marked; the case that can poison a thread is the one where
    it runs after it. Try copies of ``receiver`` (a new id each) until one is
    last; keep the rejected ones alive so their ids are not reused.
    """
    rejected = []
    for _ in range(200):

        def copy(sender: t.Any, **kwargs: t.Any) -> None:
            receiver(sender, **kwargs)

        signal.connect(copy, weak=False)
        if list(signal.receivers_for(app))[-1] is copy:
            return True
        signal.disconnect(copy)
        rejected.append(copy)
    signal.connect(receiver, weak=False)
    return False


def create_app(
    url: str,
    app_name: str,
    pool_size: int,
    pre_ping: bool,
    step: float,
    tick: float,
    connect_args: t.Mapping[str, t.Any] | None = None,
    token_count: int = 100,
) -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        "pool_timeout": 3,
        "pool_pre_ping": pre_ping,
        "connect_args": {"application_name": app_name, **(connect_args or {})},
    }
    app.config["WFSESSION_GUARD"] = "raise"
    db.init_app(app)
    WFSession(app, db=db)

    stats: Counter[str] = Counter()
    lock = threading.Lock()

    def count(what: str) -> None:
        with lock:
            stats[what] += 1

    def fault() -> str | None:
        return request.headers.get("X-Fault") if has_request_context() else None

    def raise_in_started(sender: t.Any, **kwargs: t.Any) -> None:
        if sender is app and fault() == RAISE_IN_STARTED:
            count("started_raised")
            raise InjectedFault("a receiver of long_running_started raised")

    def raise_in_discarded(sender: t.Any, *, session: orm.Session, **kwargs: t.Any) -> None:
        # Teardown runs after the request context is gone: the session says.
        if sender is app and session.info.get(_FAULT) == RAISE_IN_DISCARDED:
            count("discarded_raised")
            raise InjectedFault("a receiver of session_discarded raised")

    started_last = connect_last(signals.long_running_started, app, raise_in_started)
    signals.session_discarded.connect(raise_in_discarded, sender=app, weak=False)

    @long_running("llm")
    def slow_step() -> None:
        time.sleep(step)

    @long_running("llm", pending="commit")
    def committing_step() -> None:
        time.sleep(step)

    @long_running("llm-tokens")
    def llm_tokens() -> t.Iterator[str]:
        for n in range(token_count):
            time.sleep(tick)
            yield f"token{n}"

    def rows() -> int:
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(FaultRow)) or 0)

    def served(**data: t.Any) -> dict[str, t.Any]:
        return {"pid": os.getpid(), "thread": threading.get_ident(), **data}

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError) -> tuple[dict[str, t.Any], int]:
        original = error.original_exception
        return served(error=type(original).__name__), 500

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/pool")
    def pool() -> dict[str, t.Any]:
        engine_pool = t.cast(sa.pool.QueuePool, db.engine.pool)
        with lock:
            counters = dict(stats)
        return {
            "pid": os.getpid(),
            "checkedout": engine_pool.checkedout(),
            "size": engine_pool.size(),
            "started_receiver_last": started_last,
            "stats": counters,
        }

    @app.get("/read")
    def read() -> dict[str, t.Any]:
        return served(rows=rows())

    @app.post("/step")
    def step_view() -> dict[str, t.Any]:
        before = rows()
        slow_step()
        return served(rows=before)

    @app.post("/insert/<key>")
    def insert(key: str) -> dict[str, t.Any]:
        """Insert a row; 200 means it is committed.

        Late (default): read, step, then write and commit. Early
        (``?early=1``): write and flush, pause with the transaction open,
        then a step with ``pending="commit"``, which commits before it runs.
        """
        if request.args.get("early"):
            db.session.add(FaultRow(key=key))
            db.session.flush()
            time.sleep(step)  # written, not committed: "idle in transaction"
            committing_step()
        else:
            rows()
            slow_step()
            db.session.add(FaultRow(key=key))
            db.session.commit()
        return served(key=key)

    @app.post("/discard/<key>")
    def discard(key: str) -> dict[str, t.Any]:
        """Write without committing: teardown discards it and reports it."""
        db.session.info[_FAULT] = fault()
        db.session.add(FaultRow(key=key))
        db.session.flush()
        return served(key=key)

    @app.post("/lose-connection")
    def lose_connection() -> tuple[dict[str, t.Any], int]:
        """The backend dies under a read; the view handles it (and may go on to a step)."""
        try:
            db.session.scalar(sa.select(sa.func.pg_terminate_backend(sa.func.pg_backend_pid())))
        except sa.exc.OperationalError:
            if not request.args.get("step"):
                return served(error="OperationalError"), 503
        slow_step()  # needs no database: the answer can still be given
        return served(answered=True), 200

    def sse(data: object) -> str:
        return f"data: {data}\n\n"

    def watched(body: t.Iterator[str]) -> t.Iterator[str]:
        try:
            yield from body
        except GeneratorExit:
            count("streams_abandoned")
            raise
        count("streams_completed")

    @app.get("/sse/reads")
    def sse_reads() -> Response:
        """A small read between chunks, and a wait after each chunk."""

        def body() -> t.Iterator[str]:
            for _ in range(100):
                yield sse(rows())
                time.sleep(tick)

        count("streams_started")
        return Response(stream_with_context(watched(body())), mimetype="text/event-stream")

    @app.get("/sse/llm")
    def sse_llm() -> Response:
        """A read, then the next token of a long-running generator, then a chunk."""
        first = rows()

        def body() -> t.Iterator[str]:
            yield sse(first)
            tokens = llm_tokens()
            for _ in range(token_count + 1):
                current = rows()
                token = next(tokens, None)  # the step releases the read's transaction
                if token is None:
                    return
                yield sse(f"{token} {current}")

        count("streams_started")
        return Response(stream_with_context(watched(body())), mimetype="text/event-stream")

    return app


def app_from_env() -> Flask:
    threshold = os.environ.get("FAULT_PREPARE_THRESHOLD")
    connect_args: dict[str, t.Any] = {}
    if threshold is not None:
        connect_args["prepare_threshold"] = None if threshold == "none" else int(threshold)
    return create_app(
        os.environ["FAULT_DATABASE_URL"],
        os.environ["FAULT_APP_NAME"],
        int(os.environ.get("FAULT_POOL_SIZE", "2")),
        os.environ.get("FAULT_PRE_PING", "1") not in ("0", "false", "no", "off"),
        float(os.environ.get("FAULT_STEP", "0.05")),
        float(os.environ.get("FAULT_TICK", "0.4")),
        connect_args,
        int(os.environ.get("FAULT_TOKENS", "100")),
    )
