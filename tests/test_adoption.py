"""Adopting the extension in a working Flask-SQLAlchemy app changes no response and no row.

The app below does what real apps do and what the first release broke: it
edits a row and lets a query autoflush it before the slow call, imports a
CSV by adding rows before a validation call, streams a CSV export after a
display-only change it never commits, and aborts a request after adding a
row. It keeps an audit history the way SQLAlchemy-Continuum does (one
version per changed row per transaction), so a split unit of work would show
as an extra version. The same requests are sent to the app without and with
``WFSession(app, db=db)``, under the defaults.
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as orm
from flask import Flask, Response, abort, request, stream_with_context
from flask_sqlalchemy import SQLAlchemy

from flask_wfsession import (
    DiscardedWritesWarning,
    HeldConnectionWarning,
    WFSession,
    long_running,
)

from .conftest import engine_options


class Base(orm.DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "wfs_adopt_item"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    notes: orm.Mapped[str] = orm.mapped_column(sa.String(200), default="")


class Version(Base):
    __tablename__ = "wfs_adopt_version"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    item_id: orm.Mapped[int]
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100))


def version_rows(session: orm.Session, flush_context: t.Any) -> None:
    """One version per changed item per transaction, written in the same flush."""
    versioned: set[int] = session.info.setdefault("versioned", set())
    for obj in [*session.new, *session.dirty]:
        if isinstance(obj, Item) and obj.id not in versioned:
            versioned.add(obj.id)
            session.add(Version(item_id=obj.id, name=obj.name))


def forget_versions(session: orm.Session) -> None:
    session.info.pop("versioned", None)


@long_running("enrich")
def enrich(name: str) -> str:
    """Stands for the app's one external call."""
    return f"about {name}"


@long_running("validate")
def validate(names: list[str]) -> list[str]:
    return [name for name in names if name]


def create_app(uri: str, backend: str, *, adopt: bool) -> tuple[Flask, SQLAlchemy]:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=uri,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(backend),
        PROPAGATE_EXCEPTIONS=False,
    )
    db = SQLAlchemy(model_class=Base)
    db.init_app(app)
    if adopt:
        WFSession(app, db=db)
    sa.event.listen(db.session, "after_flush", version_rows)
    sa.event.listen(db.session, "after_commit", forget_versions)
    sa.event.listen(db.session, "after_rollback", forget_versions)

    @app.post("/items/<int:item_id>/enrich")
    def enrich_item(item_id: int) -> dict[str, t.Any]:
        item = db.get_or_404(Item, item_id)
        item.name = request.form["name"]
        count = len(db.session.scalars(sa.select(Item)).all())  # autoflushes the edit
        item.notes = enrich(item.name)
        db.session.commit()
        return {"id": item.id, "name": item.name, "notes": item.notes, "items": count}

    @app.post("/import")
    def import_csv() -> dict[str, t.Any]:
        names = request.get_data(as_text=True).splitlines()
        items = [Item(name=name) for name in names]
        db.session.add_all(items)  # unflushed when the slow call runs
        valid = validate(names)
        db.session.commit()
        return {"imported": len(items), "valid": len(valid)}

    @app.get("/export.csv")
    def export() -> Response:
        items = db.session.scalars(sa.select(Item).order_by(Item.id)).all()
        items[0].name = items[0].name.upper()  # for display only; never committed

        def rows() -> t.Iterator[str]:
            for item in items:
                total = db.session.scalar(sa.select(sa.func.count()).select_from(Item))
                yield f"{item.id},{item.name},{total}\n"

        return Response(stream_with_context(rows()), mimetype="text/csv")

    @app.post("/reject")
    def reject() -> str:
        db.session.add(Item(name="rejected"))
        db.session.flush()
        abort(400)

    with app.app_context():
        Base.metadata.create_all(db.engine)
        db.session.add_all([Item(name="first"), Item(name="second")])
        db.session.commit()
    return app, db


def exercise(app: Flask) -> list[tuple[int, bytes]]:
    client = app.test_client()
    responses = [
        client.post("/items/1/enrich", data={"name": "renamed"}),
        client.post("/import", data="third\nfourth\n\nfifth"),
        client.get("/export.csv"),
        client.post("/reject"),
        client.post("/items/99/enrich", data={"name": "missing"}),
    ]
    return [(r.status_code, r.data) for r in responses]


def contents(app: Flask, db: SQLAlchemy) -> tuple[list[t.Any], list[t.Any]]:
    with app.app_context():
        items = db.session.execute(sa.select(Item.id, Item.name, Item.notes).order_by(Item.id))
        versions = db.session.execute(sa.select(Version.item_id, Version.name).order_by(Version.id))
        return [tuple(r) for r in items], [tuple(r) for r in versions]


def drop(app: Flask, db: SQLAlchemy) -> None:
    with app.app_context():
        Base.metadata.drop_all(db.engine)
        db.engine.dispose()


def run(uri: str, backend: str, *, adopt: bool) -> tuple[t.Any, ...]:
    app, db = create_app(uri, backend, adopt=adopt)
    try:
        return exercise(app), contents(app, db)
    finally:
        drop(app, db)


def test_same_responses_and_rows_with_the_extension(uri: str, backend: str) -> None:
    without = run(uri, backend, adopt=False)
    with pytest.warns(HeldConnectionWarning) as held, pytest.warns(DiscardedWritesWarning) as lost:
        adopted = run(uri, backend, adopt=True)
    assert adopted == without
    responses, (items, versions) = adopted
    assert [status for status, _ in responses] == [200, 200, 200, 400, 404]
    # One version per changed row per transaction: 2 seeded, 1 edited, 4 imported.
    # Had the edit been committed before the slow call, there would be one more.
    assert len(items) == 6 and len(versions) == 7
    # The edit the query autoflushed kept its connection through 'enrich'.
    assert any("the long-running step 'enrich'" in str(w.message) for w in held)
    assert any("Discarded uncommitted writes" in str(w.message) for w in lost)
