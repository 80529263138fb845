"""How pending changes are described."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from flask_wfsession._pending import describe_pending

from .conftest import Setup, dialect
from .models import Conversation


def test_a_large_unit_of_work_is_summarised_not_listed(setup: Setup) -> None:
    with setup.app.app_context():
        setup.wfs.session.add_all(Conversation(title=str(n)) for n in range(25))
        changes = describe_pending(setup.wfs.session)
        setup.wfs.session.flush()
        flushed = describe_pending(setup.wfs.session)
        setup.wfs.session.rollback()
    assert len(changes) == 11 and changes[-1] == "and 15 more objects"
    assert flushed == ["writes already sent in the open transaction (the database says so)"]


def test_writes_in_a_transaction_the_database_aborted_are_named_so(
    setup: Setup, backend: str
) -> None:
    """PostgreSQL aborts the transaction after a failed statement: what was
    written before is lost either way, and the report says why."""
    with setup.app.app_context():
        session = setup.wfs.session
        session.add(Conversation(id=7, title="taken"))
        session.commit()
        session.add(Conversation(title="written"))
        session.flush()
        with pytest.raises(sa.exc.IntegrityError):
            session.execute(sa.insert(Conversation).values(id=7, title="duplicate"))
        changes = describe_pending(session)
        session.rollback()
    if dialect(backend) == "postgresql":
        assert changes == ["writes sent in a transaction the database aborted after an error"]
    else:  # the failed statement left the transaction going
        assert changes == ["writes already sent in the open transaction (the database says so)"]
