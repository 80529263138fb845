"""Long-running steps: mark slow work so no connection is held across it.

:func:`long_running` only sends :data:`~flask_wfsession.signals.long_running_started`
and :data:`~flask_wfsession.signals.long_running_finished`; it does not know
about sessions. The extension listens and does the releasing, so this module
works, and is a no-op, in code that runs without Flask or without the
extension.
"""

from __future__ import annotations

import functools
import inspect
import time
import typing as t
from types import TracebackType

from flask.globals import _cv_app

from . import _settings, signals
from ._blocks import OpenBlocks
from ._guard import step_var
from ._settings import Pending

P = t.ParamSpec("P")
R = t.TypeVar("R")


class _step:
    """Send the signals around a step's body (a ``with`` block).

    The step mark the extension's receivers set is this thread's or task's
    state, so it is restored here whatever any receiver does: a receiver that
    raises fails this step only, never the steps and requests that follow.
    ``long_running_finished`` is sent whenever ``long_running_started`` was,
    with the exception if a receiver of ``started`` raised. A class, not a
    ``contextmanager``: generator steps enter one per item.
    """

    __slots__ = ("app", "name", "outer", "pending", "started")

    def __init__(self, name: str, pending: Pending | None) -> None:
        self.name = name
        self.pending = pending
        self.app: t.Any = None

    def __enter__(self) -> None:
        ctx = _cv_app.get(None)
        if ctx is None:  # no app context: a no-op
            return
        self.app = ctx.app
        self.outer = step_var.get()
        self.started = time.perf_counter()
        try:
            signals.long_running_started.send(self.app, step=self.name, pending=self.pending)
        except BaseException as e:
            self._finish(e)
            raise
        self.started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.app is not None:
            self._finish(exc)

    def _finish(self, error: BaseException | None) -> None:
        try:
            duration = time.perf_counter() - self.started
            signals.long_running_finished.send(
                self.app, step=self.name, duration=duration, exception=error
            )
        finally:
            step_var.set(self.outer)


def _wrap_generator(func: t.Any, name: str, pending: Pending | None) -> t.Any:
    @functools.wraps(func)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        gen = func(*args, **kwargs)
        sent: t.Any = None
        thrown: BaseException | None = None
        try:
            while True:
                with _step(name, pending):
                    try:
                        item = gen.send(sent) if thrown is None else gen.throw(thrown)
                    except StopIteration as stop:
                        return stop.value
                thrown = None
                try:
                    sent = yield item
                except GeneratorExit:
                    raise
                except BaseException as e:
                    thrown = e
        finally:
            gen.close()

    return wrapper


def _wrap_async_generator(func: t.Any, name: str, pending: Pending | None) -> t.Any:
    @functools.wraps(func)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        agen = func(*args, **kwargs)
        sent: t.Any = None
        thrown: BaseException | None = None
        try:
            while True:
                with _step(name, pending):
                    try:
                        item = await (agen.asend(sent) if thrown is None else agen.athrow(thrown))
                    except StopAsyncIteration:
                        return
                thrown = None
                try:
                    sent = yield item
                except GeneratorExit:
                    raise
                except BaseException as e:
                    thrown = e
        finally:
            await agen.aclose()

    return wrapper


# The 'with long_running()' blocks open in this thread or task.
WITH: OpenBlocks[_step] = OpenBlocks("flask_wfsession.long_running")


class LongRunning:
    """A long-running step; see :func:`long_running`.

    Usable as a decorator, and as a context manager (``with`` and
    ``async with``); one object may serve several threads and tasks at once.
    """

    def __init__(self, step: str | None = None, pending: Pending | None = None) -> None:
        self.step = step
        self.pending: Pending | None = _settings.pending("long_running(pending=...)", pending)

    def __call__(self, func: t.Callable[P, R]) -> t.Callable[P, R]:
        name, pending = self.step or func.__qualname__, self.pending
        if inspect.isasyncgenfunction(func):
            return t.cast(t.Callable[P, R], _wrap_async_generator(func, name, pending))
        if inspect.isgeneratorfunction(func):
            return t.cast(t.Callable[P, R], _wrap_generator(func, name, pending))
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> t.Any:
                with _step(name, pending):
                    return await func(*args, **kwargs)

            return t.cast(t.Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with _step(name, pending):
                return func(*args, **kwargs)

        return wrapper

    def __enter__(self) -> None:
        cm = _step(self.step or "long-running", self.pending)
        cm.__enter__()
        WITH.push(self, cm)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cm = WITH.pop(self)
        if cm is None:
            raise RuntimeError(
                f"'with long_running({self.step!r})' exited in another thread or task"
                " than it was entered in, or twice: the step's state is lost. Enter and"
                " leave the block in the same code; a 'with' statement does."
            )
        cm.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


@t.overload
def long_running(step: t.Callable[P, R], /) -> t.Callable[P, R]: ...
@t.overload
def long_running(step: str | None = None, /, *, pending: Pending | None = None) -> LongRunning: ...
def long_running(
    step: str | t.Callable[P, R] | None = None, /, *, pending: Pending | None = None
) -> LongRunning | t.Callable[P, R]:
    """Mark a slow step (an LLM or HTTP call) so no connection is held across it.

    Before the step runs, every session of the current app context and thread
    has its transaction ended and its connection returned to the pool; loaded
    objects stay attached and readable, and unflushed changes stay in the
    session. A session whose transaction wrote or locked rows follows
    ``pending``; by default (``"hold"``) it keeps its connection through the
    step and this is reported. While the body runs, using a session made
    before it warns (:class:`~flask_wfsession.StepGuardWarning`), or raises
    with :confval:`WFSESSION_GUARD` set to ``"raise"``. Outside an app
    context this does nothing.

    .. code-block:: python

        @long_running("llm")
        def ask_llm(prompt: str) -> str: ...

        with long_running("http"):
            response = httpx.get(url)

    Works on functions, generator functions (the release happens again before
    each item is produced), ``async def`` functions and async generators.

    :param step: the step's name, sent with the signals; by default the
        decorated function's qualified name, or ``"long-running"`` for a
        ``with`` block.
    :param pending: what to do with a session whose transaction wrote:
        ``"hold"`` its connection through the step and report it, ``"raise"``
        :class:`~flask_wfsession.PendingChangesError`, ``"commit"`` them or
        ``"rollback"`` and report them. Defaults to :confval:`WFSESSION_PENDING`.
    :raise SettingError: ``pending`` is not one of these.
    """
    if callable(step):
        return LongRunning()(step)
    return LongRunning(step, pending)
