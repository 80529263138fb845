"""The figures on the page's pool panel: who holds a connection now, and while the LLM works.

Who holds the pool's connections comes from :meth:`WFSession.pool_status`.
:class:`LLMWaits` adds what the pool cannot see: of the LLM calls and
streamed tokens waited for, how many were waited for by a request that held
a connection at that moment.
"""

from __future__ import annotations

import threading
import typing as t

from flask import has_app_context

from . import wfs


class LLMWaits:
    """Counts LLM waits, and those during which the waiting request held a connection.

    :meth:`sample` runs as each LLM call starts and as each token arrives. It
    asks whether the request's own session is in a transaction (which holds
    a pooled connection); that runs no SQL, so it is allowed inside a step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples = 0
        self.holding = 0

    def sample(self) -> None:
        held = has_app_context() and wfs.session.in_transaction()
        with self._lock:
            self.samples += 1
            self.holding += held

    def figures(self) -> dict[str, int]:
        return {"llm_waits": self.samples, "llm_waits_holding_a_connection": self.holding}


def pool_figures(waits: LLMWaits) -> dict[str, t.Any]:
    """The default engine's :meth:`~flask_wfsession.WFSession.pool_status`, and the LLM waits."""
    return {**wfs.pool_status()[None], **waits.figures()}
