"""Load benchmark: the chat endpoint four ways, side by side, in one run.

Run: ``.venv/bin/python -m example_app.bench`` (needs PostgreSQL and
gunicorn; ``pip install -e . --group test --group bench``). Each variant of
:mod:`example_app.bench_app` is served by gunicorn (gthread, one worker, 64
threads, pool_size 5, max_overflow 0) and driven by concurrent keep-alive
clients; a monitor polls ``pg_stat_activity`` for the longest time any
backend sat idle in a transaction. Prints a table; ``--plot FILE`` also
saves throughput against concurrent clients.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .bench_app import VARIANTS, Base, BenchConversation

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Result:
    variant: str
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    max_idle_in_transaction: float = 0.0
    server_cpu: float = 0.0  # CPU seconds of the gunicorn worker in the window

    @property
    def cpu_per_request_ms(self) -> float:
        return 1000 * self.server_cpu / max(1, len(self.latencies))

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """gunicorn serving one variant on a free loopback port."""

    def __init__(self, variant: str, url: str, step: float) -> None:
        self.port = free_port()
        env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_DATABASE_URL": url}
        env["BENCH_STEP"] = str(step)
        # Server on CPU 0, load generator on CPU 1 (see main): on a small
        # machine they would otherwise take turns and blur the comparison.
        command = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        command += [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "64"]
        command += ["-w", "1", "-b", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        command += ["example_app.bench_app:app_from_env()"]
        self.process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # startup poll, not synchronisation
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn for {variant!r} did not start")

    def cpu_seconds(self) -> float:
        """User + system CPU of gunicorn's worker processes so far (Linux)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        total = 0
        for child in children.read_text().split() if children.exists() else []:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def idle_monitor(url: str, variant: str, stop: threading.Event, result: Result) -> None:
    if not url.startswith("postgresql"):
        return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    query = sa.text(
        "SELECT coalesce(max(extract(epoch FROM now() - state_change)), 0)"
        " FROM pg_stat_activity WHERE application_name = :name"
        " AND state LIKE 'idle in transaction%'"
    )
    with engine.connect() as conn:
        while not stop.wait(0.05):
            value = conn.execute(query, {"name": f"wfsession-bench-{variant}"}).scalar()
            conn.commit()
            result.max_idle_in_transaction = max(result.max_idle_in_transaction, float(value))
    engine.dispose()


def drive(port: int, method: str, path: str, clients: int, seconds: float, result: Result) -> None:
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                conn.request(method, path)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
                ok = False
            with lock:
                if ok:
                    result.latencies.append(time.monotonic() - started)
                else:
                    result.errors += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run(variant: str, url: str, step: float, clients: int, seconds: float, path: str) -> Result:
    server = Server(variant, url, step)
    method = "POST" if path.startswith("/chat") else "GET"
    result = Result(variant, clients, seconds)
    try:
        drive(server.port, method, path, min(clients, 4), 1.0, Result(variant, 0, 1))  # warm up
        stop = threading.Event()
        monitor = threading.Thread(target=idle_monitor, args=(url, variant, stop, result))
        monitor.start()
        started, cpu = time.monotonic(), server.cpu_seconds()
        drive(server.port, method, path, clients, seconds, result)
        result.seconds = time.monotonic() - started
        result.server_cpu = server.cpu_seconds() - cpu
        stop.set()
        monitor.join()
    finally:
        server.stop()
    return result


def prepare(url: str) -> int:
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(BenchConversation).values(id=1, title="benchmark"))
    engine.dispose()
    return 1


def table(rows: list[Result], limit: float) -> str:
    lines = [
        "| variant | req/s | of limit | p50 s | p99 s | errors | longest idle in transaction s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.throughput:.1f} | {r.throughput / limit:.0%} |"
            f" {r.percentile(0.5):.2f} | {r.percentile(0.99):.2f} | {r.errors} |"
            f" {r.max_idle_in_transaction:.2f} |"
        )
    return "\n".join(lines)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--short-clients", type=int, default=8)
    parser.add_argument("--short-seconds", type=float, default=4.0)
    parser.add_argument("--short-rounds", type=int, default=12, help="0 skips them")
    parser.add_argument("--plot", metavar="FILE", help="save throughput vs clients as PNG")
    parser.add_argument("--plot-clients", default="5,10,25,50")
    parser.add_argument("--count-requests", nargs=2, metavar=("VARIANT", "N"), help="internal")
    parser.add_argument(
        "--instructions", action="store_true", help="only count instructions per short request"
    )
    args = parser.parse_args(argv)
    if args.instructions:
        prepare(args.database_url)
        print(instructions(args.database_url))
        return 0
    if args.count_requests:
        count_requests(args.count_requests[0], args.database_url, int(args.count_requests[1]))
        return 0
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    cid = prepare(args.database_url)

    print(f"chat: {args.clients} clients, {args.step} s step, {args.seconds} s per variant")
    rows = [
        run(v, args.database_url, args.step, args.clients, args.seconds, f"/chat/{cid}")
        for v in VARIANTS
    ]
    print(table(rows, rows[0].throughput))

    if args.short_rounds:
        print(short_requests(args, cid))
        print(instructions(args.database_url))

    if args.plot:
        plot(args, cid)
    return 0


