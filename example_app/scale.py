"""Scale benchmark: streamed chats, 50 to 1,000 at once, gthread and gevent, in one run.

Run: ``.venv/bin/python -m example_app.scale --plot docs/_static/scale.png``
(needs PostgreSQL, gunicorn and gevent: ``pip install -e . --group test --group bench``;
about 15 minutes, ``--quick`` for a smoke run of a minute and a half).

Each client of the load generator (:mod:`example_app.scale_load`) holds one
keep-alive connection and opens streamed chats on it one after another
(``GET /stream/<id>`` of :mod:`example_app.bench_app`): the app reads the
conversation, relays the fake LLM's 30 tokens (served over real HTTP by
:mod:`example_app.fake_llm_server`, 3 s in all) as server-sent events, then
stores the answer. Every (worker class, variant, level) runs in a fresh
gunicorn with one worker on CPU 0: ``gthread`` with a thread per stream (a
streamed response keeps its thread until it ends, so 1,000 streams need
1,000 threads; 50 more for the warm-up) or ``gevent``;
``pool_size=5, max_overflow=0, pool_timeout=10``. The load generator and the
fake LLM share CPU 1.

Per cell: two warm-up streams, then the worker's idle RSS; the clients start
over one stream's length (or at ``--ramp-rate`` a second, if slower); a
10 s window counts the streams completed and failed in it and the worker's
CPU, samples its RSS and polls ``pg_stat_activity``; the time to first
token is that of the streams started in the window, waited for up to 5 s
after it. For each level the cells run one after the other, the order of
the variants reversed from one level to the next; at the first level
``manual`` and ``wfsession`` run again in paired rounds of alternating order
(gevent by default). Prints markdown tables; ``--plot FILE`` saves
throughput against concurrency; ``--profile DIR`` samples each worker with
py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import sqlalchemy as sa

from .bench import DEFAULT_URL, free_port, prepare
from .bench_app import VARIANTS
from .scale_load import Cell, Load

WORKERS = ("gthread", "gevent")
_CLK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK  # utime, stime


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # startup poll, not synchronisation
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class Gunicorn:
    """One gunicorn worker serving one variant, pinned to CPU 0; stderr to ``log``."""

    def __init__(self, worker: str, variant: str, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_DATABASE_URL": args.database_url}
        env |= {"BENCH_LLM_URL": args.llm_url, "BENCH_POOL_TIMEOUT": str(args.pool_timeout)}
        command = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        command += [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1"]
        command += ["--worker-connections", "2000", "--backlog", "2048", "--timeout", "120"]
        if worker == "gthread":
            command += ["--threads", str(args.threads)]
        command += ["-b", f"127.0.0.1:{self.port}", "--keep-alive", "30"]
        command += ["--log-level", "warning", "example_app.bench_app:app_from_env()"]
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stderr=out)
        _wait_port(self.port, self.process, f"gunicorn {worker} {variant}")
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while not children.read_text().split():
            time.sleep(0.05)
        self.worker_pid = int(children.read_text().split()[0])

    def pool_timeouts(self) -> int:
        """Failed requests whose traceback the worker logged with a pool timeout."""
        text = self.log.read_text(errors="replace")
        blocks = text.replace("Error handling request", "Exception on ").split("Exception on ")
        return sum("QueuePool limit" in block for block in blocks[1:])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # quick shutdown: streams may be open
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def idle_monitor(url: str, name: str, stop: threading.Event, cell: Cell) -> None:
    """The longest any of the variant's backends sat idle in a transaction, by 50 ms polls."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    query = sa.text(
        "SELECT coalesce(max(extract(epoch FROM now() - state_change)), 0)"
        " FROM pg_stat_activity WHERE application_name = :name"
        " AND datname = current_database() AND state LIKE 'idle in transaction%'"
    )
    with engine.connect() as conn:
        while not stop.wait(0.05):
            value = float(conn.execute(query, {"name": name}).scalar() or 0)
            conn.commit()
            cell.max_idle_in_transaction = max(cell.max_idle_in_transaction, value)
    engine.dispose()


async def _sample_rss(pid: int, load: Load, until: float, out: list[tuple[int, int]]) -> None:
    while time.monotonic() < until:
        out.append((_rss_kb(pid), load.open))
        await asyncio.sleep(0.5)


