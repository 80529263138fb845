"""Who holds the connections, for how long, and where their transactions began.

Each managed engine gets a :class:`Watch`. Its pool's ``checkout`` and
``checkin`` events keep one :class:`Holder` per checked-out connection: who
took it (view endpoint, Celery task or thread) and when. When a session's
transaction takes the connection (the session's ``after_begin``, see
:func:`began`), the holder notes where in the user's code it began; from
then until the transaction ends, each statement on that connection, the
ORM's and raw SQL on ``session.connection()`` alike, notes when it ended and
where. Statements are timed by wrapping the engine's dialect's
``do_execute`` methods: one function call each, where connection events
would cost a dozen. From these:

* **idle in transaction**: when a statement, or the end of the transaction,
  comes more than ``WFSESSION_IDLE_WARNING`` seconds after the previous
  statement ended, outside a long-running step, the gap is reported once,
  with the three call sites;
* **pool timeouts**: a checkout that times out raises
  :class:`~flask_wfsession.PoolTimeoutError` listing every holder;
* **a snapshot** for :meth:`~flask_wfsession.WFSession.pool_status`;
* **metrics**, when ``opentelemetry-api`` is installed: OpenTelemetry's
  ``db.client.connection.*`` instruments, plus a histogram of the time each
  transaction spent idle.

An engine is watched when ``WFSESSION_IDLE_WARNING`` is set (the default) or
``opentelemetry-api`` is installed. Call sites are ``file:line`` of the first
frame in the user's code; no SQL text, parameters or row data are recorded.
"""

from __future__ import annotations

import contextvars
import importlib.util
import threading
import time
import typing as t
import weakref

import sqlalchemy as sa
from flask import Request, request

from . import _report, signals
from ._callsite import user_frame
from ._errors import IdleInTransactionWarning, PoolTimeoutError

if t.TYPE_CHECKING:
    from flask import Flask

HOLDERS = "flask_wfsession.holders"  # Session.info: the holders of its transaction's connections
_HOLDER = "flask_wfsession.holder"  # connection record info: the current Holder
_POOL_NAME = "db.client.connection.pool.name"
_current_request: t.Callable[[], Request] = t.cast(t.Any, request)._get_current_object

work_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flask_wfsession.work_name", default=None
)
"""The name of the Celery task running in this context, for reports."""

ending: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flask_wfsession.ending", default=None
)
"""Set while the extension itself ends a transaction (``"the app context's
teardown"``): the end of an idle gap is then named by it, not by a frame."""


class Holder:
    """One checked-out connection, and its session transaction if it has one.

    Made on every checkout, so it stores only what is cheap to take (the
    request, the Celery task's name, the thread's ident) and works the rest
    out when a report asks. Its transaction's fields default to the class's.
    """

    connection: int | None = None  # id() of the session transaction's Connection
    began_at: str | None = None  # its first statement's call site
    running = False
    last_end: float | None = None
    last_at: str | None = None
    idle_total = 0.0
    held_in: str | None = None  # the step the "hold" policy kept it through
    _attributes: dict[str, str] | None = None

    def __init__(self, watch: Watch, since: float) -> None:
        self.watch = watch
        self.since = since
        try:
            self.request: Request | None = _current_request()
        except RuntimeError:  # no request: a CLI command, a worker thread, a Celery task
            self.request = None
        self.work = work_name.get()
        self.thread = threading.get_ident()

    @property
    def thread_name(self) -> str:
        """The name of the thread that took the connection."""
        for thread in threading.enumerate():
            if thread.ident == self.thread:
                return thread.name
        return f"thread {self.thread}"

    @property
    def who(self) -> str:
        """The view endpoint, Celery task or thread that took the connection."""
        if self.request is not None:
            return str(self.request.endpoint or self.request.path)
        return self.work or self.thread_name

    @property
    def attributes(self) -> dict[str, str]:
        """Metric attributes: the pool's name and the endpoint."""
        if self._attributes is None:
            self._attributes = {**self.watch.pool_name, "flask.endpoint": self.who}
        return self._attributes

    def idle(self, idle: float, until: str | None) -> None:
        """A statement or the transaction's end comes ``idle`` s after the last statement."""
        self.idle_total += idle
        threshold = self.watch.idle_warning
        if self.held_in is None and threshold is not None and idle > threshold:
            self.watch.idle(self, idle, ending.get() or until or user_frame(2))
        self.held_in = None

    def record(self, now: float) -> dict[str, t.Any]:
        """What :meth:`~flask_wfsession.WFSession.pool_status` shows of it."""
        if self.held_in is not None:
            state = f"held by the 'hold' policy through step {self.held_in!r}"
        elif self.connection is None:
            state = "checked out, no session transaction"
        elif self.running or self.last_end is None:
            state = "running a statement"
        else:
            state = f"idle in transaction for {now - self.last_end:.1f} s"
        return {
            "endpoint": self.who,
            "thread": self.thread_name,
            "held_for": round(now - self.since, 3),
            "state": state,
            "began_at": self.began_at,
        }


