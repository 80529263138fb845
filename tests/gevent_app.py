"""A gevent process for tests/test_gevent.py: many greenlets, one OS thread.

Run as ``python -m tests.gevent_app MODE BACKEND URI``. With MODE ``preload``
the apps (engines, pools, the extension) are built first and
``gevent.monkey.patch_all()`` is called afterwards, as ``gunicorn --preload``
does; with ``patched``, gevent patches before anything else is imported.
Prints one JSON object on stdout: per integration, what the greenlets saw.

Nothing here is imported at module level beyond the standard library, so that
``patched`` really patches first.
"""

from __future__ import annotations

import json
import sys
import typing as t
import warnings

GREENLETS = 20
# Holder + observer keep one connection each through the rendezvous; the 18
# other greenlets share the third. Without releases they could not all be
# inside their steps at once.
POOL = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 5}
WAIT = 15  # seconds a greenlet waits at a rendezvous before failing
INTEGRATIONS = ("plain", "flask-sqlalchemy")


class Built(t.NamedTuple):
    app: t.Any
    wfs: t.Any
    engine: t.Any


def build(integration: str, backend: str, uri: str) -> Built:
    """An app built the way the README shows, with a pool of three."""
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_wfsession import WFSession

    from .conftest import engine_options

    options = {**engine_options(backend), **POOL}
    app = Flask(f"gevent_{integration.replace('-', '_')}")
    # A step mark leaking to another greenlet would fail that greenlet's queries.
    app.config.update(TESTING=True, WFSESSION_GUARD="raise")
    wfs = WFSession()
    if integration == "flask-sqlalchemy":
        app.config.update(SQLALCHEMY_DATABASE_URI=uri, SQLALCHEMY_ENGINE_OPTIONS=options)
        db = SQLAlchemy()
        db.init_app(app)
        wfs.init_app(app, db=db)
    else:
        app.config.update(WFSESSION_DATABASE_URI=uri, WFSESSION_ENGINE_OPTIONS=options)
        wfs.init_app(app)
    with app.app_context():
        engine = wfs.engine
    add_stream_view(app, wfs)
    return Built(app, wfs, engine)


STREAMS = 12  # concurrent streams, and workers, on the pool of three


class Meeting:
    """A rendezvous of ``parties`` greenlets; the last to arrive runs ``on_full``."""

    def __init__(self, parties: int, on_full: t.Callable[[], None]) -> None:
        from gevent.event import Event

        self.parties, self.arrived, self.on_full, self.full = parties, 0, on_full, Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.on_full()
            self.full.set()
        if not self.full.wait(timeout=WAIT):
            raise TimeoutError(f"{self.arrived} of {self.parties} arrived")


def add_stream_view(app: t.Any, wfs: t.Any) -> None:
    """``/stream/<n>``: three chunks, each a read then a token from a generator step.

    The second token waits at the app's ``stream_meeting`` until every stream
    is inside its step; each chunk carries ``n`` as read back from the
    database through the stream's session.
    """
    import sqlalchemy as sa
    from flask import Response, stream_with_context

    from flask_wfsession import long_running

    @long_running("llm-stream")
    def tokens() -> t.Iterator[str]:
        yield "t0"
        app.extensions["stream_meeting"].arrive()
        yield "t1"
        yield "t2"

    @app.get("/stream/<int:n>")
    def stream(n: int) -> Response:
        session = wfs.session
        app.extensions["stream_sessions"].add(id(session))

        def body() -> t.Iterator[str]:
            for token in tokens():  # the step ends the read's transaction before each token
                yield f"{token} {session.scalar(sa.select(sa.literal(n)))}\n"

        return Response(stream_with_context(body()), mimetype="text/plain")


