"""SQLAlchemy repositories. Each receives a session factory, never a session."""

from __future__ import annotations

import sqlalchemy.orm as orm

from .models import NodeResult, WorkflowRun


class SQLAlchemyRunRepository:
    """A :class:`~example_app.workflow.RunRepository` on short transactions.

    Each method opens a session, does its work in one transaction and closes
    it, from whichever thread the engine calls it.
    """

    def __init__(self, session_factory: orm.sessionmaker[orm.Session]) -> None:
        self._session_factory = session_factory

    def start(self, workflow: str) -> int:
        with self._session_factory() as session, session.begin():
            run = WorkflowRun(workflow=workflow, status="running")
            session.add(run)
            session.flush()
            return run.id

    def save_result(self, run_id: int, node: str, output: str) -> None:
        with self._session_factory() as session, session.begin():
            session.add(NodeResult(run_id=run_id, node=node, output=output))

    def finish(self, run_id: int, status: str) -> None:
        with self._session_factory() as session, session.begin():
            session.get_one(WorkflowRun, run_id).status = status
