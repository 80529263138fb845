"""Who holds the connections, for how long, and where their transactions began.

Each managed engine gets a :class:`Watch` that listens to its pool's
``checkout`` and ``checkin`` events (pool events: no cost on statements) and
keeps one :class:`Holder` per checked-out connection: who took it (view
endpoint, Celery task or thread) and when. A session's transaction gets an
:class:`Activity`, created when it takes a connection: where it began, and
when its last statement ended and where. From these:

* **idle in transaction**: when a statement (or a commit) starts more than
  ``WFSESSION_IDLE_WARNING`` seconds after the previous one ended, outside a
  long-running step, the gap is reported once with the three call sites;
* **pool timeouts**: a checkout that times out raises
  :class:`~flask_wfsession.PoolTimeoutError` listing every holder;
* **a snapshot** for :meth:`~flask_wfsession.WFSession.pool_status`;
* **metrics**, when ``opentelemetry-api`` is installed: OpenTelemetry's
  ``db.client.connection.*`` instruments, plus a histogram of idle time.

Engines are watched only when ``WFSESSION_IDLE_WARNING`` is set: timing
every statement still costs more than its budget, so it is opt-in for now.

Call sites are ``file:line`` of the first frame in the user's code; no SQL
text, parameters or row data are ever recorded.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import threading
import time
import typing as t
import weakref

import sqlalchemy as sa
from flask import has_request_context, request

from . import _report, signals
from ._callsite import user_frame
from ._errors import IdleInTransactionWarning, PoolTimeoutError

if t.TYPE_CHECKING:
    from flask import Flask

ACTIVITY = "flask_wfsession.activity"  # Session.info: the open transaction's Activity
_HOLDER = "flask_wfsession.holder"  # connection record info: the current Holder

work_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flask_wfsession.work_name", default=None
)
"""The name of the Celery task running in this context, for reports."""


def _who() -> str:
    if has_request_context():
        return str(request.endpoint or request.path)
    return work_name.get() or threading.current_thread().name


@dataclasses.dataclass(eq=False)
class Activity:
    """What one session transaction has done, for idle and holder reports."""

    watch: Watch
    began: float
    began_at: str | None
    running: bool = False
    last_end: float | None = None
    last_at: str | None = None
    held_in: str | None = None  # the step the "hold" policy kept it through

    def starting(self) -> None:
        """A statement (or commit) starts: report the gap before it if too long."""
        held, self.held_in = self.held_in, None
        threshold = self.watch.idle_warning
        if self.last_end is None or held is not None:
            return
        idle = time.monotonic() - self.last_end
        if threshold is not None and idle > threshold:
            self.watch.idle(self, idle, user_frame())
        elif self.watch.meter is not None:
            self.watch.meter.idle.record(idle, self.watch.attributes())

    def ended(self) -> None:
        self.running = False
        self.last_end = time.monotonic()
        self.last_at = user_frame()

    def state(self, now: float) -> str:
        if self.held_in is not None:
            return f"held by the 'hold' policy through step {self.held_in!r}"
        if self.running or self.last_end is None:
            return "running a statement"
        return f"idle in transaction for {now - self.last_end:.1f} s"


@dataclasses.dataclass(eq=False)
class Holder:
    """One checked-out connection."""

    who: str
    thread: str
    since: float
    activity: Activity | None = None

    def record(self, now: float) -> dict[str, t.Any]:
        activity = self.activity
        return {
            "endpoint": self.who,
            "thread": self.thread,
            "held_for": round(now - self.since, 3),
            "state": activity.state(now) if activity else "checked out, no session transaction",
            "began_at": activity.began_at if activity else None,
        }


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
            description="Time a connection sat in an open transaction between statements",
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
        self.pool_name = {"db.client.connection.pool.name": f"{app.name}:{bind_key or 'default'}"}
        self.holders: dict[int, Holder] = {}
        self.meter = _instruments() if has_opentelemetry() else None
        sa.event.listen(engine, "checkout", self._checkout)
        sa.event.listen(engine, "checkin", self._checkin)
        _report_timeouts(engine, self)

    def attributes(self) -> dict[str, str]:
        return {**self.pool_name, "flask.endpoint": _who()}

    def _checkout(self, dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
        holder = Holder(_who(), threading.current_thread().name, time.monotonic())
        record.info[_HOLDER] = holder
        self.holders[id(record)] = holder

    def _checkin(self, dbapi_connection: t.Any, record: t.Any) -> None:
        holder = self.holders.pop(id(record), None)
        record.info.pop(_HOLDER, None)
        if holder is not None and self.meter is not None:
            self.meter.use_time.record(time.monotonic() - holder.since, self.attributes())

    def began(self, connection: sa.Connection) -> Activity:
        """A session transaction took ``connection``: start its activity record."""
        activity = Activity(self, time.monotonic(), user_frame())
        holder = connection.info.get(_HOLDER)
        if holder is not None:
            holder.activity = activity
        return activity

    def snapshot(self) -> list[dict[str, t.Any]]:
        now = time.monotonic()
        return [holder.record(now) for holder in list(self.holders.values())]

    def idle(self, activity: Activity, idle: float, until: str | None) -> None:
        """Report one idle-in-transaction gap."""
        app = self._app()
        who = _who()
        if self.meter is not None:
            self.meter.idle.record(idle, self.attributes())
        if app is None:
            return
        _report.report(
            f"A database connection sat idle in a transaction for {idle:.1f} s in"
            f" {who!r}, outside any long-running step: between {activity.last_at} and"
            f" {until} (the transaction began at {activity.began_at}). If code between"
            " those two lines waits for something slow (an LLM, an HTTP call), decorate"
            " that call with '@long_running', or commit before it.",
            IdleInTransactionWarning,
            signals.idle_in_transaction,
            app,
            reraise=False,
            duration=idle,
            endpoint=who,
            began_at=activity.began_at,
            idle_from=activity.last_at,
            idle_until=until,
        )

    def timed_out(self, error: sa.exc.TimeoutError) -> PoolTimeoutError:
        if self.meter is not None:
            self.meter.timeouts.add(1, self.attributes())
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


# Engines live as long as their app; a plain dict is the cheapest lookup per transaction.
_watches: dict[sa.Engine, Watch] = {}


_watching: list[bool] = []
"""Non-empty once any engine is watched: statements are then timed (tested per statement)."""


def watch(app: Flask, bind_key: str | None, engine: sa.Engine, idle_warning: float | None) -> None:
    """Watch ``engine`` for ``app`` (once per engine)."""
    if engine not in _watches:
        _watches[engine] = Watch(app, bind_key, engine, idle_warning)
        _watching[:] = [True]


def has_opentelemetry() -> bool:
    """Whether ``opentelemetry-api`` is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("opentelemetry.metrics") is not None
    except ModuleNotFoundError:  # not even the namespace package
        return False


def watch_of(engine: sa.Engine) -> Watch | None:
    """The watch of ``engine``, if it has one."""
    return _watches.get(engine)


def _report_timeouts(engine: sa.Engine, watched: Watch) -> None:
    """Make ``engine``'s pool raise :class:`PoolTimeoutError` on a checkout timeout.

    The pool's class is swapped for a subclass of it; ``Engine.dispose()``
    builds the new pool from ``pool.__class__``, so it keeps reporting.
    """
    pool = engine.pool
    if not isinstance(pool, sa.pool.QueuePool):
        return
    base = type(pool)

    def _do_get(self: sa.pool.QueuePool) -> t.Any:
        started = time.monotonic()
        try:
            return base._do_get(self)
        except sa.exc.TimeoutError as error:
            raise watched.timed_out(error) from error
        finally:
            if watched.meter is not None:
                watched.meter.wait_time.record(time.monotonic() - started, watched.attributes())

    pool.__class__ = type(base.__name__, (base,), {"_do_get": _do_get})