_TRANSACTION_FIELDS = (
    "connection",
    "began_at",
    "running",
    "last_end",
    "last_at",
    "idle_total",
    "held_in",
)


def began(info: dict[t.Any, t.Any], connection: sa.Connection) -> None:
    """A session transaction took ``connection`` (its ``after_begin``; ``info``: the session's)."""
    holder: Holder | None = connection.connection.info.get(_HOLDER)
    if holder is None or holder.connection is not None:  # not watched; already begun
        return
    holder.connection = id(connection)
    holder.watch.transactions[id(connection)] = holder
    info.setdefault(HOLDERS, []).append(holder)


def ended(info: dict[t.Any, t.Any]) -> None:
    """A session's outermost transaction ended (``info``: the session's)."""
    for holder in info[HOLDERS]:
        if holder.last_end is not None:
            holder.idle(time.monotonic() - holder.last_end, None)
        watched = holder.watch
        if watched.meter is not None:
            watched.meter.idle.record(holder.idle_total, holder.attributes)
        watched.transactions.pop(holder.connection, None)
        fields = holder.__dict__
        for name in _TRANSACTION_FIELDS:  # back to the class's defaults
            fields.pop(name, None)


def held(info: dict[t.Any, t.Any], step: str) -> None:
    """The "hold" policy keeps a session's connections through ``step``: say so in reports."""
    for holder in info.get(HOLDERS, ()):
        holder.held_in = step


def _timed(transactions: dict[int | None, Holder], execute: t.Any) -> t.Any:
    """Wrap a dialect's ``do_execute*`` method to time statements in session transactions."""

    def timed(cursor: t.Any, statement: str, *args: t.Any) -> t.Any:
        context = args[-1]
        holder = transactions.get(id(context.root_connection)) if context is not None else None
        if holder is None:
            return execute(cursor, statement, *args)
        if holder.last_end is not None:
            holder.idle(time.monotonic() - holder.last_end, None)
        holder.running = True
        try:
            return execute(cursor, statement, *args)
        finally:
            holder.running = False
            holder.last_end = time.monotonic()
            holder.last_at = user_frame(1, _timed)
            if holder.began_at is None:  # the transaction's first statement
                holder.began_at = holder.last_at or "?"

    return timed


class _Metrics:
    """OpenTelemetry instruments, made once (``opentelemetry-api`` installed).

    An instrument name can be registered once per meter, so one observable
    counter reports every watched engine's pool.
    """

    def __init__(self) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter("flask_wfsession")
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time", unit="s", description="Time a connection was held"
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time", unit="s", description="Time to get a connection"
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts", unit="{timeout}", description="Checkout timeouts"
        )
        self.idle = meter.create_histogram(
            "flask_wfsession.idle_in_transaction.time",
            unit="s",
            description="Time a transaction's connection sat idle between its statements",
        )

        def count(options: t.Any) -> t.Iterable[t.Any]:
            state = "db.client.connection.state"
            for watched in list(_watches.values()):
                pool = watched.engine.pool
                if isinstance(pool, sa.pool.QueuePool):
                    yield metrics.Observation(
                        pool.checkedout(), {**watched.pool_name, state: "used"}
                    )
                    yield metrics.Observation(
                        pool.checkedin(), {**watched.pool_name, state: "idle"}
                    )

        meter.create_observable_up_down_counter(
            "db.client.connection.count", callbacks=[count], unit="{connection}"
        )


_metrics: list[_Metrics] = []


def _instruments() -> _Metrics:
    if not _metrics:
        _metrics.append(_Metrics())
    return _metrics[0]


