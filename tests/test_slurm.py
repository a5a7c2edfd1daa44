"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py; root and Debian's slurm packages, else skipped):
a 3-shard sweep through `hydra/launcher=slurm` merges into a single run's results, and a job slower than its time
limit is signalled by SLURM (USR2), saves its checkpoint at a batch boundary and, with no requeue left, ends with
every process of it (decode workers too); the same command then resumes, is requeued by submitit, released, resumes
again and ends with every image once: the results of an uninterrupted run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reportgen.config.store import conf_dir
from reportgen.runs.pipeline import run
from tests.helpers import WIDE, compose_config, make_colour_folder
from tests.processes import describe, kill_all, left_after, with_environment
from tests.run_compare import assert_same_results
from tests.slurm_cluster import SlurmCluster, why_unavailable

pytest.importorskip("submitit", reason="the SLURM launcher needs submitit (the dev extra installs it)")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher (dev extra)")
REASON = why_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
REPO = conf_dir().parent
SWEEP_TIMEOUT_S = 480  # no accounting on the test cluster: a job that dies without a result would be waited on forever
JOB_GONE_S = 30  # after a job's result is written, its processes are gone within this (its time limit is far later)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    started = time.monotonic()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        print(f"\nSLURM cluster up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()


def start_sweep(cluster: SlurmCluster, overrides, sweep_dir: Path, log: Path) -> subprocess.Popen:
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "run.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(sweep: subprocess.Popen, cluster: SlurmCluster, log: Path, release_requeued: bool = False,
             succeeds: bool = True, each_second=lambda: None) -> int:
    """Wait for the sweep process (at most SWEEP_TIMEOUT_S), calling `each_second` meanwhile; a requeued job waits
    ~2 minutes for its begin time on SLURM: released at once here. Returns how many releases were made."""
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    released = set()  # (job id, restarts): each requeue released once
    while sweep.poll() is None:
        each_second()
        if time.monotonic() > deadline:
            sweep.kill()
            for job in cluster.jobs():
                cluster.run(["scancel", job["JobId"]], check=False)
            pytest.fail(f"the sweep did not end in {SWEEP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}\n"
                        f"{cluster.log('slurmctld')[-3000:]}")
        if release_requeued:
            for job in cluster.jobs():
                key = (job["JobId"], job.get("Restarts"))
                if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime" and key not in released:
                    cluster.run(["scontrol", "update", f"JobId={job['JobId']}", "StartTime=now"])
                    released.add(key)
        time.sleep(1)
    if succeeds:
        assert sweep.returncode == 0, log.read_text()[-6000:]
    return len(released)


def job_record(cluster: SlurmCluster, submitit_id: str) -> dict:
    """scontrol's record of the job submitit names `submitit_id` (`<job>` or `<array job>_<task>`)."""
    array_job, _, task = submitit_id.partition("_")
    (job,) = [j for j in cluster.jobs() if (j["JobId"] == submitit_id if not task else
                                            (j.get("ArrayJobId"), j.get("ArrayTaskId")) == (array_job, task))]
    return job


def job_logs(sweep_dir: Path, leave_out: str = "") -> str:
    """What the sweep's jobs logged: submitit's logs (but those of job `leave_out`) and the run's own."""
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit").rglob("*_log.*"))
                     if p.parent.name != leave_out)
    own = sweep_dir / "0" / "reportgen.log"
    return logs + (own.read_text(errors="replace") if own.exists() else "")


def test_a_three_shard_sweep_on_slurm_merges_into_a_single_run(cluster, tmp_path):
    root = make_colour_folder(tmp_path / "data", per_class=8, noise=60, seed=2)
    overrides = WIDE + [f"dataset.root={root}"]
    started = time.monotonic()
    sweep = start_sweep(cluster, overrides + [
        "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
        "runtime.num_shards=3", "runtime.shard=range(0,3)"], tmp_path / "sweep", tmp_path / "sweep.log")
    wait_for(sweep, cluster, tmp_path / "sweep.log")
    print(f"3-shard SLURM sweep: {time.monotonic() - started:.1f} s")
    shards = [json.loads((tmp_path / "sweep" / str(i) / "results" / "manifest.json").read_text()) for i in range(3)]
    assert [m["status"] for m in shards] == ["shard"] * 3
    assert sorted(tuple(m["shard"]) for m in shards) == [(0, 3), (1, 3), (2, 3)]
    run(compose_config(overrides), out_dir=tmp_path / "single")
    assert_same_results(tmp_path / "single", tmp_path / "sweep" / "merged")


