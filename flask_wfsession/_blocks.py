"""The ``with`` blocks an object has open, per thread and task.

A context manager of this package may be made once and entered by many
threads and tasks at a time (a module-level ``wfs.transaction()`` or
``long_running()``). What a block needs at its exit is kept in a context
variable, under the object, never on the object itself.
"""

from __future__ import annotations

import contextvars
import typing as t

T = t.TypeVar("T")


class OpenBlocks(t.Generic[T]):
    """The open ``with`` blocks of one kind, in the current context."""

    def __init__(self, name: str) -> None:
        self.var: contextvars.ContextVar[tuple[tuple[object, T], ...]] = contextvars.ContextVar(
            name, default=()
        )

    def push(self, owner: object, value: T) -> None:
        """``owner`` entered a block; ``value`` is what its exit needs."""
        self.var.set((*self.var.get(), (owner, value)))

    def pop(self, owner: object) -> T | None:
        """The value of ``owner``'s innermost block open here, removed; ``None``
        if it has none (exited in another thread or task, or twice)."""
        open_here = self.var.get()
        for i in range(len(open_here) - 1, -1, -1):
            if open_here[i][0] is owner:
                self.var.set(open_here[:i] + open_here[i + 1 :])
                return open_here[i][1]
        return None
