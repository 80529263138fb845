"""The extension object and its per-app state.

One :class:`WFSession` serves any number of apps. What belongs to an app
(engines, sessionmaker, scoped source, configuration) lives in a
:class:`_State` keyed by the app in a weak dictionary, never on ``self``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import types
import typing as t
import weakref

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask, current_app, has_app_context, has_request_context, request
from werkzeug.wrappers import Response

from . import (
    _callbacks,
    _celery,
    _fork,
    _gevent,
    _registry,
    _scoped,
    _settings,
    _telemetry,
    _threads,
    _transaction,
    _unit_checks,
    signals,
)
from ._callsite import user_frame
from ._detached import DetachedSessions
from ._errors import NoAppContextError, SetupError
from ._fork import manage
from ._fsa import adopt
from ._guard import enter_step, exit_step, owned_here
from ._release import release_sessions
from ._scoped import ContextScoped, ScopedSource, teardown
from ._session import made_for, make_sessionmaker
from ._settings import GUARD_MODES, PENDING_POLICIES, GuardMode, Pending
from ._streaming import wrap_streamed

P = t.ParamSpec("P")
R = t.TypeVar("R")

_EXTENSION_KEY = "wfsession"


@dataclasses.dataclass
class _State:
    engines: dict[str | None, sa.Engine]
    sessionmaker: orm.sessionmaker[t.Any]
    scoped: ScopedSource
    detached: DetachedSessions
    pending: Pending
    guard: GuardMode
    expire_on_release: bool
    release_streams: bool


class WFSession:
    """Sessions that are safe for slow work, for one or more Flask apps.

    :param app: call :meth:`init_app` on this app now.
    :param db: a Flask-SQLAlchemy ``SQLAlchemy`` whose engines and
        ``db.session`` to adopt (default for :meth:`init_app`).
    :param engine: an engine to use instead (default for :meth:`init_app`).
    :param engine_options: defaults for the engine built from
        :confval:`WFSESSION_DATABASE_URI`; :confval:`WFSESSION_ENGINE_OPTIONS`
        overrides them.
    :param session_options: keyword arguments for the
        :class:`~sqlalchemy.orm.sessionmaker` of this extension's sessions.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: t.Any = None,
        engine: sa.Engine | None = None,
        engine_options: dict[str, t.Any] | None = None,
        session_options: dict[str, t.Any] | None = None,
    ) -> None:
        self._db = db
        self._engine = engine
        self._engine_options = dict(engine_options or {})
        self._session_options = dict(session_options or {})
        self._app_state: weakref.WeakKeyDictionary[Flask, _State] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, db: t.Any = None, engine: sa.Engine | None = None) -> None:
        """Register the extension on ``app``; read its configuration once.

        With ``db``, adopt its engines and ``db.session`` (call
        ``db.init_app(app)`` first). With ``engine``, use it. With neither,
        build an engine from :confval:`WFSESSION_DATABASE_URI`.

        :param app: the Flask app.
        :param db: a Flask-SQLAlchemy ``SQLAlchemy`` whose engines and
            ``db.session`` to adopt.
        :param engine: an engine to use.
        :raise SetupError: already registered, both ``db`` and ``engine``, or no
            database configured.
        :raise SettingError: a configuration value that is not one of its
            choices (a subclass of ``SetupError`` and ``ValueError``).
        """
        if _EXTENSION_KEY in app.extensions:
            raise SetupError(
                f"A 'WFSession' is already registered on app {app.name!r}. Call"
                " 'init_app' once per app; one 'WFSession' serves many apps."
            )
        db = db if db is not None else self._db
        engine = engine if engine is not None else self._engine
        if db is not None and engine is not None:
            raise SetupError("Pass either 'db' or 'engine' to 'init_app', not both.")
        config = app.config
        config.setdefault("WFSESSION_DATABASE_URI", None)
        config.setdefault("WFSESSION_ENGINE_OPTIONS", {})
        config.setdefault("WFSESSION_PENDING", "hold")
        config.setdefault("WFSESSION_GUARD", "warn")
        config.setdefault("WFSESSION_EXPIRE_ON_RELEASE", False)
        config.setdefault("WFSESSION_RELEASE_STREAMS", True)
        config.setdefault("WFSESSION_IDLE_WARNING", 1.0)
        pending = _settings.choice("WFSESSION_PENDING", config, PENDING_POLICIES)
        guard = _settings.choice("WFSESSION_GUARD", config, GUARD_MODES)
        expire = _settings.boolean("WFSESSION_EXPIRE_ON_RELEASE", config)
        streams = _settings.boolean("WFSESSION_RELEASE_STREAMS", config)
        idle_warning = _settings.seconds_or_none("WFSESSION_IDLE_WARNING", config)

        scoped: ScopedSource | None = None
        if db is not None:
            engines, scoped = adopt(app, db)
        elif engine is not None:
            engines = {None: engine}
        elif config["WFSESSION_DATABASE_URI"]:
            options = {**self._engine_options, **config["WFSESSION_ENGINE_OPTIONS"]}
            engines = {None: sa.create_engine(config["WFSESSION_DATABASE_URI"], **options)}
        else:
            raise SetupError(
                "No database for 'WFSession': set 'WFSESSION_DATABASE_URI', or pass"
                " 'engine=' or a Flask-SQLAlchemy 'db=' to 'init_app'."
            )
        watched = idle_warning is not None or _telemetry.has_opentelemetry()
        for key, each in engines.items():
            manage(each)
            _gevent.watch(each)
            _unit_checks.watch(each)
            if watched:
                _telemetry.watch(app, key, each, idle_warning)
        sessionmaker = make_sessionmaker(engines, self._session_options)
        state = self._app_state[app] = _State(
            engines=engines,
            sessionmaker=sessionmaker,
            scoped=scoped or ContextScoped(sessionmaker),
            detached=DetachedSessions(sessionmaker),
            pending=pending,
            guard=guard,
            expire_on_release=expire,
            release_streams=streams,
        )
        app.extensions[_EXTENSION_KEY] = self
        app_ref = weakref.ref(app)  # the app holds this function: no cycle through it

        def teardown_appcontext(exc: BaseException | None) -> None:
            teardown(t.cast(Flask, app_ref()), state.scoped)

        app.teardown_appcontext(teardown_appcontext)
        app.after_request(_after_request)

    def _get_state(self, app: Flask) -> _State:
        try:
            return self._app_state[app]
        except KeyError:
            raise SetupError(
                f"The app {app.name!r} is not registered with this 'WFSession'"
                " instance. Did you forget to call 'init_app'?"
            ) from None

    def _current(self, what: str) -> tuple[Flask, _State]:
        if not has_app_context():
            raise NoAppContextError(
                f"'{what}' needs an application context, and there is none. Inside a"
                " view or CLI command one is pushed for you; elsewhere use"
                " 'with app.app_context():', or detached mode: 'with"
                " wfs.detached(app) as session:', or a sessionmaker taken earlier"
                " from 'wfs.sessionmaker'."
            )
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return app, self._get_state(app)

    @property
    def session(self) -> orm.Session:
        """The current app context's session (scoped mode).

        Made on first use, one per app context, closed at teardown; with
        Flask-SQLAlchemy, this is ``db.session()``.

        :raise NoAppContextError: outside an app context.
        """
        return self._current("wfs.session")[1].scoped.get()

    @property
    def sessionmaker(self) -> orm.sessionmaker[orm.Session]:
        """A sessionmaker bound to the current app's engines, binds included.

        Sessions it makes need no app context; hand it to repositories and
        use it in any thread (each thread making its own sessions).
        """
        return self._current("wfs.sessionmaker")[1].sessionmaker

    @property
    def engine(self) -> sa.Engine:
        """The current app's default engine."""
        return self._current("wfs.engine")[1].engines[None]

    @property
    def engines(self) -> t.Mapping[str | None, sa.Engine]:
        """The current app's engines by bind key (``None`` is the default)."""
        return self._current("wfs.engines")[1].engines

    def detached(self, app: Flask | None = None) -> t.ContextManager[orm.Session]:
        """A new independent session for a ``with`` block (detached mode).

        Commits when the block succeeds, rolls back when it raises, always
        closes and returns its connection. Loaded values stay readable after
        the block (no expiry on commit).

        :param app: the app whose engines to use; the current app by default.
        """
        state = self._get_state(app) if app is not None else self._current("wfs.detached()")[1]
        return state.detached.session()

    @t.overload
    def transaction(self, func: t.Callable[P, R], /) -> t.Callable[P, R]: ...
    @t.overload
    def transaction(
        self, func: None = None, /, *, savepoint: bool = False, name: str | None = None
    ) -> _transaction.Transaction: ...
    def transaction(
        self,
        func: t.Callable[..., t.Any] | None = None,
        /,
        *,
        savepoint: bool = False,
        name: str | None = None,
    ) -> t.Callable[..., t.Any] | _transaction.Transaction:
        """A unit of work on the current app context's session.

        The outermost unit commits the session when it ends normally and rolls
        it back when it raises; units entered inside it join it and commit
        nothing. A unit that wrote nothing sends no ``COMMIT``. Inside a unit,
        ``session.commit()``, ``rollback()`` and ``close()`` raise
        :class:`~flask_wfsession.UnitOfWorkError`: the unit ends once.

        .. code-block:: python

            @wfs.transaction
            def rename(conversation_id: int, title: str) -> None:
                wfs.session.get_one(Conversation, conversation_id).title = title

            with wfs.transaction() as session:
                session.add(Message(...))

        Decorates functions and ``async def`` functions, not generators; ``with``
        and ``async with`` give the session. One :class:`Transaction` may serve
        ``with`` blocks in several threads and tasks at once.

        :param func: the function, when used as ``@wfs.transaction`` without
            parentheses.
        :param savepoint: inside an open unit, wrap this part in a SAVEPOINT:
            if it raises, only this part is undone and the unit goes on. The
            outermost unit needs none.
        :param name: the unit's name in errors and signals; by default the
            function's qualified name, or ``"with wfs.transaction()"``.
        :return: the decorated function with ``func``, else a
            :class:`Transaction` to use as a decorator or context manager.
        :raise NoAppContextError: entered outside an app context.
        """
        unit = _transaction.Transaction(self._unit_session, savepoint=savepoint, name=name)
        return unit if func is None else unit(func)

    def _unit_session(self) -> tuple[Flask, orm.Session]:
        app, state = self._current("wfs.transaction()")
        return app, state.scoped.get()

    def on_commit(self, fn: t.Callable[[], object]) -> None:
        """Call ``fn`` after the current unit of work commits.

        Outside a unit, after the next commit of the app context's session.
        Callbacks run in the order given, after the real commit: never after a
        rollback (those registered inside a savepoint that rolled back are
        dropped), and never after a release before a long-running step. If the
        app context ends with callbacks still waiting, they are dropped and
        reported (:class:`~flask_wfsession.DroppedCallbacksWarning`). A callback
        that raises is logged; the others still run and the commit stands.

        .. code-block:: python

            wfs.on_commit(lambda: summarize.delay(conversation_id))

        :param fn: called with no arguments.
        :raise NoAppContextError: outside an app context.
        """
        _callbacks.on_commit(self._current("wfs.on_commit()")[1].scoped.get(), fn)

    def _sessions_here(self, state: _State) -> list[orm.Session]:
        """The app context's session and this app's sessions holding a
        connection taken in this thread or greenlet (detached, sessionmaker),
        those in a transaction only: the others have nothing to release."""
        scoped = state.scoped.peek()
        sessions = (
            [scoped]
            if scoped is not None and scoped.in_transaction() and owned_here(scoped)
            else []
        )
        holding = _registry.in_this_thread()
        if holding:  # usually none: one dict lookup said so
            sessions += [
                s
                for s in holding
                if s is not scoped
                and s.in_transaction()
                and made_for(s, state.engines)
                and owned_here(s)
            ]
        return sessions

    def release(self, pending: Pending | None = None) -> list[orm.Session]:
        """End the transactions of this context's and thread's sessions now.

        The same release a long-running step does, without the guard.

        :param pending: policy for uncommitted writes;
            :confval:`WFSESSION_PENDING` by default.
        :return: the sessions whose transactions were ended (held ones are
            not among them).
        :raise PendingChangesError: pending writes under ``"raise"``.
        :raise SettingError: ``pending`` is not one of the policies.
        """
        policy = _settings.pending("release(pending=...)", pending)
        app, state = self._current("wfs.release()")
        return self._release(app, state, policy, None, "'release()'", user_frame)

    def _release(
        self,
        app: Flask,
        state: _State,
        pending: Pending | None,
        step: str | None,
        what: str,
        where: t.Callable[[], str | None],
    ) -> list[orm.Session]:
        sessions = self._sessions_here(state)
        if not sessions:  # a step or a chunk with nothing open: the common case
            return []
        return release_sessions(
            app,
            sessions,
            policy=pending or state.pending,
            expire=state.expire_on_release,
            step=step,
            what=what,
            where=where,
        )

    def pool_status(self) -> dict[str | None, dict[str, t.Any]]:
        """Who holds the current app's connections now, per bind key.

        Each value has ``size``, ``overflow`` (connections open beyond
        ``size``, 0 while there are fewer) and ``checked_out`` (the pool's
        figures, ``None`` for a pool without them) and ``holders``: one record
        per checked-out connection with ``endpoint`` (view endpoint, Celery
        task or thread), ``thread``, ``held_for`` (seconds), ``state``
        (running a statement, idle in transaction, held through a step) and
        ``began_at`` (where its transaction began, ``file:line``). Holders
        are listed while connections are watched: :confval:`WFSESSION_IDLE_WARNING`
        set (the default) or ``opentelemetry-api`` installed. The result is
        JSON-serialisable.
        """
        state = self._current("wfs.pool_status()")[1]
        status = {}
        for key, engine in state.engines.items():
            pool = engine.pool
            queue = pool if isinstance(pool, sa.pool.QueuePool) else None
            watched = _telemetry.watch_of(engine)
            status[key] = {
                "size": queue.size() if queue else None,
                # SQLAlchemy counts up from -size as it opens connections.
                "overflow": max(0, queue.overflow()) if queue else None,
                "checked_out": queue.checkedout() if queue else None,
                "holders": watched.snapshot() if watched else [],
            }
        return status

    def spawn(
        self, fn: t.Callable[P, t.Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> threading.Thread:
        """Run ``fn`` in a new thread, in a new app context with its own session.

        :param fn: called with ``args`` and ``kwargs``: ids and plain values,
            not attached ORM objects.
        :return: the started thread. An exception in ``fn`` is logged.
        :raise AttachedObjectError: an argument is an attached ORM object.
        """
        return _threads.spawn(self._current("wfs.spawn()")[0], fn, args, kwargs)

    def submit(
        self,
        executor: concurrent.futures.Executor,
        fn: t.Callable[P, R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> concurrent.futures.Future[R]:
        """Submit ``fn`` to ``executor`` to run in a new app context with its own session.

        :param executor: a ``concurrent.futures.ThreadPoolExecutor``, say.
        :param fn: called with ``args`` and ``kwargs``: ids and plain values,
            not attached ORM objects.
        :return: the future; an exception in ``fn`` is raised by ``result()``.
        :raise AttachedObjectError: an argument is an attached ORM object.
        """
        return _threads.submit(self._current("wfs.submit()")[0], executor, fn, args, kwargs)

    def init_celery(self, celery_app: t.Any, app: Flask | None = None) -> None:
        """Run every task of ``celery_app`` in an app context with its own session.

        Also disposes the engines' pools (keeping the parent's connections)
        in each new worker process.

        :param celery_app: the ``celery.Celery`` app.
        :param app: the Flask app; the current app by default.
        """
        if app is None:
            app = self._current("wfs.init_celery()")[0]
        _celery.connect(celery_app, app, self._get_state(app).engines.values())


def _extension_of(app: Flask) -> tuple[WFSession, _State] | None:
    ext = getattr(app, "extensions", {}).get(_EXTENSION_KEY)
    if not isinstance(ext, WFSession):
        return None
    state = ext._app_state.get(app)
    return None if state is None else (ext, state)


def _after_request(response: Response) -> Response:
    # Only a body that is really a generator is a stream to release around.
    # Error responses (abort(), 404) are "streamed" to Werkzeug too, and a
    # file response (direct passthrough) holds no session: both keep the
    # normal teardown. This runs on every request: the cheap test first.
    if not isinstance(response.response, types.GeneratorType) or response.direct_passthrough:
        return response
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    found = _extension_of(app)
    if found is None or not found[1].release_streams:
        return response
    ext, state = found
    endpoint = request.endpoint if has_request_context() else None
    what = f"the streamed response of {endpoint!r}" if endpoint else "a streamed response"

    def release() -> None:
        if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
            ext._release(app, state, None, None, what, lambda: None)

    return wrap_streamed(response, release)


def _scoped_sessions_here() -> list[orm.Session]:
    """The current app context's scoped session, if made (for fork safety)."""
    if not has_app_context():
        return []
    found = _extension_of(current_app._get_current_object())  # type: ignore[attr-defined]
    session = found[1].scoped.peek() if found is not None else None
    return [session] if session is not None else []


_fork.scoped_sessions_here = _scoped_sessions_here


def _current_source(session: orm.Session) -> ScopedSource | None:
    """The current app's scoped source (``session`` belongs to the current app context)."""
    found = _extension_of(current_app._get_current_object()) if has_app_context() else None  # type: ignore[attr-defined]
    return None if found is None else found[1].scoped


_scoped.current_source = _current_source


def _real_app(sender: t.Any) -> t.Any:
    """The app behind ``current_app`` when a sender passes the proxy."""
    get = getattr(sender, "_get_current_object", None)
    return get() if get is not None else sender


@signals.long_running_started.connect
def _on_step_started(sender: t.Any, *, step: str, pending: t.Any = None, **_: t.Any) -> None:
    app = _real_app(sender)
    found = _extension_of(app)
    if found is not None:
        ext, state = found
        policy = _settings.pending("pending", pending)
        # Released first: if that raises, the step is not entered.
        ext._release(app, state, policy, step, f"the long-running step {step!r}", user_frame)
        enter_step(step, state.guard)


@signals.long_running_finished.connect
def _on_step_finished(sender: t.Any, **_: t.Any) -> None:
    if _extension_of(_real_app(sender)) is not None:
        exit_step()
