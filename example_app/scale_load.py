"""The scale benchmark's load generator: streamed chats over raw asyncio connections.

Each client holds one HTTP/1.1 keep-alive connection (``asyncio.open_connection``,
no client library) and opens streamed chats on it one after another, reading
the chunked server-sent events of ``GET /stream/<id>`` just far enough to
note when the first token and the ``done`` event arrive. One event loop drives
1,000 clients on one core with room to spare; a :class:`Cell` turns what the
clients saw into the benchmark's figures.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One streamed chat, as the client saw it (``time.monotonic()`` seconds)."""

    started: float
    first: float | None = None  # the first token's event arrived
    ended: float | None = None
    error: str | None = None  # None once the "done" event arrived


@dataclass
class Cell:
    """One (worker class, variant, concurrent streams) measurement."""

    worker: str
    variant: str
    clients: int
    window: tuple[float, float] = (0.0, 0.0)
    streams: list[Stream] = field(default_factory=list)
    max_idle_in_transaction: float = 0.0
    rss_per_stream_kb: float = float("nan")
    worker_cpu: float = 0.0  # share of one core the worker used in the window
    side_cpu: float = 0.0  # share of one core the load generator and fake LLM used
    pool_timeouts: int = 0  # pool timeouts the worker logged, window or not

    def _in_window(self) -> list[Stream]:
        return [s for s in self.streams if self.window[0] <= s.started < self.window[1]]

    @property
    def throughput(self) -> float:
        """Streams completed in the window, per second."""
        w0, w1 = self.window
        done = [s for s in self.streams if s.error is None and s.ended and w0 <= s.ended < w1]
        return len(done) / (w1 - w0)

    @property
    def errors(self) -> collections.Counter[str]:
        """Streams that failed in the window, by kind."""
        w0, w1 = self.window
        failed = [s for s in self.streams if s.error and s.ended and w0 <= s.ended < w1]
        return collections.Counter(s.error for s in failed)

    def ttft(self, q: float) -> float:
        """The ``q`` quantile of the time to first token of the streams started in the
        window; ``inf`` for those that failed or had none by the end of the drain."""
        values = sorted(
            s.first - s.started if s.first is not None else float("inf") for s in self._in_window()
        )
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _response(reader: asyncio.StreamReader, stream: Stream) -> bool:
    """Read one response into ``stream``; return whether the connection can be reused."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("closed before the status line")
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close"
    if headers.get("transfer-encoding") != "chunked":
        await reader.readexactly(int(headers.get("content-length", 0)))
        stream.error = f"HTTP {status}"
        return keep
    done = False
    while size := int((await reader.readline()).split(b";")[0], 16):
        data = await reader.readexactly(size + 2)
        if stream.first is None and data.startswith(b"event: token"):
            stream.first = time.monotonic()
        done = done or data.startswith(b"event: done")
    await reader.readline()  # the end of the chunked body
    stream.error = None if done and status == 200 else f"HTTP {status}" if status != 200 else "cut"
    return keep


class Load:
    """``clients`` clients, each streaming chats on its own connection until ``stop``."""

    def __init__(self, port: int, path: str, clients: int, timeout: float) -> None:
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        self.port, self.clients, self.timeout = port, clients, timeout
        self.streams: list[Stream] = []
        self.open = 0  # streams under way now

    async def client(self, delay: float, stop: float, once: bool) -> None:
        await asyncio.sleep(delay)
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < stop:
            stream = Stream(time.monotonic())
            self.streams.append(stream)
            self.open += 1
            try:
                for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect
                    fresh = connection is None
                    if connection is None:
                        connection = await asyncio.open_connection("127.0.0.1", self.port)
                    try:
                        connection[1].write(self.request)
                        read = _response(connection[0], stream)
                        keep = await asyncio.wait_for(read, self.timeout)
                        break
                    except ConnectionResetError:
                        connection[1].close()
                        connection = None
                        if fresh or attempt == 2 or stream.first is not None:
                            raise
                if not keep:
                    connection[1].close()
                    connection = None
            except ConnectionRefusedError:
                stream.error = "refused"
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                stream.error = "cut"  # the server closed the connection mid-response
            except asyncio.TimeoutError:
                stream.error = "timeout"
            except asyncio.CancelledError:
                stream.error = "unfinished"  # still open when the run ended
                raise
            finally:
                stream.ended = time.monotonic()
                self.open -= 1
                if stream.error and connection is not None:
                    connection[1].close()
                    connection = None
            if once:
                break
        if connection is not None:
            connection[1].close()

    async def run(self, ramp: float, stop: float, drain: float, once: bool = False) -> None:
        """Start the clients over ``ramp`` s; none starts a stream after ``stop``; then wait
        until every stream has had its first token or ended, or until ``drain``
        (monotonic), and cancel the rest."""
        tasks = [
            asyncio.create_task(self.client(ramp * i / self.clients, stop, once))
            for i in range(self.clients)
        ]
        await asyncio.wait(tasks, timeout=max(0.0, stop - time.monotonic()))
        while time.monotonic() < drain and not all(t.done() for t in tasks):
            if all(s.first is not None or s.ended is not None for s in self.streams):
                break
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
