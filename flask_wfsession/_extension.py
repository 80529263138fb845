"""The extension object and its per-app state.

One :class:`WFSession` serves any number of apps. What belongs to an app
(engines, sessionmaker, scoped source, configuration) lives in a
:class:`_State` keyed by the app in a weak dictionary, never on ``self``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import typing as t
import weakref

import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask, current_app, has_app_context
from werkzeug.wrappers import Response

from . import _celery, _threads, signals
from ._detached import DetachedSessions
from ._errors import NoAppContextError, SetupError
from ._fork import manage
from ._fsa import adopt
from ._guard import GuardMode, enter_step, exit_step, owned_here
from ._release import PENDING_POLICIES, Pending, release_sessions
from ._scoped import ContextScoped, ScopedSource, teardown
from ._session import make_sessionmaker
from ._streaming import wrap_streamed

P = t.ParamSpec("P")
R = t.TypeVar("R")

_EXTENSION_KEY = "wfsession"
_GUARD_MODES: tuple[GuardMode, ...] = ("raise", "warn", "off")


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


def _choice(app: Flask, key: str, choices: tuple[str, ...]) -> t.Any:
    value = app.config[key]
    if value not in choices:
        raise SetupError(
            f"'{key}' is {value!r}; it must be one of {', '.join(map(repr, choices))}."
        )
    return value


class WFSession:
    """Sessions that are safe for slow work, for one or more Flask apps.

    :param app: call :meth:`init_app` on this app now.
    :param db: a Flask-SQLAlchemy ``SQLAlchemy`` whose engines and
        ``db.session`` to adopt (default for :meth:`init_app`).
    :param engine: an engine to use instead (default for :meth:`init_app`).
    :param engine_options: defaults for the engine built from
        ``WFSESSION_DATABASE_URI``; ``WFSESSION_ENGINE_OPTIONS`` overrides them.
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
        build an engine from ``WFSESSION_DATABASE_URI``.

        :raise SetupError: already registered, both ``db`` and ``engine``, no
            database configured, or a configuration value out of range.
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
        config.setdefault("WFSESSION_PENDING", "raise")
        config.setdefault("WFSESSION_GUARD", "raise")
        config.setdefault("WFSESSION_EXPIRE_ON_RELEASE", False)
        config.setdefault("WFSESSION_RELEASE_STREAMS", True)
        pending = _choice(app, "WFSESSION_PENDING", PENDING_POLICIES)
        guard = _choice(app, "WFSESSION_GUARD", _GUARD_MODES)

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
        for each in engines.values():
            manage(each)
        sessionmaker = make_sessionmaker(engines, self._session_options)
        state = self._app_state[app] = _State(
            engines=engines,
            sessionmaker=sessionmaker,
            scoped=scoped or ContextScoped(sessionmaker),
            detached=DetachedSessions(sessionmaker),
            pending=pending,
            guard=guard,
            expire_on_release=bool(config["WFSESSION_EXPIRE_ON_RELEASE"]),
            release_streams=bool(config["WFSESSION_RELEASE_STREAMS"]),
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

    def _sessions_here(self, state: _State) -> list[orm.Session]:
        sessions = [s for s in (state.scoped.peek(),) if s is not None and owned_here(s)]
        return sessions + state.detached.open_in_this_thread()

    def release(self, pending: Pending | None = None) -> list[orm.Session]:
        """End the transactions of this context's and thread's sessions now.

        The same release a long-running step does, without the guard.

        :param pending: policy for uncommitted writes; ``WFSESSION_PENDING``
            by default.
        :return: the sessions whose transactions were ended.
        :raise PendingChangesError: pending writes under ``"raise"``.
        """
        app, state = self._current("wfs.release()")
        return self._release(app, state, pending, None)

    def _release(
        self, app: Flask, state: _State, pending: Pending | None, step: str | None
    ) -> list[orm.Session]:
        return release_sessions(
            app,
            self._sessions_here(state),
            policy=pending or state.pending,
            expire=state.expire_on_release,
            step=step,
        )

    def spawn(
        self, fn: t.Callable[P, t.Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> threading.Thread:
        """Run ``fn`` in a new thread, in a new app context with its own session.

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

        :return: the future; an exception in ``fn`` is raised by ``result()``.
        :raise AttachedObjectError: an argument is an attached ORM object.
        """
        return _threads.submit(self._current("wfs.submit()")[0], executor, fn, args, kwargs)

    def init_celery(self, celery_app: t.Any, app: Flask | None = None) -> None:
        """Run every task of ``celery_app`` in an app context with its own session.

        Also disposes the engines' pools (keeping the parent's connections)
        in each new worker process.

        :param app: the Flask app; the current app by default.
        """
        if app is None:
            app = self._current("wfs.init_celery()")[0]
        _celery.connect(celery_app, app, self._get_state(app).engines.values())


def _extension_of(app: Flask) -> tuple[WFSession, _State] | None:
    ext = app.extensions.get(_EXTENSION_KEY)
    if not isinstance(ext, WFSession):
        return None
    state = ext._app_state.get(app)
    return None if state is None else (ext, state)


def _after_request(response: Response) -> Response:
    # The common case first: this runs on every request. A file response
    # (direct passthrough) holds no session and is left to the server.
    if not response.is_streamed or response.direct_passthrough:
        return response
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    found = _extension_of(app)
    if found is None or not found[1].release_streams:
        return response
    ext, state = found

    def release() -> None:
        if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
            ext._release(app, state, None, None)

    return wrap_streamed(response, release)


@signals.long_running_started.connect
def _on_step_started(app: Flask, *, step: str, pending: Pending | None = None, **_: t.Any) -> None:
    found = _extension_of(app)
    if found is not None:
        ext, state = found
        ext._release(app, state, pending, step)
        enter_step(step, state.guard)


@signals.long_running_finished.connect
def _on_step_finished(app: Flask, **_: t.Any) -> None:
    if _extension_of(app) is not None:
        exit_step()