class Watch:
    """The holders of one managed engine's connections."""

    def __init__(
        self, app: Flask, bind_key: str | None, engine: sa.Engine, idle_warning: float | None
    ) -> None:
        self._app = weakref.ref(app)
        self.bind_key = bind_key
        self.engine = engine
        self.idle_warning = idle_warning
        self.pool_name = {_POOL_NAME: f"{app.name}:{bind_key or 'default'}"}
        self.holders: dict[int, Holder] = {}  # by id() of the pool's connection record
        self.transactions: dict[int | None, Holder] = {}  # by id() of the session's Connection
        self.meter = _instruments() if has_opentelemetry() else None
        dialect = engine.dialect
        for name in ("do_execute", "do_execute_no_params", "do_executemany"):
            setattr(dialect, name, _timed(self.transactions, getattr(dialect, name)))
        _watch_pool(engine, self)

    def snapshot(self) -> list[dict[str, t.Any]]:
        now = time.monotonic()
        return [holder.record(now) for holder in list(self.holders.values())]

    def idle(self, holder: Holder, idle: float, until: str | None) -> None:
        """Report one idle-in-transaction gap."""
        app = self._app()
        if app is None:
            return
        who = holder.who
        _report.report(
            f"A database connection sat idle in a transaction for {idle:.1f} s in"
            f" {who!r}, outside any long-running step: between {holder.last_at} and"
            f" {until} (the transaction began at {holder.began_at}). If code between"
            " those two lines waits for something slow (an LLM, an HTTP call), decorate"
            " that call with '@long_running', or commit before it.",
            IdleInTransactionWarning,
            signals.idle_in_transaction,
            app,
            reraise=False,
            duration=idle,
            endpoint=who,
            began_at=holder.began_at,
            idle_from=holder.last_at,
            idle_until=until,
        )

    def timed_out(self, error: sa.exc.TimeoutError, started: float) -> PoolTimeoutError:
        if self.meter is not None:
            attributes = Holder(self, started).attributes  # the waiter's
            self.meter.wait_time.record(time.monotonic() - started, attributes)
            self.meter.timeouts.add(1, attributes)
        holders = self.snapshot()
        lines = "; ".join(
            f"{h['endpoint']!r} (thread {h['thread']!r}) for {h['held_for']:.1f} s,"
            f" {h['state']}, transaction began at {h['began_at']}"
            for h in holders
        )
        return PoolTimeoutError(
            f"{error} The connections were held by: {lines or 'nobody this extension saw'}."
            " A connection held across slow work is the usual cause: decorate the slow"
            " call with '@long_running', or commit before it.",
            holders,
        )


# Engines live as long as their app; a plain dict is the cheapest lookup.
_watches: dict[sa.Engine, Watch] = {}


def watch(app: Flask, bind_key: str | None, engine: sa.Engine, idle_warning: float | None) -> None:
    """Watch ``engine`` for ``app`` (once per engine)."""
    if engine not in _watches:
        _watches[engine] = Watch(app, bind_key, engine, idle_warning)


def has_opentelemetry() -> bool:
    """Whether ``opentelemetry-api`` is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("opentelemetry.metrics") is not None
    except (ModuleNotFoundError, ValueError):  # no namespace package; a stubbed module
        return False


def watch_of(engine: sa.Engine) -> Watch | None:
    """The watch of ``engine``, if it has one."""
    return _watches.get(engine)


def _watch_pool(engine: sa.Engine, watched: Watch) -> None:
    """Follow ``engine``'s pool's checkouts, and report its timeouts.

    The pool's class is swapped for a subclass of it whose ``_do_get`` and
    ``_do_return_conn`` (the methods every pool implements) tell ``watched``:
    one call each, where the pool's ``checkout``/``checkin`` events cost
    three. A checkout that times out raises :class:`PoolTimeoutError`.
    ``Engine.dispose()`` builds the new pool from ``pool.__class__``, so it
    stays watched.
    """
    pool = engine.pool
    base = type(pool)
    base_get, base_return = base._do_get, base._do_return_conn

    holders, transactions, meter = watched.holders, watched.transactions, watched.meter

    def _do_get(self: sa.pool.Pool) -> t.Any:
        started = time.monotonic()
        try:
            record = base_get(self)
        except sa.exc.TimeoutError as error:
            raise watched.timed_out(error, started) from error
        now = time.monotonic()
        holder = record.info[_HOLDER] = holders[id(record)] = Holder(watched, now)
        if meter is not None:
            meter.wait_time.record(now - started, holder.attributes)
        return record

    def _do_return_conn(self: sa.pool.Pool, record: t.Any) -> None:
        holder: Holder | None = record.info.pop(_HOLDER, None)
        if holder is not None:
            del holders[id(record)]
            transactions.pop(holder.connection, None)
            if meter is not None:
                meter.use_time.record(time.monotonic() - holder.since, holder.attributes)
        base_return(self, record)

    methods = {"_do_get": _do_get, "_do_return_conn": _do_return_conn}
    pool.__class__ = type(base.__name__, (base,), methods)
