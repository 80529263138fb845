"""The session class and sessionmaker the extension hands out.

Sessions pick their engine like Flask-SQLAlchemy's: a table whose metadata
has a ``bind_key`` goes to that key's engine, everything else to the default
one. Unlike Flask-SQLAlchemy's session, the engines are captured when the
sessionmaker is built, so sessions work in any thread with no app context.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as orm

from . import _hooks
from ._guard import claim


class Session(orm.Session):
    """A :class:`sqlalchemy.orm.Session` that knows the app's engines by bind key.

    Made by :attr:`WFSession.sessionmaker <flask_wfsession.WFSession.sessionmaker>`;
    not meant to be built directly.
    """

    def __init__(self, *, engines: t.Mapping[str | None, sa.Engine], **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self._wfs_engines = engines
        claim(self, scoped=False)

    def get_bind(
        self,
        mapper: t.Any | None = None,
        *,
        clause: t.Any | None = None,
        bind: sa.Engine | sa.Connection | None = None,
        **kwargs: t.Any,
    ) -> sa.Engine | sa.Connection:
        if bind is None:
            table: t.Any = None
            if mapper is not None:
                table = sa.inspect(mapper).local_table
            elif isinstance(clause, sa.Table):
                table = clause
            elif isinstance(clause, sa.UpdateBase):
                table = clause.table
            if isinstance(table, sa.Table) and "bind_key" in table.metadata.info:
                key = table.metadata.info["bind_key"]
                if key in self._wfs_engines:
                    return self._wfs_engines[key]
        return super().get_bind(mapper, clause=clause, bind=bind, **kwargs)


_hooks.install(Session)


def made_for(session: orm.Session, engines: t.Mapping[str | None, sa.Engine]) -> bool:
    """Whether ``session`` was made by the sessionmaker built for ``engines``."""
    return getattr(session, "_wfs_engines", None) is engines


def make_sessionmaker(
    engines: t.Mapping[str | None, sa.Engine], options: t.Mapping[str, t.Any]
) -> orm.sessionmaker[Session]:
    """Build the sessionmaker for one app's ``engines`` (kept by identity) with ``options``."""
    options = {"bind": engines.get(None), **options}
    return orm.sessionmaker(class_=Session, engines=engines, **options)
