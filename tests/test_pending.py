"""How pending changes are described."""

from __future__ import annotations

from flask_wfsession._pending import describe_pending

from .conftest import Setup
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
