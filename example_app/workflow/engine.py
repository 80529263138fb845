"""Workflows of nodes, run in waves on an executor."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import typing as t


@dataclasses.dataclass(frozen=True)
class Node:
    """A step of a workflow: ``run`` gets the results of ``after`` by name."""

    name: str
    run: t.Callable[[dict[str, str]], str]
    after: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Workflow:
    name: str
    nodes: tuple[Node, ...]


class RunRepository(t.Protocol):
    """Where runs are kept. The application implements it."""

    def start(self, workflow: str) -> int: ...
    def save_result(self, run_id: int, node: str, output: str) -> None: ...
    def finish(self, run_id: int, status: str) -> None: ...


class WorkflowEngine:
    """Runs workflows, parallel where the graph allows."""

    def __init__(self, runs: RunRepository, executor: concurrent.futures.Executor) -> None:
        self._runs = runs
        self._executor = executor

    def run(self, workflow: Workflow, inputs: dict[str, str]) -> int:
        """Run ``workflow`` to the end; return the run's id."""
        run_id = self._runs.start(workflow.name)
        results = dict(inputs)
        pending = list(workflow.nodes)
        try:
            while pending:
                ready = [n for n in pending if all(dep in results for dep in n.after)]
                if not ready:
                    raise ValueError(f"workflow {workflow.name!r} has a cycle or a missing input")
                futures = {n.name: self._executor.submit(n.run, dict(results)) for n in ready}
                for name, future in futures.items():
                    results[name] = future.result()
                    self._runs.save_result(run_id, name, results[name])
                pending = [n for n in pending if n not in ready]
        except Exception:
            self._runs.finish(run_id, "failed")
            raise
        self._runs.finish(run_id, "succeeded")
        return run_id
