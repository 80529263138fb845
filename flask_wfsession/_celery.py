"""Celery: every task in an app context of its own, and fresh pools per worker.

Connected through Celery's signals, so it covers tasks defined before and
after :meth:`~flask_wfsession.WFSession.init_celery`, whatever their base
class. In eager mode the task runs in the caller's thread but still in a new
app context, so it gets a session separate from the caller's.
"""

from __future__ import annotations

import threading
import typing as t
import weakref

from ._errors import SetupError
from ._fork import dispose_pools
from ._telemetry import work_name

if t.TYPE_CHECKING:
    import sqlalchemy as sa
    from flask import Flask
    from flask.ctx import AppContext


# Celery apps already connected: a second connection would push two app
# contexts around every task.
_connected: weakref.WeakSet[t.Any] = weakref.WeakSet()


def connect(celery_app: t.Any, app: Flask, engines: t.Iterable[sa.Engine]) -> None:
    """Push an app context around each task of ``celery_app``; dispose pools in workers.

    :raise SetupError: ``celery_app`` is already connected.
    """
    from celery import signals as celery_signals  # type: ignore[import-untyped]

    if celery_app in _connected:
        raise SetupError(
            f"'init_celery' was already called for the Celery app {celery_app.main!r}."
            " Call it once per Celery app."
        )
    _connected.add(celery_app)

    # The running tasks' contexts, per task id and thread (or greenlet), as a
    # stack: an eager retry runs inside the attempt it retries, with the same
    # id, and a retried task may start in another greenlet before the first
    # attempt has finished. Not a thread-local, which an app built before
    # gevent's monkey-patching would share between greenlets.
    running: dict[tuple[str, int], list[tuple[AppContext, t.Any]]] = {}
    engines = list(engines)

    def task_prerun(sender: t.Any = None, task_id: str = "", **_: t.Any) -> None:
        if sender is None or sender.app is not celery_app:
            return
        ctx = app.app_context()
        ctx.push()
        named = work_name.set(getattr(sender, "name", None))
        running.setdefault((task_id, threading.get_ident()), []).append((ctx, named))

    def task_postrun(
        sender: t.Any = None, task_id: str = "", retval: t.Any = None, **_: t.Any
    ) -> None:
        if sender is None or sender.app is not celery_app:
            return
        key = (task_id, threading.get_ident())
        stack = running[key]
        ctx, named = stack.pop()
        if not stack:
            del running[key]
        # Teardown rolls back what the task did not commit and reports it;
        # a failed or retried task hands its exception to the teardown.
        try:
            ctx.pop(retval if isinstance(retval, BaseException) else None)
        finally:
            work_name.reset(named)

    def worker_process_init(**_: t.Any) -> None:
        dispose_pools(engines)

    celery_signals.task_prerun.connect(task_prerun, weak=False)
    celery_signals.task_postrun.connect(task_postrun, weak=False)
    celery_signals.worker_process_init.connect(worker_process_init, weak=False)
