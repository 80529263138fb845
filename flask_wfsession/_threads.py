"""Worker threads and executors: each worker gets its own app context and session.

A worker runs in a new application context of the caller's app (never the
caller's context or ``g``), with a copy of the caller's context variables
minus Flask's and ours, so its scoped session is its own and is closed when
it ends. Attached ORM objects are refused at the hand-over, where the mistake
is made, rather than failing later inside the worker.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import typing as t

import flask.globals
import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _long_running, _unit
from ._errors import AttachedObjectError
from ._guard import step_var
from ._pending import describe, identity_key

if t.TYPE_CHECKING:
    from flask import Flask

P = t.ParamSpec("P")
R = t.TypeVar("R")

_NOT_INHERITED: frozenset[contextvars.ContextVar[t.Any]] = frozenset(
    v
    for v in (
        getattr(flask.globals, "_cv_app", None),
        getattr(flask.globals, "_cv_request", None),
        step_var,
        # The caller's open units and 'with' blocks: not the worker's, and
        # they would keep the caller's frames alive while it runs.
        _unit.INSIDE,
        _unit.WITH.var,
        _long_running.WITH.var,
    )
    if v is not None
)


def _attached(value: object) -> bool:
    state = sa.inspect(value, raiseerr=False)
    return isinstance(state, orm.InstanceState) and state.session is not None


def check_handover(args: tuple[t.Any, ...], kwargs: dict[str, t.Any]) -> None:
    """Refuse attached ORM objects among the arguments, one container level deep.

    :raise AttachedObjectError: naming the object and what to pass instead.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, dict):
            items: t.Iterable[t.Any] = (*value.keys(), *value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        else:
            items = (value,)
        for item in items:
            if _attached(item):
                key = identity_key(item)
                raise AttachedObjectError(
                    f"{describe(item)} is attached to a session and cannot be handed"
                    " to a worker: the worker would share the caller's session across"
                    " threads, or lazy-load after it closed. Pass its primary key"
                    f" ({key!r}) and load it in the worker with"
                    f" 'wfs.session.get({type(item).__name__}, {key!r})'."
                )


def _worker_context() -> contextvars.Context:
    fresh = contextvars.Context()
    for var, value in contextvars.copy_context().items():
        if var not in _NOT_INHERITED:
            fresh.run(var.set, value)
    return fresh


def _in_app_context(app: Flask, fn: t.Callable[..., R], args: t.Any, kwargs: t.Any) -> R:
    with app.app_context():
        return fn(*args, **kwargs)


def spawn(app: Flask, fn: t.Callable[..., t.Any], args: t.Any, kwargs: t.Any) -> threading.Thread:
    """Start ``fn`` in a new thread with its own app context; log its failure."""
    check_handover(args, kwargs)
    name = getattr(fn, "__qualname__", repr(fn))

    def run() -> None:
        try:
            _in_app_context(app, fn, args, kwargs)
        except Exception:
            app.logger.exception("Worker %r started with 'wfs.spawn' failed.", name)

    thread = threading.Thread(target=_worker_context().run, args=(run,), name=f"wfsession:{name}")
    thread.start()
    return thread


def submit(
    app: Flask,
    executor: concurrent.futures.Executor,
    fn: t.Callable[..., R],
    args: t.Any,
    kwargs: t.Any,
) -> concurrent.futures.Future[R]:
    """Submit ``fn`` to ``executor`` to run with its own app context."""
    check_handover(args, kwargs)
    return executor.submit(_worker_context().run, _in_app_context, app, fn, args, kwargs)
