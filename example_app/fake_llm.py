"""A small fake LLM provider over real HTTP, for the example and its tests.

``POST /v1/complete`` with ``{"prompt": ...}`` answers ``{"text": ...}``
after ``latency`` seconds. ``POST /v1/stream`` sends the same answer as
newline-delimited JSON tokens, spread over ``latency``. Runs in a thread on
127.0.0.1; ``with FakeLLM(latency=0.3) as llm: llm.url``.
"""

from __future__ import annotations

import json
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


def answer_for(prompt: str) -> list[str]:
    """The fake model's answer to ``prompt``, as tokens."""
    words = prompt.split() or ["nothing"]
    text = f"You said {len(words)} words; the last was '{words[-1]}'. Here is a short answer."
    return [word + " " for word in text.split()]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        prompt = json.loads(self.rfile.read(length) or b"{}").get("prompt", "")
        tokens = answer_for(prompt)
        if self.path == "/v1/complete":
            time.sleep(self.server.latency)  # the model thinking
            body = json.dumps({"text": "".join(tokens).strip()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/v1/stream":
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            for token in tokens:
                time.sleep(self.server.latency / len(tokens))
                self.wfile.write(json.dumps({"token": token}).encode() + b"\n")
                self.wfile.flush()
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: t.Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    latency: float


class FakeLLM:
    """The fake provider, served from a background thread on a free port."""

    def __init__(self, latency: float = 0.5) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.latency = latency
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