def short_requests(args: argparse.Namespace, cid: int) -> str:
    """Ordinary requests with no slow step: flask-wfsession against plain, paired rounds.

    Throughput on a small machine swings with scheduling; the gunicorn
    worker's CPU time per request is the steadier measure of overhead.
    """
    lines = [
        f"\nshort requests: {args.short_clients} clients, {args.short_rounds} paired rounds"
        f" of {args.short_seconds} s",
        "| round | plain req/s | wfsession req/s | ratio | plain CPU ms/req"
        " | wfsession CPU ms/req | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios, cpu_ratios = [], []
    for n in range(1, args.short_rounds + 1):
        pair = {}
        # Alternate which goes first, so an order effect cancels out.
        order = ("plain", "wfsession") if n % 2 else ("wfsession", "plain")
        for variant in order:
            path = f"/short/{cid}"
            r = run(variant, args.database_url, 0, args.short_clients, args.short_seconds, path)
            if r.errors:
                raise RuntimeError(f"{variant}: {r.errors} errors on short requests")
            pair[variant] = r
        plain, wfs = pair["plain"], pair["wfsession"]
        ratios.append(wfs.throughput / plain.throughput)
        cpu_ratios.append(wfs.cpu_per_request_ms / plain.cpu_per_request_ms)
        lines.append(
            f"| {n} | {plain.throughput:.0f} | {wfs.throughput:.0f} | {ratios[-1]:.0%} |"
            f" {plain.cpu_per_request_ms:.3f} | {wfs.cpu_per_request_ms:.3f} |"
            f" {cpu_ratios[-1]:.0%} |"
        )
    lines.append(
        f"median throughput ratio, flask-wfsession / plain: {statistics.median(ratios):.1%}"
        "\nmedian server CPU per request, flask-wfsession / plain:"
        f" {statistics.median(cpu_ratios):.1%}"
    )
    return "\n".join(lines)


def count_requests(variant: str, url: str, n: int) -> None:
    """Serve ``n`` short requests in-process (what ``instructions`` runs under valgrind)."""
    if os.environ.get("BENCH_HIDE_OPENTELEMETRY"):
        sys.modules["opentelemetry.metrics"] = None  # type: ignore[assignment]  # "not installed"
    from .bench_app import create_app

    client = create_app(variant, url, 0).test_client()
    for _ in range(n):
        client.get("/short/1")


# What "instructions" counts: (label, variant, idle warning, OpenTelemetry importable).
COUNTED = (
    ("plain Flask-SQLAlchemy", "plain", "none", False),
    ("flask-wfsession, telemetry off", "wfsession", "none", False),
    ("flask-wfsession, telemetry on (default)", "wfsession", "1.0", False),
    ("flask-wfsession, telemetry on, opentelemetry-api, no SDK", "wfsession", "1.0", True),
)


def instructions(url: str) -> str:
    """Instructions per short request, counted by callgrind: exact and repeatable.

    Each row serves 50 and then 250 requests in-process; the difference
    divided by 200 is the cost of one request, start-up excluded. Each is
    counted under three hash seeds and averaged: the seed moves Python's
    caches by a few thousand instructions either way.
    """
    if not shutil.which("valgrind"):
        return "\n(valgrind not found: instruction counts skipped)"
    counts = {}
    for label, variant, idle, otel in COUNTED:
        per_seed = []
        for seed in ("0", "1", "2"):
            per_run = []
            for n in (50, 250):
                command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
                command += [sys.executable, "-m", "example_app.bench", "--count-requests"]
                command += [variant, str(n), "--database-url", url]
                env = {**os.environ, "PYTHONHASHSEED": seed, "BENCH_IDLE_WARNING": idle}
                if not otel:
                    env["BENCH_HIDE_OPENTELEMETRY"] = "1"
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                per_run.append(int(done.stderr.split("Collected :")[1].split()[0]))
            per_seed.append((per_run[1] - per_run[0]) / 200)
        counts[label] = statistics.mean(per_seed)
    plain = counts[COUNTED[0][0]]
    off = counts[COUNTED[1][0]]
    rows = "\n".join(
        f"| {label} | {count:,.0f} | {count / plain:.1%} |"
        + (f" {(count - off) / plain:+.1%} |" if i > 1 else " |")
        for i, (label, count) in enumerate(counts.items())
    )
    return (
        "\nshort request, instructions per request (callgrind, in-process, no HTTP server)\n"
        "| variant | instructions | of plain | telemetry's cost, points of plain |\n"
        "|---|---:|---:|---:|\n" + rows
    )


def plot(args: argparse.Namespace, cid: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(n) for n in args.plot_clients.split(",")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in VARIANTS:
        values = [
            run(variant, args.database_url, args.step, n, 8.0, f"/chat/{cid}").throughput
            for n in levels
        ]
        ax.plot(levels, values, marker="o", label=variant)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests/s")
    ax.set_title(f"chat endpoint, {args.step} s step, pool_size 5")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    raise SystemExit(main())
