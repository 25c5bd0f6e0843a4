"""Scheduling: one loop that gives the pending runs to an executor (this process, the worker pool, or Ray tasks)
within the budget, and the choice of how many runs share the device."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from adst_examples.data.cache import CachedData
from adst_examples.studylib.config import StudyConfig
from adst_examples.studylib.plan import Job, estimate_seconds
from adst_examples.studylib.workers import WorkerPool, describe, run_and_save

__all__ = ["Executor", "Outcome", "SerialExecutor", "choose_parallel", "schedule"]


class Executor(Protocol):
    """Runs jobs: :class:`SerialExecutor` here, :class:`~adst_examples.studylib.workers.WorkerPool`, or
    :class:`~adst_examples.studylib.ray_executor.RayExecutor` (``--executor ray``)."""

    busy: dict[int, Any]

    def free(self) -> int | None: ...

    def submit(self, job: Job, deadline: float | None) -> None: ...

    def wait(self) -> tuple[Job, dict[str, Any] | str | None]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """One run at a time, in this process (the data is loaded once)."""

    def __init__(self, cfg: StudyConfig, datasets: dict[str, CachedData], device: torch.device) -> None:
        self.cfg, self.datasets, self.device = cfg, datasets, device
        self.busy: dict[int, Any] = {}

    def free(self) -> int | None:
        """0 when idle."""
        return None if self.busy else 0

    def submit(self, job: Job, deadline: float | None) -> None:
        """Queue ``job``; it runs in :meth:`wait`."""
        self.busy[0] = (job, deadline)

    def wait(self) -> tuple[Job, dict[str, Any] | str | None]:
        """Run the queued job; its result, ``None`` (deadline) or the error text."""
        job, deadline = self.busy.pop(0)
        try:
            return job, run_and_save(job, self.datasets, self.cfg, self.device, deadline)
        except Exception as exc:  # one failed run is recorded; the study goes on
            return job, describe(exc)

    def close(self) -> None:
        """Nothing to stop: the runs ran in this process."""


@dataclass
class Outcome:
    """What :func:`schedule` did: finished results (added to the ones given), failures, runs not started."""

    results: dict[Job, dict[str, Any]]
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)
    #: Per finished run: seconds from its submission to its result, less the run's own ``total_s`` (the
    #: executor's cost per run: dispatch, a worker's first data load, the result's way back).
    outside_s: dict[str, float] = field(default_factory=dict)


def schedule(
    executor: Executor,
    pending: Sequence[Job],
    results: dict[Job, dict[str, Any]],
    epochs: dict[str, int],
    deadline: float | None,
    *,
    log: Callable[[str], None],
    on_done: Callable[[Job], None] = lambda job: None,
    on_failed: Callable[[Job], None] = lambda job: None,
    like: dict[str, Any] | None = None,
) -> Outcome:
    """Start the pending runs in order while an executor slot is free; start none that its measured cost says
    would end after ``deadline`` (that one and every later run are reported as not run). ``like``: the settings
    the runs have, so the cost is read from finished runs measured with them (:func:`estimate_seconds`)."""
    out = Outcome(results=dict(results))
    queue = list(pending)
    submitted: dict[Job, float] = {}
    while queue or executor.busy:
        while queue and executor.free() is not None:
            est = estimate_seconds(queue[0], out.results, epochs[queue[0].dataset], like)
            late = time.time() + (est or 0.0) > deadline if deadline is not None else False
            if late:
                out.not_run += [j.key for j in queue]
                queue = []
                break
            submitted[queue[0]] = time.perf_counter()
            executor.submit(queue.pop(0), deadline)
        if not executor.busy:
            break
        job, res = executor.wait()
        if isinstance(res, str):
            out.failed[job.key] = res
            log(f"[study] {job.key} failed: {res}")
            on_failed(job)
        elif res is None:  # it stopped at the deadline: start nothing more
            out.not_run += [job.key, *(j.key for j in queue)]
            queue = []
        else:
            out.results[job] = res
            out.outside_s[job.key] = time.perf_counter() - submitted[job] - res["timing"]["total_s"]
            on_done(job)
    out.not_run = sorted(out.not_run)
    return out


def choose_parallel(
    pool: WorkerPool, candidates: Sequence[int], spec: dict[str, Any], log: Callable[[str], None]
) -> tuple[int, dict[str, float]]:
    """Throughput (steps/s, all workers together) for each N; the smallest N within 5 % of the best."""
    throughput: dict[str, float] = {}
    for n in candidates:
        times = pool.bench(n, spec)
        throughput[str(n)] = n * spec["steps"] / max(times)
        log(f"[study] parallel {n}: {throughput[str(n)]:.2f} steps/s ({n} x {spec['steps']} steps, {max(times):.1f} s)")
    best = max(throughput.values())
    return min(int(n) for n, v in throughput.items() if v >= 0.95 * best), throughput
