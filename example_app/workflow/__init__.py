"""A small workflow engine: no Flask, no database.

Nodes form a graph; nodes whose inputs are ready run in parallel on an
executor. Runs and node results are persisted through a
:class:`RunRepository` that the application provides, built on a session
factory, so this package never sees a session, let alone a request's.
"""

from .engine import Node, RunRepository, Workflow, WorkflowEngine

__all__ = ["Node", "RunRepository", "Workflow", "WorkflowEngine"]
