"""The study's runs as Ray tasks: one task per run, on a local Ray instance or on any Ray cluster.

The driver (study.py) keeps the scheduling loop (:func:`~adst_examples.studylib.schedule.schedule`: order, budget,
resume); this executor only starts each run as a task that asks for what it needs (``num_gpus=1/--parallel`` with
``--device cuda``, ``num_cpus=--threads``) and collects its result. The dataset caches go into Ray's object store
once (their compact file bytes); a worker decodes the one its run needs and keeps it for the next run it gets, so
the workers need no shared filesystem. Results come back to the driver, which writes each ``result.json``, so a
study folder looks the same whichever executor wrote it and either one resumes it.

A run whose worker dies (killed process, lost node) is retried by Ray up to ``--max-retries`` times, then recorded
as failed; an error inside the run (a bad model, a NaN loss) is recorded as failed at once, as with the local pool.

``ray`` is an optional dependency (``pip install -e "./examples[ray]"``): only this module imports it, and only
when an executor is built.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from adst_examples.data import cache as dcache
from adst_examples.studylib.config import StudyConfig, UsageError
from adst_examples.studylib.plan import Job, run_dir
from adst_examples.studylib.run import train_run
from adst_examples.studylib.workers import describe, setup_process
from adst_examples.training.checkpoints import write_json

__all__ = ["INSTALL", "RayExecutor", "import_ray"]

#: How to install the Ray executor's dependency (named in the error when it is missing).
INSTALL = 'pip install -e "./examples[ray]"'

#: How long :meth:`RayExecutor.wait` blocks in Ray at a time: short, so Ctrl-C reaches Python promptly.
_POLL_S = 0.5


def import_ray() -> Any:
    """The ``ray`` module; a :class:`UsageError` naming the install command when it is missing."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise UsageError(f"--executor ray: the ray package is not installed ({exc}); install it: {INSTALL}") from None


# --------------------------------------------------------------------------------------------------------------------
# In the Ray worker
# --------------------------------------------------------------------------------------------------------------------

#: This worker process's decoded datasets: (dataset, object id) -> data on the run's device.
_DATA: dict[tuple[str, str], dcache.CachedData] = {}


def _dataset(name: str, refs: dict[str, Any], device: torch.device, threads: int) -> dcache.CachedData:
    """Dataset ``name`` of this study, decoded from the object store on this worker's first run that needs it."""
    ray = import_ray()
    key = (name, refs[name].hex())
    if key not in _DATA:
        current = {(n, r.hex()) for n, r in refs.items()}
        for old in [k for k in _DATA if k not in current]:  # another study's data: free it
            del _DATA[old]
        blob = ray.get(refs[name])
        # load_cache reads a file: a private temporary copy on the worker's own disk, removed at once.
        with tempfile.TemporaryDirectory(prefix="adst_study_") as tmp:
            path = Path(tmp) / f"{name}.npz"
            path.write_bytes(blob)
            _DATA[key] = dcache.load_cache(path, threads=threads).to(device)
    return _DATA[key]


def run_task(job: dict[str, Any], cfg: StudyConfig, refs: dict[str, Any], deadline: float | None,
             parallel: int) -> tuple[str, Any]:  # fmt: skip
    """One run in a Ray worker: ``("done", result or None)`` or ``("failed", error text)``.

    ``refs`` (dataset -> object ref of its cache file's bytes) arrives inside a dict, so Ray passes the refs and
    the worker fetches only the dataset its run needs.
    """
    device = torch.device(cfg.device)
    setup_process(device, cfg.threads)
    run = Job(**job)
    try:
        data = _dataset(run.dataset, refs, device, cfg.threads)
        return "done", train_run(run, data, cfg, device, deadline=deadline, parallel=parallel)
    except Exception as exc:  # one failed run (OOM, NaN loss, ...) is recorded; the study goes on
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "failed", describe(exc)


# --------------------------------------------------------------------------------------------------------------------
# In the driver
# --------------------------------------------------------------------------------------------------------------------


