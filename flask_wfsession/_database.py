"""Asking the database what an open transaction did.

Whether a transaction wrote, or took row locks, decides whether its
connection may go back to the pool before a slow step. Statements cannot
tell (a ``SELECT`` can call a function that writes; SQL sent on
``session.connection()`` passes no session hook), so the database is asked,
once per connection at release time:

* PostgreSQL: ``pg_current_xact_id_if_assigned()`` is NULL exactly when the
  transaction has written nothing and locked no row; explicit table locks
  and advisory locks are read from ``pg_locks``.
* MariaDB and MySQL: the session's ``Handler_write``, ``Handler_update`` and
  ``Handler_delete`` counters, against a reading taken when the transaction
  began (one extra round trip per transaction). InnoDB's own transaction
  table is cached for 100 ms and cannot be trusted. Row locks
  (``FOR UPDATE``) are invisible to the counters, so a statement that may
  lock (a ``select()`` with ``with_for_update()``, textual SQL naming
  ``FOR UPDATE``, ``FOR SHARE``, ``LOCK`` or ``GET_LOCK``) counts as a write
  on these backends.
* SQLite (the standard library driver): the connection's ``total_changes``
  counter against its value when the transaction began (no query).
* Any other database: it cannot say, so the transaction counts as written.

A question on a dead connection raises SQLAlchemy's error with
``connection_invalidated`` set; the caller decides what was lost.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm

# Session.info keys, cleared when the session's outermost transaction ends.
CONNECTIONS = "flask_wfsession.connections"  # the connections the transaction holds
SENT = "flask_wfsession.sent"  # statements that may have written were sent
LOCKING = "flask_wfsession.locking"  # statements that may have locked rows were sent
_BASELINE = "flask_wfsession.handler_writes"  # Connection.info: MySQL counters at begin

_PG_WROTE = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
_PG_WROTE_OR_LOCKED = (
    "SELECT pg_current_xact_id_if_assigned() IS NOT NULL OR EXISTS (SELECT FROM pg_locks"
    " WHERE pid = pg_backend_pid() AND (locktype = 'advisory' OR (locktype = 'relation'"
    " AND mode NOT IN ('AccessShareLock', 'RowShareLock'))))"
)
_MYSQL_WRITES = (
    "SELECT CAST(SUM(VARIABLE_VALUE) AS SIGNED) FROM information_schema.SESSION_STATUS"
    " WHERE VARIABLE_NAME IN ('HANDLER_WRITE', 'HANDLER_UPDATE', 'HANDLER_DELETE')"
)


def _scalar(connection: sa.Connection, sql: str) -> t.Any:
    return connection.exec_driver_sql(sql).scalar()


def _sqlite_changes(connection: sa.Connection) -> int | None:
    return getattr(connection.connection.dbapi_connection, "total_changes", None)


def began(connection: sa.Connection) -> None:
    """Note what the database needs to answer later; called when a transaction begins."""
    dialect = connection.dialect.name
    if dialect in ("mysql", "mariadb"):
        connection.info[_BASELINE] = _scalar(connection, _MYSQL_WRITES)
    elif dialect == "sqlite":
        connection.info[_BASELINE] = _sqlite_changes(connection)


def touched(connection: sa.Connection, *, locks: bool, locking: bool) -> bool:
    """Whether the transaction on ``connection`` wrote (or, with ``locks``, locked rows).

    :param locking: the session sent a statement that may lock rows; used
        where the database cannot see row locks.
    :raise sqlalchemy.exc.DBAPIError: the question failed; on a dead
        connection, with ``connection_invalidated`` set.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return bool(_scalar(connection, _PG_WROTE_OR_LOCKED if locks else _PG_WROTE))
    baseline = connection.info.get(_BASELINE)
    if dialect in ("mysql", "mariadb"):
        if baseline is None or (locks and locking):
            return True
        return bool(_scalar(connection, _MYSQL_WRITES) != baseline)
    if dialect == "sqlite":
        return baseline is None or _sqlite_changes(connection) != baseline
    return True


_PQTRANS_INERROR = 3  # libpq's PQtransactionStatus: in a failed transaction


def aborted(session: orm.Session) -> bool:
    """Whether PostgreSQL aborted a transaction of ``session`` after an error
    that the app caught: its ``COMMIT`` would be answered with a rollback.

    Asked of the driver (psycopg 3 and psycopg2 track the server's status),
    without a round trip.
    """
    for connection in connections(session):
        if connection.dialect.name != "postgresql" or connection.invalidated:
            continue
        driver: t.Any = connection.connection.dbapi_connection
        info = getattr(driver, "info", None)  # psycopg 3
        status = getattr(info, "transaction_status", None)
        if status is None and hasattr(driver, "get_transaction_status"):  # psycopg2
            status = driver.get_transaction_status()
        if status == _PQTRANS_INERROR:
            return True
    return False


def ended_under(session: orm.Session) -> bool:
    """Whether a SQLite transaction of ``session`` that wrote was ended by
    someone else on the same driver connection (pools that share one, such as
    ``StaticPool``): the driver has no transaction open any more."""
    for connection in connections(session):
        if connection.dialect.name != "sqlite" or connection.invalidated:
            continue
        driver = connection.connection.dbapi_connection
        baseline = connection.info.get(_BASELINE)
        if getattr(driver, "in_transaction", True) or baseline is None:
            continue
        if _sqlite_changes(connection) != baseline:
            return True
    return False


def shares_driver(session: orm.Session, connection: sa.Connection) -> bool:
    """Whether ``connection`` is another checkout of a driver connection that
    ``session``'s transaction uses (a pool that shares one)."""
    driver = connection.connection.dbapi_connection
    return any(
        c is not connection and not c.invalidated and c.connection.dbapi_connection is driver
        for c in connections(session)
    )


def connections(session: orm.Session) -> list[sa.Connection]:
    """The connections ``session``'s open transaction holds."""
    return list(session.info.get(CONNECTIONS, ()))


def invalidated(session: orm.Session) -> bool:
    """Whether a connection of ``session``'s transaction already died.

    SQLAlchemy invalidates a connection when a statement on it fails with a
    disconnect; until the transaction is rolled back, any further statement
    on it raises ``PendingRollbackError`` instead of a ``DBAPIError``.
    """
    return any(c.invalidated for c in connections(session))


def session_touched(session: orm.Session, *, locks: bool) -> bool:
    """Whether any connection of ``session``'s transaction wrote (or locked rows)."""
    locking = bool(session.info.get(LOCKING))
    return any(touched(c, locks=locks, locking=locking) for c in connections(session))
