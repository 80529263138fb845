"""The LLM provider client. Every call is a long-running step.

The client knows nothing of Flask or the database: ``long_running`` is a
no-op where no app context is active (workflow nodes in plain threads), and
releases the request's sessions where one is.
"""

from __future__ import annotations

import contextlib
import json
import typing as t

import httpx

from flask_wfsession import long_running


class LLMClient:
    """Calls the provider at ``base_url``.

    :param release: mark calls as long-running steps (the point of the
        example); ``False`` shows what a plain app does, for contrast.
    :param observe: called as each call starts and as each token arrives,
        to record how many connections are held meanwhile.
    """

    def __init__(
        self,
        base_url: str,
        *,
        release: bool = True,
        observe: t.Callable[[], None] = lambda: None,
    ) -> None:
        self.base_url = base_url
        self.release = release
        self.observe = observe
        self._http = httpx.Client(base_url=base_url, timeout=60)

    def _step(self, name: str) -> contextlib.AbstractContextManager[None]:
        return long_running(name) if self.release else contextlib.nullcontext()

    def complete(self, prompt: str) -> str:
        """The whole answer, after the model's latency."""
        with self._step("llm"):
            self.observe()
            response = self._http.post("/v1/complete", json={"prompt": prompt})
            response.raise_for_status()
            return t.cast(str, response.json()["text"])

    def stream(self, prompt: str) -> t.Iterator[str]:
        """The answer token by token, as the model produces it."""
        tokens = self._stream(prompt)
        # A generator step: released before every resume, guarded while
        # waiting for the next token.
        return long_running("llm-stream")(tokens)() if self.release else tokens()

    def _stream(self, prompt: str) -> t.Callable[[], t.Iterator[str]]:
        def tokens() -> t.Iterator[str]:
            with self._http.stream("POST", "/v1/stream", json={"prompt": prompt}) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    self.observe()
                    if line:
                        yield t.cast(str, json.loads(line)["token"])

        return tokens

    def close(self) -> None:
        self._http.close()
