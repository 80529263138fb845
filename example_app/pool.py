"""Pool figures for the page and the demo: is anything held while the LLM works?"""

from __future__ import annotations

import threading
import typing as t

import sqlalchemy as sa
from flask import has_app_context

from . import wfs


class PoolWatch:
    """Counts LLM waits, and those during which the waiting request held a connection.

    :meth:`sample` runs as each LLM call starts and as each token arrives. It
    asks whether the request's own session is in a transaction (which holds
    a pooled connection); that runs no SQL, so it is allowed inside a step.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._pool = t.cast(sa.pool.QueuePool, engine.pool)
        self._lock = threading.Lock()
        self.samples = 0
        self.holding = 0

    def sample(self) -> None:
        held = has_app_context() and wfs.session.in_transaction()
        with self._lock:
            self.samples += 1
            self.holding += held

    def figures(self) -> dict[str, int]:
        return {
            "pool_size": self._pool.size(),
            "checked_out_now": self._pool.checkedout(),
            "llm_waits": self.samples,
            "llm_waits_holding_a_connection": self.holding,
        }
