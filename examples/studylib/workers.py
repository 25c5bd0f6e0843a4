"""Worker processes that share the device: each loads the cached data once, then trains the jobs it is given.

Also the parallel benchmark (``--measure-parallel``): every worker times the engine's training step at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from adst_examples.data import cache as dcache
from adst_examples.data import train_transforms
from adst_examples.studylib.config import StudyConfig
from adst_examples.studylib.plan import Job, run_dir
from adst_examples.studylib.run import build_run, train_run
from adst_examples.training.batches import cached_train_batches
from adst_examples.training.checkpoints import write_json
from adst_examples.training.distributed import configure_backends
from adst_examples.training.engine import train_step

__all__ = ["WorkerPool", "describe", "exit_with_parent", "load_datasets", "run_and_save", "setup_process"]


def describe(exc: BaseException) -> str:
    """The error and the last frames of its traceback (what a failed run records)."""
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc)[-6:])}"


def setup_process(device: torch.device, threads: int) -> None:
    """torch's CPU threads for this process and the numerics of every run."""
    torch.set_num_threads(max(1, threads))
    configure_backends(device)


def load_datasets(cfg: StudyConfig, device: torch.device) -> dict[str, dcache.CachedData]:
    """Every cache of the study, decoded and moved to ``device``."""
    return {name: dcache.load_cache(path).to(device) for name, path in cfg.cache_files.items()}


def run_and_save(job: Job, datasets: dict[str, dcache.CachedData], cfg: StudyConfig, device: torch.device,
                 deadline: float | None, parallel: int = 1) -> dict[str, Any] | None:  # fmt: skip
    """Train ``job``; write its result.json unless it stopped at the deadline."""
    result = train_run(job, datasets[job.dataset], cfg, device, deadline=deadline, parallel=parallel)
    if result is not None:
        write_json(run_dir(Path(cfg.out), job) / "result.json", result)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(datasets: dict[str, dcache.CachedData], cfg: StudyConfig, device: torch.device, spec: dict[str, Any],
           barrier: Any) -> float:  # fmt: skip
    """Time ``spec['steps']`` engine steps after a warm-up, started together with the other workers."""
    data = datasets[spec["dataset"]]
    model, criterion, opt, _ = build_run(Job(spec["dataset"], spec["arm"], 0), data, cfg, device)
    total = spec["warmup"] + spec["steps"]
    transform = train_transforms(data.in_channels, data.size) if cfg.augment else None
    batch = min(cfg.batch_size, len(data.split["train"]))
    batches = []
    for epoch in range(1, total + 1):  # one batch per "epoch": as many distinct batches as steps
        batches += list(cached_train_batches(data, seed=0, epoch=epoch, batch_size=batch, steps=1, transform=transform))
    for b in batches[: spec["warmup"]]:
        train_step(model, criterion, opt, b)
    _sync(device)
    barrier.wait()
    t0 = time.perf_counter()
    for b in batches[spec["warmup"] :]:
        train_step(model, criterion, opt, b)
    _sync(device)
    return time.perf_counter() - t0


def exit_with_parent() -> None:
    """In a spawned worker: exit as soon as the parent process is gone, however it died.

    Without this a ``kill`` of the study (SIGTERM or SIGKILL, which skip the clean-up that stops daemonic workers)
    leaves its workers training on, orphaned, competing with the next study for the device.
    """
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when the parent has exited
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_main(rank: int, cfg: StudyConfig, barriers: dict[int, Any], jobs: Any, results: Any) -> None:
    """A worker process: load the data onto the device once, then take jobs until ``None``."""
    exit_with_parent()
    try:
        device = torch.device(cfg.device)
        setup_process(device, cfg.threads)
        datasets = load_datasets(cfg, device)
        results.put(("ready", rank, None))
    except BaseException as exc:  # reported to the parent
        results.put(("error", rank, f"worker {rank} failed to start: {type(exc).__name__}: {exc}"))
        return
    while True:
        item = jobs.get()
        if item is None:
            return
        kind, payload = item
        if kind == "bench":
            try:
                results.put(("bench", rank, _bench(datasets, cfg, device, payload, barriers[payload["n"]])))
            except Exception as exc:  # reported to the parent
                results.put(("error", rank, f"bench {payload}: {describe(exc)}"))
            continue
        job = Job(**payload["job"])
        try:
            result = run_and_save(job, datasets, cfg, device, payload["deadline"], payload["parallel"])
            results.put(("done", rank, (payload["job"], result)))
        except Exception as exc:  # one failed run (OOM, NaN loss, ...) is recorded; the study goes on
            results.put(("failed", rank, (payload["job"], describe(exc))))
            if device.type == "cuda":
                torch.cuda.empty_cache()


class WorkerPool:
    """``size`` spawned worker processes, one job queue per worker."""

    def __init__(self, size: int, cfg: StudyConfig, barrier_sizes: Sequence[int] = ()) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(size)]
        barriers = {n: ctx.Barrier(n) for n in barrier_sizes}
        self.procs = [
            ctx.Process(target=_worker_main, args=(r, cfg, barriers, self.queues[r], self.results), daemon=True)
            for r in range(size)
        ]
        for proc in self.procs:
            proc.start()
        for _ in range(size):
            kind, _, payload = self._get()
            if kind == "error":
                self.close()
                raise RuntimeError(payload)
        self.busy: dict[int, dict[str, Any]] = {}
        self.active = size

    def _get(self, timeout: float | None = None) -> tuple[str, int, Any]:
        while True:
            try:
                return self.results.get(timeout=5.0 if timeout is None else timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    raise RuntimeError(f"worker(s) {dead} died (exit codes {codes})") from None
                if timeout is not None:
                    raise

    def bench(self, n: int, spec: dict[str, Any]) -> list[float]:
        """Run the benchmark on the first ``n`` workers at once; their timed seconds."""
        for r in range(n):
            self.queues[r].put(("bench", {**spec, "n": n}))
        times = []
        for _ in range(n):
            kind, _, payload = self._get()
            if kind == "error":
                raise RuntimeError(payload)
            times.append(payload)
        return times

    def shrink(self, n: int) -> None:
        """Keep the first ``n`` workers."""
        for r in range(n, self.active):
            self.queues[r].put(None)
        self.active = n

    def free(self) -> int | None:
        """A worker without a job, if any."""
        return next((r for r in range(self.active) if r not in self.busy), None)

    def submit(self, job: Job, deadline: float | None) -> None:
        """Start ``job`` on a free worker."""
        rank = self.free()
        assert rank is not None, "submit needs a free worker"
        self.busy[rank] = asdict(job)
        self.queues[rank].put(("run", {"job": asdict(job), "deadline": deadline, "parallel": self.active}))

    def wait(self) -> tuple[Job, dict[str, Any] | str | None]:
        """The next finished job and its result (``None``: stopped at the deadline; a string: it failed)."""
        kind, rank, payload = self._get()
        if kind == "error":
            raise RuntimeError(payload)
        job_dict, result = payload
        self.busy.pop(rank, None)
        return Job(**job_dict), result

    def close(self) -> None:
        """Stop every worker."""
        for q in self.queues:
            q.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
