"""The LLM provider client. Every call is a long-running step, marked where it is defined.

The client knows nothing of Flask or the database: ``long_running`` is a
no-op where no app context is active (workflow nodes in plain threads), and
releases the request's sessions where one is.
"""

from __future__ import annotations

import json
import typing as t

import httpx

from flask_wfsession import long_running


class LLMClient:
    """Calls the provider at ``base_url``.

    :param observe: called as each call starts and as each token arrives,
        inside the step, to record whether the caller holds a connection
        meanwhile.
    """

    def __init__(self, base_url: str, *, observe: t.Callable[[], None] = lambda: None) -> None:
        self.base_url = base_url
        self.observe = observe
        self._http = httpx.Client(base_url=base_url, timeout=60)

    @long_running("llm")
    def complete(self, prompt: str) -> str:
        """The whole answer, after the model's latency."""
        self.observe()
        response = self._http.post("/v1/complete", json={"prompt": prompt})
        response.raise_for_status()
        return t.cast(str, response.json()["text"])

    @long_running("llm-stream")
    def stream(self, prompt: str) -> t.Iterator[str]:
        """The answer token by token, as the model produces it.

        A generator step: released again before every resume, guarded while
        the next token is awaited.
        """
        with self._http.stream("POST", "/v1/stream", json={"prompt": prompt}) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                self.observe()
                if line:
                    yield t.cast(str, json.loads(line)["token"])

    def close(self) -> None:
        self._http.close()
