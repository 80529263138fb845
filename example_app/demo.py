"""The main job: a burst of concurrent chats on a tiny pool, with and without release.

Starts the app on SQLite (a temporary file, pool of 2, no overflow) behind a
real threaded HTTP server, with the fake LLM answering after
``--latency`` seconds, and fires ``--chats`` chats at once. Then the same
burst with the release switched off (``RELEASE_DURING_LLM = False``): each
chat is then one unit of work with the LLM call inside, as a plain
Flask-SQLAlchemy app often writes it. Prints a report; exits 0 when the
release run served every chat without holding a connection during any LLM
call.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import tempfile
import threading
import time
import typing as t
import warnings

import httpx
from werkzeug.serving import make_server

from flask_wfsession import HeldConnectionWarning

from . import create_app, wfs
from .fake_llm import FakeLLM


def burst(
    release: bool, chats: int, llm_url: str, database_uri: str | None = None
) -> dict[str, t.Any]:
    """Serve the app and send ``chats`` concurrent chats; return the figures.

    :param database_uri: a temporary SQLite file by default.
    """
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(
            {
                "WFSESSION_DATABASE_URI": database_uri or f"sqlite:///{tmp}/demo.db",
                "WFSESSION_ENGINE_OPTIONS": {"pool_size": 2, "max_overflow": 0, "pool_timeout": 2},
                "LLM_URL": llm_url,
                "RELEASE_DURING_LLM": release,
            }
        )
        # The report counts failures; their tracebacks would bury it.
        app.logger.setLevel(logging.CRITICAL)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                ids = [
                    client.post("/api/conversations", json={"title": f"chat {n}"}).json()["id"]
                    for n in range(chats)
                ]

                def chat(conversation_id: int) -> int:
                    with httpx.Client(base_url=base, timeout=60) as own:
                        url = f"/api/conversations/{conversation_id}/chat"
                        return own.post(url, json={"message": "hello there"}).status_code

                started = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(chats) as pool:
                    statuses = list(pool.map(chat, ids))
                elapsed = time.monotonic() - started
                figures = client.get("/api/pool").json()
        finally:
            server.shutdown()
            serving.join()
            with app.app_context():
                wfs.engine.dispose()
    return {
        "served": statuses.count(200),
        "errors": len(statuses) - statuses.count(200),
        "waits": figures["llm_waits"],
        "holding": figures["llm_waits_holding_a_connection"],
        "seconds": elapsed,
    }


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A burst of concurrent chats on a tiny pool.")
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake LLM's seconds")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    # Without release, the extension reports every held connection (a log line
    # and a warning); the table counts them instead.
    logging.getLogger("flask_wfsession").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", HeldConnectionWarning)
    print(
        f"{args.chats} concurrent chats; SQLite, pool of 2, no overflow, 2 s pool timeout;"
        f" fake LLM answering in {args.latency} s over HTTP\n"
    )
    rows = []
    with FakeLLM(latency=args.latency) as llm:
        for release in (True, False):
            rows.append((release, burst(release, args.chats, llm.url)))
    print(f"{'':26}{'served':>8}{'errors':>8}{'LLM waits holding a connection':>32}{'seconds':>9}")
    for release, r in rows:
        label = "flask-wfsession release" if release else "release switched off"
        held = f"{r['holding']} of {r['waits']}"
        print(f"{label:26}{r['served']:>8}{r['errors']:>8}{held:>32}{r['seconds']:>9.1f}")
    ok = rows[0][1]["errors"] == 0 and rows[0][1]["holding"] == 0
    print(
        "\nWith release, no chat holds a connection while the LLM thinks, so a pool of 2"
        "\nserves them all at once. Without it, each chat pins a connection for the whole"
        "\ncall and the rest wait for the pool, then time out. (The extension reports each"
        "\nheld connection with a warning; they are counted in the table, not shown.)"
        "\n\nNext: '.venv/bin/flask --app example_app run' and open http://127.0.0.1:5000/;"
        " the docs are in docs/ (the README says how to build them)."
    )
    return 0 if ok else 1