def run_cell(worker: str, variant: str, clients: int, args: argparse.Namespace) -> Cell:
    """Serve ``variant`` under ``worker`` and measure ``clients`` concurrent streams."""
    cell = Cell(worker, variant, clients)
    log = Path(args.log_dir) / f"{worker}-{variant}-{clients}-{time.monotonic_ns()}.log"
    server = Gunicorn(worker, variant, args, log)
    path = "/stream/1"
    try:
        warm = Load(server.port, path, 2, args.latency * 5 + 10)  # imports, the pools' connections
        asyncio.run(warm.run(0.0, time.monotonic() + 60, time.monotonic() + 60, once=True))
        if any(s.error for s in warm.streams):
            raise RuntimeError(f"{worker} {variant}: warm-up failed: {warm.streams} (see {log})")
        idle_rss = _rss_kb(server.worker_pid)
        stop = threading.Event()
        name = f"wfsession-bench-{variant}"
        monitor = threading.Thread(target=idle_monitor, args=(args.database_url, name, stop, cell))
        load = Load(server.port, path, clients, args.latency * 5 + 30)
        start = time.monotonic()
        # Clients start over one stream's length, or at --ramp-rate a second if that
        # takes longer: streams started together on a saturated worker share it
        # evenly and end together, after the window, and the window counts none.
        ramp = max(args.latency, clients / args.ramp_rate)
        w0 = start + ramp + 0.5
        w1 = w0 + args.window
        cell.window = (w0, w1)
        samples: list[tuple[int, int]] = []
        cpu: dict[str, float] = {}

        async def measure() -> None:
            task = asyncio.create_task(load.run(ramp, w1, w1 + args.drain))
            await asyncio.sleep(w0 - time.monotonic())
            monitor.start()
            if args.profile:
                profile(server.worker_pid, f"{worker}-{variant}-{clients}", args)
            cpu["worker"], cpu["self"] = _proc_cpu(server.worker_pid), time.process_time()
            cpu["llm"] = _proc_cpu(args.llm_pid)
            await _sample_rss(server.worker_pid, load, w1, samples)
            cpu["worker"] = _proc_cpu(server.worker_pid) - cpu["worker"]
            cpu["self"] = time.process_time() - cpu["self"] + _proc_cpu(args.llm_pid) - cpu["llm"]
            stop.set()
            await task

        asyncio.run(measure())
        monitor.join()
        cell.streams = load.streams
        cell.worker_cpu = cpu["worker"] / args.window
        cell.side_cpu = cpu["self"] / args.window
        per_stream = [(rss - idle_rss) / n for rss, n in samples[len(samples) // 2 :] if n]
        cell.rss_per_stream_kb = statistics.median(per_stream) if per_stream else float("nan")
    finally:
        server.stop()
    cell.pool_timeouts = server.pool_timeouts()
    return cell


def profile(pid: int, name: str, args: argparse.Namespace) -> None:
    """Sample the worker's stacks with py-spy through the window (``--profile DIR``).

    Writes ``DIR/NAME.txt``: collapsed stacks of the samples that held the
    GIL, so the worker's CPU time with its idle waits left out.
    """
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--gil", "--nonblocking", "--rate", "200", "--format", "raw"]
    command += ["--pid", str(pid), "--duration", str(max(1, int(args.window) - 1))]
    command += ["-o", str(Path(args.profile) / f"{name}.txt")]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _seconds(value: float) -> str:
    return "none" if value == float("inf") else f"{value:.2f}"


def table(cells: list[Cell]) -> str:
    lines = [
        "| worker | variant | streams | streams/s | of nodb | errors | TTFT p50 s | TTFT p99 s"
        " | longest idle in transaction s | worker KB per open stream | worker CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nodb = {(c.worker, c.clients): c.throughput for c in cells if c.variant == "nodb"}
    for c in cells:
        limit = nodb.get((c.worker, c.clients))
        errors = sum(c.errors.values())
        lines.append(
            f"| {c.worker} | {c.variant} | {c.clients} | {c.throughput:.1f} |"
            f" {f'{c.throughput / limit:.0%}' if limit else '-'} | {errors} |"
            f" {_seconds(c.ttft(0.5))} | {_seconds(c.ttft(0.99))} |"
            f" {c.max_idle_in_transaction:.2f} | {c.rss_per_stream_kb:.0f} | {c.worker_cpu:.0%} |"
        )
    return "\n".join(lines)


def details(cells: list[Cell]) -> str:
    """Error kinds, pool timeouts and the load side's CPU, per cell."""
    lines = [
        "| worker | variant | streams | errors in the window | pool timeouts in the log"
        " | load generator + fake LLM CPU |"
    ]
    lines.append("|---|---|---:|---|---:|---:|")
    for c in cells:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c.errors.items())) or "-"
        lines.append(
            f"| {c.worker} | {c.variant} | {c.clients} | {kinds} | {c.pool_timeouts} |"
            f" {c.side_cpu:.0%} |"
        )
    return "\n".join(lines)


def ratios(cells: list[Cell], n: int) -> str:
    """wfsession / manual at ``n`` streams, per worker class: the median of paired rounds."""
    lines = []
    for worker in WORKERS:
        by = {
            v: [c.throughput for c in cells if (c.worker, c.variant, c.clients) == (worker, v, n)]
            for v in ("manual", "wfsession")
        }
        pairs = [w / m for m, w in zip(by["manual"], by["wfsession"], strict=True) if m]
        if pairs:
            rounds = ", ".join(f"{r:.1%}" for r in pairs)
            lines.append(
                f"{worker}, {n} streams, wfsession / manual:"
                f" median {statistics.median(pairs):.1%} of {len(pairs)} rounds ({rounds})"
            )
    return "\n".join(lines)


def plot(cells: list[Cell], path: str, args: argparse.Namespace) -> None:
    """Streams completed per second against concurrent streams, a panel per worker class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = [w for w in WORKERS if any(c.worker == w for c in cells)]
    fig, axes = plt.subplots(1, len(workers), figsize=(9, 4), sharey=True, squeeze=False)
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:red", "tab:blue", "tab:green"), strict=True))
    levels = sorted({c.clients for c in cells})
    for ax, worker in zip(axes[0], workers, strict=True):
        ideal = [n / args.latency for n in levels]  # every stream in its bare length
        ax.plot(levels, ideal, ":", color="black", label=f"N / {args.latency:g} s")
        for variant in VARIANTS:
            first: dict[int, Cell] = {}
            for c in cells:
                if (c.worker, c.variant) == (worker, variant):
                    first.setdefault(c.clients, c)
            if first:
                xs = sorted(first)
                ys = [max(first[n].throughput, 0.1) for n in xs]
                ax.plot(xs, ys, marker="o", color=colors[variant], label=variant)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_title(f"gunicorn {worker}, one worker")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("streams completed / s")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"streamed chat ({args.latency:g} s, {args.tokens} tokens), pool_size 5, max_overflow 0"
    )
    fig.tight_layout()
    fig.savefig(path)


def _raise_file_limit() -> None:
    """1,000 streams need 2,000+ sockets here and in the worker; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--levels", default="50,200,500,1000", help="concurrent streams")
    parser.add_argument("--workers", default=",".join(WORKERS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument(
        "--drain", type=float, default=5.0, help="max seconds to wait for first tokens after it"
    )
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds at the first level")
    parser.add_argument("--rounds-workers", default="gevent", help="worker classes paired")
    parser.add_argument("--latency", type=float, default=3.0, help="seconds per LLM answer")
    parser.add_argument("--ramp-rate", type=float, default=100, help="clients started per second")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per LLM answer")
    parser.add_argument("--pool-timeout", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="gthread; 0: top level + 50")
    parser.add_argument("--plot", metavar="FILE", help="save throughput vs concurrency as PNG")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the worker in each window")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.window, args.rounds = "100", 2.0, 3
        args.latency, args.tokens = 1.0, 10
    levels = [int(n) for n in args.levels.split(",")]
    workers = args.workers.split(",")
    paired_workers = [w for w in workers if w in args.rounds_workers.split(",")]
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    args.threads = args.threads or max(levels) + 50
    _raise_file_limit()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the load generator and the fake LLM; gunicorn on CPU 0
    prepare(args.database_url)
    llm_port = free_port()
    args.llm_url = f"http://127.0.0.1:{llm_port}"
    command = [sys.executable, "-m", "example_app.fake_llm_server", "--port", str(llm_port)]
    command += ["--latency", str(args.latency), "--tokens", str(args.tokens)]
    llm = subprocess.Popen(command)
    args.llm_pid = llm.pid
    cells: list[Cell] = []
    started = time.monotonic()
    try:
        _wait_port(llm_port, llm, "the fake LLM")
        with tempfile.TemporaryDirectory(prefix="wfsession-scale-") as log_dir:
            args.log_dir = log_dir
            print(
                f"streamed chat: {args.latency:g} s, {args.tokens} tokens; {args.window:g} s"
                f" per cell; levels {levels}; {args.threads} gthread threads"
            )
            for n, level in enumerate(levels):
                paired = [v for v in ("manual", "wfsession") if v in variants]
                rounds = args.rounds if n == 0 and len(paired) == 2 else 1
                for r in range(rounds):
                    for worker in workers if r == 0 else paired_workers:
                        order = variants if r == 0 else paired
                        for variant in order if (n + r) % 2 == 0 else order[::-1]:
                            cell = run_cell(worker, variant, level, args)
                            cells.append(cell)
                            print(table([cell]).splitlines()[-1], flush=True)
    finally:
        llm.terminate()
        llm.wait()
    first = {}
    for c in cells:
        first.setdefault((c.worker, c.variant, c.clients), c)
    print(f"\n{time.monotonic() - started:.0f} s\n")
    order = {(w, v): i for i, (w, v) in enumerate((w, v) for w in WORKERS for v in VARIANTS)}
    print(table(sorted(first.values(), key=lambda c: (c.clients, order[c.worker, c.variant]))))
    print()
    print(details(cells))
    print()
    print(ratios(cells, levels[0]))
    if args.plot:
        plot(cells, args.plot, args)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