def rendezvous(built: Built, tag: str) -> dict[str, t.Any]:
    """20 greenlets, each in its own app context, all inside a step at once.

    * ``holder`` flushes a write in a ``wfs.detached()`` block and enters a
      step under the default ``"hold"``: it keeps its connection, reported once.
    * ``observer`` opens a read-only transaction and keeps it, outside any
      step, while the 18 others enter theirs; then enters its own.
    * 18 ``stepper`` greenlets write (scoped and detached, committed), then
      read (scoped, or in a detached block) and enter a step with
      ``pending="raise"``: if any step took in another greenlet's session,
      the holder's write would make it raise, and the observer's transaction
      would be ended.
    """
    import gevent
    import sqlalchemy as sa
    from gevent.event import Event

    from flask_wfsession import long_running, signals

    from .models import Conversation

    app, wfs, engine = built
    steppers = GREENLETS - 2
    out: dict[str, t.Any] = {"errors": [], "reports": []}
    names: dict[t.Any, str] = {}
    owners: dict[int, str] = {}
    idents: set[int] = set()
    writes_done, holder_in, steppers_in, all_in = Event(), Event(), Event(), Event()
    counts = {"written": 0, "in step": 0}

    def wait(event: Event) -> None:
        if not event.wait(timeout=WAIT):
            raise TimeoutError("a rendezvous was not reached")

    def own(session: t.Any, name: str) -> t.Any:
        owners[id(session)] = name
        return session

    def on_released(sender: t.Any, *, session: t.Any, step: t.Any, action: str, **_: t.Any) -> None:
        who = names.get(gevent.getcurrent())
        out["reports"].append({"by": who, "owner": owners.get(id(session)), "action": action})

    def arrive() -> None:
        counts["in step"] += 1
        if counts["in step"] == steppers + 1:
            steppers_in.set()
        if counts["in step"] == GREENLETS:
            out["checked out, all in steps"] = engine.pool.checkedout()
            all_in.set()
        wait(all_in)

    @long_running("llm")
    def held_step() -> None:
        holder_in.set()
        arrive()

    @long_running("llm", pending="raise")
    def strict_step() -> None:
        arrive()

    def titled(title: str) -> t.Any:
        return sa.select(Conversation.id).where(Conversation.title == title)

    def holder() -> None:
        with app.app_context():
            wait(writes_done)  # SQLite: the others' writes come before this write lock
            with wfs.detached() as session:
                own(session, "holder")
                session.add(Conversation(title=f"{tag} held"))
                session.flush()
                held_step()
                out["holder still in its transaction"] = session.in_transaction()
                out["holder sees its row"] = len(session.execute(titled(f"{tag} held")).all())

    def observer() -> None:
        with app.app_context():
            session = own(wfs.session, "observer")
            session.execute(sa.select(Conversation.id).limit(1)).all()
            transaction = session.get_transaction()
            wait(steppers_in)
            out["checked out, 19 in steps"] = engine.pool.checkedout()
            out["observer kept its transaction"] = (
                session.in_transaction() and session.get_transaction() is transaction
            )
            strict_step()
            session.execute(sa.select(Conversation.id).limit(1)).all()

    def stepper(i: int) -> None:
        title = f"{tag} stepper {i}"
        name = f"stepper {i}"
        with app.app_context():
            session = own(wfs.session, name)
            session.add(Conversation(title=title))
            session.commit()
            with wfs.detached() as detached:
                own(detached, name)
                detached.add(Conversation(title=f"{title} detached"))
            counts["written"] += 1
            if counts["written"] == steppers:
                writes_done.set()
            wait(holder_in)
            if i % 2:
                found = session.execute(titled(title)).scalar_one()
                strict_step()
                assert session.execute(titled(title)).scalar_one() == found
            else:
                with wfs.detached() as detached:
                    own(detached, name)
                    found = detached.execute(titled(title)).scalar_one()
                    strict_step()
                    assert detached.execute(titled(title)).scalar_one() == found

    def run(name: str, fn: t.Callable[..., None], *args: t.Any) -> None:
        import threading

        names[gevent.getcurrent()] = name
        idents.add(threading.get_ident())
        try:
            fn(*args)
        except BaseException as e:
            out["errors"].append(f"{name}: {e!r}")

    with signals.session_released.connected_to(on_released):
        greenlets = [gevent.spawn(run, "holder", holder), gevent.spawn(run, "observer", observer)]
        greenlets += [gevent.spawn(run, f"stepper {i}", stepper, i) for i in range(steppers)]
        gevent.joinall(greenlets, timeout=3 * WAIT)
    out["unfinished greenlets"] = sum(not g.dead for g in greenlets)
    out["distinct thread idents"] = len(idents)
    out["checked out after"] = engine.pool.checkedout()
    with app.app_context(), wfs.detached() as session:
        like = sa.select(sa.func.count()).where(Conversation.title.like(f"{tag} %"))
        out["rows"] = session.scalar(like.select_from(Conversation))
    return out


