"""The study on Ray (``study.py --executor ray``): the same runs and report as the local executor, a run whose worker
is killed is retried, Ctrl-C stops cleanly and a rerun trains only what is missing, whichever executor resumes it;
the local study never imports ray."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import adst_examples.studylib as study
from adst_examples.training.checkpoints import jsonable

ROOT = Path(__file__).resolve().parents[2]
# Tiny: two steps an epoch, two epochs unless a test asks for more (_argv): long enough to be killed mid-run,
# short enough for a 2-core machine.
TINY = ["--datasets", "synthetic", "--img-size", "32", "--synthetic-n", "16", "--max-steps", "2",
        "--batch-size", "4", "--encoder", "resnet18", "--no-progress", "--arms", "baseline,adst",
        "--parallel", "2", "--threads", "1"]  # fmt: skip
# What a report says about the runs (timings, which differ between any two studies, left out).
RUN_FIELDS = ("test", "val", "best_epoch", "epochs_run", "convergence", "paired", "paired_val", "n_runs")


def _argv(tmp_path: Path, out: str, seeds: int = 2, epochs: int = 2) -> list[str]:
    return [*TINY, "--epochs", str(epochs), "--seeds", str(seeds), "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def _results(out: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.parent.relative_to(out / "runs")): json.loads(p.read_text()) for p in out.glob("runs/*/*/*/result.json")
    }


def _same_runs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The two result.json files hold the same training and the same metrics (their timings aside)."""
    assert a["val"] == b["val"] and a["test"] == b["test"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (a["best_epoch"], a["adst_config"], a["model_args"]) == (b["best_epoch"], b["adst_config"], b["model_args"])


def _same_report(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The same runs and choice (as study.json writes them: a NaN becomes null)."""
    ea, eb = jsonable(a["datasets"]["synthetic"]), jsonable(b["datasets"]["synthetic"])
    assert ea["choice"] == eb["choice"]
    for arm in ("baseline", "adst"):
        for key in RUN_FIELDS:
            assert ea["arms"][arm].get(key) == eb["arms"][arm].get(key), (arm, key)


def _study_workers(title: str = "ray::study:") -> dict[int, str]:
    """Processes running a study's Ray task (Ray titles a worker after its task: ``ray::study:<run>``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(title):
                found[int(entry.name)] = cmd
    return found


class _Killer(threading.Thread):
    """SIGKILLs the worker of run ``key`` once, a moment after its task started (mid-run)."""

    def __init__(self, key: str, delay: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.title, self.delay = f"ray::study:{key}", delay
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = list(_study_workers(self.title))
            if pids:
                time.sleep(self.delay)
                if pids[0] in _study_workers(self.title):  # still that run's worker
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
            time.sleep(0.05)


needs_proc = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray workers through /proc")


@pytest.mark.slow
@needs_proc
def test_ray_runs_equal_the_local_ones_and_a_killed_worker_is_retried(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    local = study.main(_argv(tmp_path, "local"))
    assert not local["failed"] and local["executor"] == "local"

    killer = _Killer("synthetic/adst/seed1")
    killer.start()
    try:
        on_ray = study.main([*_argv(tmp_path, "ray"), "--executor", "ray"])  # starts (and stops) a local instance
    finally:
        killer.stop.set()
    assert killer.killed is not None, "the run's worker was never seen"
    assert not ray.is_initialized()  # the instance the study started is stopped
    assert not _study_workers()
    assert on_ray["executor"] == "ray" and not on_ray["failed"] and not on_ray["not_run"]
    runs_local, runs_ray = _results(tmp_path / "local"), _results(tmp_path / "ray")
    assert sorted(runs_ray) == sorted(runs_local) and len(runs_ray) == 4  # the killed run was trained again
    for key in runs_local:
        _same_runs(runs_local[key], runs_ray[key])
    _same_report(local, on_ray)
    assert on_ray["datasets"]["synthetic"]["arms"]["adst"]["paired"]["dice"]["n"] == 2
    for report in (local, on_ray):  # the executor's own seconds, per run and in all
        cost = report["executor_s"]
        assert cost["outside_run_n"] == 4 and 0 <= cost["outside_run_median"] <= cost["outside_run_max"]
        assert cost["start"] > 0 and cost["close"] >= 0

    # A folder the local executor wrote resumes on Ray: nothing left to train, so no Ray instance is needed.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "local").glob("runs/*/*/*/result.json")}
    again = study.main([*_argv(tmp_path, "local"), "--executor", "ray"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["executor_s"]["outside_run_n"] == 0
    _same_report(local, again)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path: Path) -> Any:
    """A Ray cluster of one 2-CPU head node, started as a user would (``ray start --head``); stopped afterwards."""
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip("the ray command is not installed beside this python")
    port = _free_port()
    log = tmp_path / "head.log"
    with log.open("w") as sink:
        head = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
             "--include-dashboard=false", "--disable-usage-stats", "--block"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # `ray start --block` stops its node on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of that node is left (its own process group)


# A terminal's Ctrl-C raises KeyboardInterrupt; a test run started in the background (`cmd &` in a script) ignores
# SIGINT and its children inherit that, so the driver restores Python's handler before it runs study.py.
_AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _driver(argv: list[str]) -> subprocess.Popen[str]:
    """``python examples/study.py ARGV`` as a user starts it, in its own process group (its terminal)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the cluster's token (~/.ray/auth_token), as Ray asks
    return subprocess.Popen(
        [sys.executable, "-c", _AS_IN_A_TERMINAL, str(ROOT / "examples" / "study.py"), *argv], cwd=ROOT, env=env,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(driver: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err[-3000:]
    return json.loads((out / "study.json").read_text())


@pytest.mark.slow
@needs_proc
def test_a_cluster_study_stops_on_ctrl_c_and_resumes_on_either_executor(tmp_path: Path, ray_head: str) -> None:
    # 6 runs of 6 steps, 2 at a time: after the first result at least 3 runs' training is left, so the Ctrl-C
    # lands mid-study even when a loaded machine starves this test's polling for a few seconds.
    small = {"seeds": 3, "epochs": 3}
    argv = [*_argv(tmp_path, "s", **small), "--executor", "ray", "--ray-address", ray_head]
    out = tmp_path / "s"
    driver = _driver(argv)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("runs/*/*/*/result.json")):
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the study's terminal
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert "interrupted; the same command resumes" in err
    deadline = time.monotonic() + 30  # the runs in flight are cancelled: their workers stop
    while _study_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _study_workers()
    done = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")}
    assert 1 <= len(done) < 6

    # The rerun on the cluster (found as `ray start` left it on this machine) trains only what is missing.
    report = _finish(_driver([*argv[:-1], "auto"]), out)
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert len(_results(out)) == 6 and not report["failed"]
    assert report["datasets"]["synthetic"]["arms"]["adst"]["paired"]["dice"]["n"] == 3

    # The local executor resumes a Ray folder the same way, and trains a missing run to the same result.
    missing = out / "runs" / "synthetic" / "adst" / "seed1" / "result.json"
    before = json.loads(missing.read_text())
    missing.unlink()
    local = study.main(_argv(tmp_path, "s", **small))
    _same_runs(before, json.loads(missing.read_text()))
    _same_report(report, local)

    # --max-retries 0: a run whose worker dies is recorded as failed, and the study goes on.
    killer = _Killer("synthetic/adst/seed0")
    killer.start()
    try:
        argv = [*_argv(tmp_path, "f", seeds=1), "--executor", "ray", "--ray-address", ray_head, "--max-retries", "0"]
        failed = _finish(_driver(argv), tmp_path / "f")
    finally:
        killer.stop.set()
    assert killer.killed is not None
    assert list(failed["failed"]) == ["synthetic/adst/seed0"]
    assert "worker died" in failed["failed"]["synthetic/adst/seed0"]
    assert failed["datasets"]["synthetic"]["arms"]["baseline"]["n_runs"] == 1


def test_the_ray_executor_needs_ray_and_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    with pytest.raises(study.UsageError, match=r'ray package is not installed.*pip install -e "./examples\[ray\]"'):
        study.main([*_argv(tmp_path, "s", seeds=1), "--executor", "ray"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray-address", "auto"], "--ray-address: only for the Ray executor; add --executor ray"),
        (["--max-retries", "2"], "--max-retries: only for the Ray executor"),
        (["--executor", "ray", "--max-retries", "-1"], "--max-retries: expected 0 or more, got -1"),
        (["--executor", "ray", "--measure-parallel"], "with --executor ray pass --parallel N"),
    ],
)
def test_executor_flags_are_checked(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(study.UsageError, match=re.escape(message)):
        study.main([*_argv(tmp_path, "s", seeds=1), *flags])


@pytest.mark.slow
def test_the_local_study_never_imports_ray(tmp_path: Path) -> None:
    pytest.importorskip("ray")  # installed, yet not imported
    argv = [*_argv(tmp_path, "s", seeds=1), "--arms", "baseline", "--epochs", "1", "--max-steps", "1"]
    code = (
        "import sys; import adst_plugin; from adst_examples.studylib import main; "
        f"r = main({argv!r}); assert not r['failed'], r['failed']; print('ray' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
