"""What ``wfs_isolation`` costs per test, on each backend, in one run.

Run: ``.venv/bin/python -m example_app.isolation_cost`` (needs the test
command's PostgreSQL and MariaDB; ``pip install -e . --group test``). Two
tables with 20 rows: the fixture's own work (read every table before, compare
after, restore what changed), averaged over 50 runs, once with nothing changed
and once with a row inserted by the "test". Prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from flask_wfsession.testing import _restore, _snapshot
from tests.models import Base, Conversation

SERVERS = {
    "PostgreSQL": "postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
    "MariaDB": "mysql+pymysql://root@127.0.0.1:3306/{database}",
}


def per_test(engine: sa.Engine, write: bool, runs: int) -> float:
    """Milliseconds per test of the fixture's work (and the test's insert, if ``write``)."""

    def one() -> None:
        saved = _snapshot(engine)
        if write:
            with engine.begin() as connection:
                connection.execute(sa.insert(Conversation).values(title="written by the test"))
        _restore(engine, saved)

    one()  # warm up: the connection and the driver's caches
    started = time.perf_counter()
    for _ in range(runs):
        one()
    return (time.perf_counter() - started) / runs * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", default="test", help="database on both servers")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"SQLite": f"sqlite:///{Path(tmp) / 'cost.db'}"}
        urls |= {name: url.format(database=args.database) for name, url in SERVERS.items()}
        print("| backend | nothing changed | one table changed |")
        print("|---|---:|---:|")
        for name, url in urls.items():
            engine = sa.create_engine(url)
            Base.metadata.drop_all(engine)
            Base.metadata.create_all(engine)
            with engine.begin() as connection:
                rows = [{"title": f"seed {n}"} for n in range(20)]
                connection.execute(sa.insert(Conversation), rows)
            clean, changed = per_test(engine, False, args.runs), per_test(engine, True, args.runs)
            print(f"| {name} | {clean:.0f} ms | {changed:.0f} ms |")
            Base.metadata.drop_all(engine)
            engine.dispose()


if __name__ == "__main__":
    main()
