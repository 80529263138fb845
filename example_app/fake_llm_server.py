"""The fake LLM provider as a process of its own, for the scale benchmark.

Run: ``python -m example_app.fake_llm_server --port 8765 --latency 3 --tokens 30``.
``POST /v1/stream`` with ``{"prompt": ...}`` answers as
:class:`~example_app.fake_llm.FakeLLM` does: newline-delimited JSON tokens,
spread evenly over ``latency`` seconds (``--tokens`` of them, the fake
model's answer repeated to that length), over HTTP/1.1 with chunked
transfer encoding and keep-alive, so a client's connection pool reuses its
connections.

Why asyncio, not the :class:`~http.server.ThreadingHTTPServer` of
:mod:`example_app.fake_llm`: the benchmark holds up to 1,000 streams open
at once, and a thread per stream means 1,000 OS threads taking turns on the
GIL with their 30,000 wake-ups a minute, on the CPU the load generator also
needs. Here each stream is one coroutine of a few kilobytes and each token
one timer and one ``write``: about 20 microseconds, so 5,000 tokens a
second take a tenth of a core. gunicorn with gevent would do as well, but
would add a dependency and a master process for a hundred lines of
protocol; this needs only the standard library and one process to pin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import resource
import typing as t

from .fake_llm import answer_for

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def tokens_for(prompt: str, count: int) -> list[str]:
    """The fake model's answer to ``prompt``, cycled to ``count`` tokens (0: as is)."""
    tokens = answer_for(prompt)
    return tokens if count <= 0 else list(itertools.islice(itertools.cycle(tokens), count))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FakeLLMServer:
    """Serves ``/v1/stream`` on ``port`` until cancelled.

    :param latency: seconds from the request to the last token.
    :param tokens: tokens per answer; 0 for the fake model's own answer.
    """

    def __init__(self, port: int, latency: float, tokens: int) -> None:
        self.port = port
        self.latency = latency
        self.tokens = tokens

    async def serve(self) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=4096)
        async with server:
            await server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if method != "POST" or path != "/v1/stream":
            writer.write(_NOT_FOUND)
            return True
        prompt = json.loads(body or b"{}").get("prompt", "")
        tokens = tokens_for(prompt, self.tokens)
        writer.write(_OK)
        pause = self.latency / len(tokens)
        for token in tokens:
            await asyncio.sleep(pause)  # the model thinking
            writer.write(_chunk(json.dumps({"token": token}).encode() + b"\n"))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return headers.get("connection", "").lower() != "close"


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(FakeLLMServer(args.port, args.latency, args.tokens).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