class RayExecutor:
    """Runs of the study as Ray tasks; the :class:`~adst_examples.studylib.schedule.Executor` of ``--executor ray``.

    Args:
        address: ``None`` starts a local Ray instance (stopped again by :meth:`close`); ``"auto"`` joins the
            cluster of ``RAY_ADDRESS`` or the one ``ray start`` started on this machine; ``"HOST:PORT"`` or
            ``"ray://HOST:PORT"`` joins that cluster. A Ray connection this process already holds is used as it
            is and left open.
        parallel: runs that share one GPU (``--parallel``): each CUDA run asks for ``1 / parallel`` of a GPU.
        max_retries: how often Ray restarts a run whose worker died before the run is recorded as failed.
        log: where the executor's messages go (the study's log).
    """

    def __init__(self, address: str | None, *, parallel: int, max_retries: int, log: Callable[[str], None]) -> None:
        self.ray = import_ray()
        self.parallel, self.max_retries, self.log = parallel, max_retries, log
        self.owned = not self.ray.is_initialized()
        if self.owned:
            try:
                if address is None:  # "local": a new instance even when `ray start` left one on this machine
                    self.ray.init(address="local", include_dashboard=False)
                else:
                    self.ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                raise UsageError(
                    f"--executor ray: could not reach {where}: {exc}. Check --ray-address; a cluster with token "
                    "authentication (Ray's default) also needs RAY_AUTH_MODE=token and its token here (`ray "
                    "get-auth-token`), except with --ray-address auto on its head node"
                ) from None
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        #: The most CPUs and GPUs of any one node (a run's request must fit on one node).
        self.node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
        self.node_gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
        self.busy: dict[int, tuple[Job, Any]] = {}
        self.cfg: StudyConfig | None = None
        self.refs: dict[str, Any] = {}
        self.task: Any = None
        self.resources: dict[str, float] = {}
        where = "a local Ray instance" if address is None and self.owned else "the Ray cluster"
        log(f"[study] ray: {where} with {len(nodes)} node(s), {self._total('CPU'):g} CPUs, {self._total('GPU'):g} GPUs")

    def default_threads(self, device: torch.device) -> int:
        """``--threads`` when not given: 1 per GPU run; on the CPU, a node's CPUs shared by ``--parallel`` runs."""
        return 1 if device.type == "cuda" else max(1, int(self.node_cpus) // self.parallel)

    def start(self, cfg: StudyConfig, datasets: Sequence[str]) -> None:
        """Put the caches of ``datasets`` into the object store and fix what every run asks for."""
        cuda = cfg.device.startswith("cuda")
        if cfg.threads > self.node_cpus and self.node_cpus > 0:
            raise UsageError(
                f"--threads {cfg.threads}: each run asks for that many CPUs, but no node of the Ray cluster has more "
                f"than {self.node_cpus:g}; pass --threads {int(self.node_cpus)} or fewer"
            )
        self.cfg = cfg
        self.resources = {"num_cpus": float(cfg.threads), "num_gpus": 1.0 / self.parallel if cuda else 0.0}
        self.refs = {name: self.ray.put(Path(cfg.cache_files[name]).read_bytes()) for name in datasets}
        # A GPU run gets a fresh worker process (Ray's own default for GPU tasks, lost when num_gpus is only given
        # per call): a reused process would keep its CUDA context on the GPU of its previous run.
        self.task = self.ray.remote(max_calls=1 if cuda else 0)(run_task)
        if self.capacity() == 0 or (cuda and not self.node_gpus):
            need = "a GPU" if cuda else f"{cfg.threads} free CPUs"
            self.log(f"[study] ray: no node has {need} now; runs wait for one (an autoscaler may add it)")

    def _total(self, key: str) -> float:
        return float(self.ray.cluster_resources().get(key, 0.0))

    def capacity(self) -> int:
        """How many runs fit on the cluster at once, by the resources each one asks for."""
        fits = [self._total("CPU") // self.resources["num_cpus"]]
        if self.resources["num_gpus"]:
            fits.append(self._total("GPU") // self.resources["num_gpus"])
        return int(min(fits))

    def free(self) -> int | None:
        """A slot for one more run while fewer runs than fit on the cluster are in flight (at least one)."""
        if len(self.busy) >= max(1, self.capacity()):
            return None
        return next(i for i in range(len(self.busy) + 1) if i not in self.busy)

    def submit(self, job: Job, deadline: float | None) -> None:
        """Start ``job`` as a Ray task named after it (``ray list tasks`` and the worker's process title show it)."""
        assert self.cfg is not None, "start() first"
        slot = self.free()
        assert slot is not None, "submit needs a free slot"
        ref = self.task.options(name=f"study:{job.key}", max_retries=self.max_retries, **self.resources).remote(
            asdict(job), self.cfg, self.refs, deadline, self.parallel
        )
        self.busy[slot] = (job, ref)

    def wait(self) -> tuple[Job, dict[str, Any] | str | None]:
        """The next finished run: its result (written to its result.json here), ``None`` (deadline) or the error."""
        slots = {ref: slot for slot, (_, ref) in self.busy.items()}
        ready: list[Any] = []
        while not ready:
            ready, _ = self.ray.wait(list(slots), num_returns=1, timeout=_POLL_S)
        job, ref = self.busy.pop(slots[ready[0]])
        try:
            kind, payload = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker or its node died, beyond the retries
            return job, f"{type(exc).__name__}: {exc}\n(the run's worker died; retried {self.max_retries} times)"
        if kind == "failed" or payload is None:
            return job, payload
        assert self.cfg is not None
        write_json(run_dir(Path(self.cfg.out), job) / "result.json", payload)
        return job, payload

    def close(self) -> None:
        """Cancel the runs still in flight (Ctrl-C, an error) and stop the Ray instance this executor started."""
        refs = [ref for _, ref in self.busy.values()]
        ended, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        for ref in refs:
            if ref in ended:
                continue
            try:
                # Not force=True: a forced cancel racing a task's own reply aborts the driver inside Ray (2.60:
                # "Tried to complete task that was not pending"). The run gets a KeyboardInterrupt and ends.
                self.ray.cancel(ref)
            except Exception as exc:  # a task that already ended cannot be cancelled; nothing to do
                self.log(f"[study] ray: cancel: {type(exc).__name__}: {exc}")
        self.busy.clear()
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
