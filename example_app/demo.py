"""Start the app on SQLite, send a burst of concurrent requests, print a report."""

from __future__ import annotations

import concurrent.futures
import tempfile

from . import create_app


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"WFSESSION_DATABASE_URI": f"sqlite:///{tmp}/demo.db"})
        client = app.test_client()
        conversation = client.post("/conversations", json={"title": "demo"}).get_json()
        url = f"/conversations/{conversation['id']}/messages"

        def send(i: int) -> int:
            return app.test_client().post(url, json={"content": f"hello {i}"}).status_code

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(send, range(100)))
        with app.app_context():
            from . import wfs

            checked_out = wfs.engine.pool.checkedout()  # type: ignore[attr-defined]
            wfs.engine.dispose()
    ok = statuses.count(200)
    print(f"requests: {len(statuses)}  ok: {ok}  errors: {len(statuses) - ok}")
    print(f"connections still checked out: {checked_out}")
    print("next: 'flask --app example_app run', and the docs in docs/")
    return 0 if ok == len(statuses) and checked_out == 0 else 1
