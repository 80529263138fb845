"""Which statements count as writes, and how pending changes are described."""

from __future__ import annotations

import pytest

from flask_wfsession._pending import _text_writes, describe_pending

from .conftest import Setup
from .models import Conversation


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  select * from t",
        "(SELECT 1) UNION (SELECT 2)",
        "/* comment */ SELECT 1",
        "-- note\nSELECT 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SHOW TABLES",
        "EXPLAIN SELECT 1",
        "PRAGMA table_info(t)",
        "SAVEPOINT sa_1",
        "RELEASE SAVEPOINT sa_1",
        "SET TIME ZONE 'UTC'",
    ],
)
def test_reads_are_not_writes(sql: str) -> None:
    assert not _text_writes(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1)",
        "update t set a = 1",
        "DELETE FROM t",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
        "MERGE INTO t USING s ON (t.id = s.id) WHEN MATCHED THEN DELETE",
        "REPLACE INTO t VALUES (1)",
        "CREATE TABLE t (a int)",
        "TRUNCATE t",
        "CALL do_something()",
    ],
)
def test_writes_and_unknown_verbs_are_writes(sql: str) -> None:
    assert _text_writes(sql)


def test_a_large_unit_of_work_is_summarised_not_listed(setup: Setup) -> None:
    with setup.app.app_context():
        setup.wfs.session.add_all(Conversation(title=str(n)) for n in range(25))
        changes = describe_pending(setup.wfs.session)
        setup.wfs.session.flush()
        flushed = describe_pending(setup.wfs.session)
        setup.wfs.session.rollback()
    assert len(changes) == 11 and changes[-1] == "and 15 more objects"
    assert len(flushed) == 3
    assert all(c.startswith("flushed, not committed: new Conversation") for c in flushed)