def cross_greenlet(built: Built) -> dict[str, t.Any]:
    """A greenlet from gevent.spawn using another greenlet's sessions."""
    import gevent
    import sqlalchemy as sa
    from flask import has_app_context

    from .models import Conversation

    app, wfs, engine = built
    out: dict[str, t.Any] = {}
    one = sa.select(sa.literal(1))

    def attempt(fn: t.Callable[[], object]) -> str:
        try:
            fn()
        except Exception as e:
            return type(e).__name__
        return "no error"

    def in_own_context(fn: t.Callable[[], object]) -> t.Callable[[], object]:
        def run() -> object:
            with app.app_context():
                return fn()

        return run

    def owner() -> None:
        with app.app_context():
            session = wfs.session
            session.execute(one)
            out["spawned greenlet has an app context"] = gevent.spawn(has_app_context).get()
            with wfs.detached() as detached:
                detached.execute(one)
                detached.add(Conversation(title="never flushed"))
                attempts = {
                    "scoped execute": lambda: session.execute(one),
                    "scoped commit": session.commit,
                    "scoped execute, own app context": in_own_context(lambda: session.execute(one)),
                    "detached execute": lambda: detached.execute(one),
                    "detached flush": detached.flush,
                }
                for name, fn in attempts.items():
                    out[name] = gevent.spawn(attempt, fn).get()
                out["detached object still unflushed"] = len(detached.new)
                detached.expunge_all()
                out["owner's detached still works"] = detached.execute(one).scalar()
            out["owner's scoped still works"] = session.execute(one).scalar()

    gevent.spawn(owner).get()
    out["checked out after"] = engine.pool.checkedout()
    return out