@pytest.fixture
def background():
    """Processes a test starts and waits for later: killed if the test fails first."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def ends_with_its_processes(cluster: SlurmCluster, overrides, sweep_dir: Path, log: Path) -> str:
    """Run a one-job sweep whose job is not requeued, and check that once its result is written every process of
    the job (found by its SLURM_JOB_ID while it ran; slurmd's slurmstepd left out) is gone within JOB_GONE_S.
    Returns submitit's name of the job."""
    submitit_dir = sweep_dir / ".submitit"
    sweep = start_sweep(cluster, overrides, sweep_dir, log)
    seen = set()

    def look() -> None:
        for folder in (submitit_dir.iterdir() if submitit_dir.exists() else []):
            try:
                job_id = job_record(cluster, folder.name)["JobId"]
            except ValueError:
                continue  # not known to the controller yet
            seen.update(with_environment(f"SLURM_JOB_ID={job_id}", leave_out=("slurmstepd",)))

    wait_for(sweep, cluster, log, succeeds=False, each_second=look)  # it fails: the job did not finish
    (name,) = [p.name for p in submitit_dir.iterdir() if p.is_dir()]
    logs = job_logs(sweep_dir)
    assert "stopped by SIGUSR2" in logs and "timed-out too many times" in logs, logs[-6000:]
    left = left_after(seen, JOB_GONE_S)
    if left:
        cluster.run(["scancel", job_record(cluster, name)["JobId"]], check=False)
        kill_all(left)
    assert seen and not left, f"{JOB_GONE_S} s after the job's result, still running:\n{describe(left)}\n{logs[-4000:]}"
    return name


def test_a_job_past_its_time_limit_checkpoints_is_requeued_and_finishes_with_every_image(cluster, tmp_path,
                                                                                         background):
    """600 images at 0.5 s per batch of 2 (at least 150 s of pass on any machine), against a 2-minute limit whose
    USR2 comes 45 s before it (SLURM's periodic check: sometimes up to a minute earlier, so 15 to 75 s into a job).
    First with no requeue allowed (max_num_timeout=0: the path of a job after its last requeue): submitit refuses
    the requeue and its job ends; every process of the job (the run and its decode workers) must be gone at once,
    long before the time limit would kill them. Then the same command with max_num_timeout=3: the job resumes from
    the checkpoint with at least 75 s of pass left, so it is signalled again, requeued, released, resumed, and ends
    with the uninterrupted run's results. A shorter limit risks the signal coming before submitit's handler is
    installed (the job then dies with exit 140)."""
    root = make_colour_folder(tmp_path / "data", per_class=200, noise=60, seed=3)
    sleepy = [o.replace("wide_net", "sleepy_net") for o in WIDE if not o.startswith("runtime.batch_size")] + [
        f"dataset.root={root}", "runtime.batch_size=2", "runtime.checkpoint_every=5"]
    launcher = sleepy + ["runtime.num_workers=2", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1",
                         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=45"]
    sweep_dir = tmp_path / "sweep"
    started = time.monotonic()
    with open(tmp_path / "whole.log", "w") as reference_log:  # the uninterrupted run, made meanwhile
        reference = subprocess.Popen([sys.executable, "run.py", *sleepy, f"hydra.run.dir={tmp_path / 'whole'}"],
                                     cwd=REPO, stdout=reference_log, stderr=subprocess.STDOUT)
    background.append(reference)

    first = ends_with_its_processes(cluster, launcher + ["hydra.launcher.max_num_timeout=0"], sweep_dir,
                                    tmp_path / "last.log")
    print(f"time-limit SLURM job, no requeue left: ended with its processes in {time.monotonic() - started:.1f} s")
    sweep = start_sweep(cluster, launcher + ["hydra.launcher.max_num_timeout=3"], sweep_dir, tmp_path / "sweep.log")
    released = wait_for(sweep, cluster, tmp_path / "sweep.log", release_requeued=True)
    assert reference.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()
    print(f"time-limit SLURM job: {time.monotonic() - started:.1f} s, {released} requeue(s) released")

    logs = job_logs(sweep_dir, leave_out=first)
    assert released >= 1, logs[-6000:]
    assert "stopped by SIGUSR2: checkpoint saved at" in logs, logs[-6000:]
    assert "resuming" in logs and "the model's forward raised" not in logs, logs[-6000:]
    assert "Traceback" not in logs, logs[-6000:]
    (job_name,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name != first]
    job = job_record(cluster, job_name)
    assert int(job["Restarts"]) == released and job["JobState"] == "COMPLETED", job

    manifest = json.loads((sweep_dir / "0" / "results" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["counts"]["processed"] == 600 and manifest["counts"]["failed"] == 0
    assert_same_results(tmp_path / "whole", sweep_dir / "0")  # nothing lost, nothing counted twice