def workers_and_streams(built: Built, tag: str) -> dict[str, t.Any]:
    """``wfs.spawn``, ``wfs.submit`` and streamed responses, all greenlets, on a pool of three.

    * ``STREAMS`` workers, half from ``wfs.spawn`` and half from ``wfs.submit``
      to a ``ThreadPoolExecutor`` (greenlets too, once patched), each read,
      then wait inside a step until all are inside theirs, then write and
      commit. On a pool of three they can only all be inside if each step
      returned its connection.
    * ``STREAMS`` clients, each in its own greenlet, read ``/stream/<n>``
      at once; the streams meet inside their generator steps likewise.
    * An attached ORM object handed to ``wfs.spawn`` is refused.
    """
    import concurrent.futures

    import gevent
    import sqlalchemy as sa

    from flask_wfsession import long_running

    from .models import Conversation

    app, wfs, engine = built
    out: dict[str, t.Any] = {"errors": []}
    one = sa.select(sa.literal(1))

    def checked_out(key: str) -> t.Callable[[], None]:
        return lambda: out.__setitem__(key, engine.pool.checkedout())

    workers = Meeting(STREAMS, checked_out("checked out, all workers in steps"))
    app.extensions["stream_meeting"] = Meeting(
        STREAMS, checked_out("checked out, all streams in steps")
    )
    app.extensions["stream_sessions"] = set()
    worker_sessions: set[int] = set()

    def worker(i: int) -> None:
        try:
            session = wfs.session
            worker_sessions.add(id(session))
            session.execute(one)
            with long_running("llm"):
                workers.arrive()
            session.add(Conversation(title=f"{tag} worker {i}"))
            session.commit()
        except BaseException as e:
            out["errors"].append(f"worker {i}: {e!r}")

    def read_stream(n: int) -> str:
        with app.test_client() as client:
            response = client.get(f"/stream/{n}", buffered=False)
            try:
                return response.get_data(as_text=True)
            finally:
                response.close()

    with concurrent.futures.ThreadPoolExecutor(STREAMS // 2) as executor, app.app_context():
        conversation = Conversation(title=f"{tag} attached")
        wfs.session.add(conversation)
        wfs.session.commit()
        try:
            wfs.spawn(worker, conversation)  # type: ignore[arg-type]
            out["attached object handed to spawn"] = "no error"
        except Exception as e:
            out["attached object handed to spawn"] = type(e).__name__
        threads = [wfs.spawn(worker, i) for i in range(STREAMS // 2)]
        futures = [wfs.submit(executor, worker, i) for i in range(STREAMS // 2, STREAMS)]
        wfs.session.close()
        for thread in threads:
            thread.join(timeout=3 * WAIT)
        concurrent.futures.wait(futures, timeout=3 * WAIT)
    readers = [gevent.spawn(read_stream, n) for n in range(STREAMS)]
    gevent.joinall(readers, timeout=3 * WAIT)
    out["errors"] += [repr(g.exception) for g in readers if g.exception is not None]
    out["unfinished"] = (
        sum(thread.is_alive() for thread in threads)
        + sum(not future.done() for future in futures)
        + sum(not g.dead for g in readers)
    )
    out["streams"] = [g.value for g in readers]
    out["distinct worker sessions"] = len(worker_sessions)
    out["distinct stream sessions"] = len(app.extensions["stream_sessions"])
    out["checked out after"] = engine.pool.checkedout()
    with app.app_context(), wfs.detached() as session:
        like = sa.select(sa.func.count()).where(Conversation.title.like(f"{tag} worker %"))
        out["worker rows"] = session.scalar(like.select_from(Conversation))
    return out


def units(built: Built, tag: str) -> dict[str, t.Any]:
    """Units of work in ``STREAMS`` greenlets from ``wfs.spawn``, on a pool of three.

    Each unit reads, waits inside a step until every unit is inside its own
    (only possible if each read-only unit returned its connection), then
    writes; the odd ones raise afterwards. Each greenlet's unit must commit
    or roll back its own work only.
    """
    import sqlalchemy as sa

    from flask_wfsession import long_running, signals

    from .models import Conversation

    app, wfs, engine = built
    out: dict[str, t.Any] = {"errors": [], "signals": []}

    def inside() -> None:
        out["checked out, all units in steps"] = engine.pool.checkedout()

    meeting = Meeting(STREAMS, inside)

    @wfs.transaction
    def work(i: int) -> None:
        wfs.session.execute(sa.select(Conversation.id)).all()
        with long_running("llm"):
            meeting.arrive()
        wfs.session.add(Conversation(title=f"{tag} unit {i}"))
        wfs.session.flush()
        if i % 2:
            raise LookupError(i)

    def worker(i: int) -> None:
        try:
            work(i)
        except LookupError:
            pass
        except BaseException as e:
            out["errors"].append(f"unit {i}: {e!r}")

    def recorder(what: str) -> t.Callable[..., None]:
        return lambda sender, **kwargs: out["signals"].append(what)

    with (
        signals.unit_committed.connected_to(recorder("committed")),
        signals.unit_rolled_back.connected_to(recorder("rolled back")),
        app.app_context(),
    ):
        threads = [wfs.spawn(worker, i) for i in range(STREAMS)]
        for thread in threads:
            thread.join(timeout=3 * WAIT)
    out["unfinished"] = sum(thread.is_alive() for thread in threads)
    with app.app_context(), wfs.detached() as session:
        rows = session.scalars(
            sa.select(Conversation.title).where(Conversation.title.like(f"{tag} unit %"))
        )
        out["unit rows"] = sorted(int(title.rsplit(" ", 1)[1]) for title in rows)
    out["checked out after"] = engine.pool.checkedout()
    return out


def patch() -> None:
    from gevent import monkey

    monkey.patch_all()


def main() -> None:
    mode, backend, uri = sys.argv[1:4]
    if mode == "preload":
        apps = {i: build(i, backend, uri) for i in INTEGRATIONS}
        patch()
    elif mode == "patched":
        patch()
        apps = {i: build(i, backend, uri) for i in INTEGRATIONS}
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    from gevent import monkey

    from flask_wfsession import BlockingDriverWarning, WFSessionWarning

    results: dict[str, t.Any] = {"threading patched": monkey.is_module_patched("threading")}
    blocking = []
    for integration, built in apps.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = rendezvous(built, f"{mode} {integration}")
            result["cross greenlet"] = cross_greenlet(built)
            result["workers and streams"] = workers_and_streams(built, f"{mode} {integration}")
            result["units"] = units(built, f"{mode} {integration}")
        blocking += [w for w in caught if w.category is BlockingDriverWarning]
        result["warnings"] = [
            {"category": w.category.__name__, "message": str(w.message)}
            for w in caught
            if issubclass(w.category, WFSessionWarning) and w.category is not BlockingDriverWarning
        ]
        results[integration] = result
        built.engine.dispose()
    results["blocking driver warnings"] = len(blocking)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
