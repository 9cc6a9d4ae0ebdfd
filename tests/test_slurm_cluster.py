"""The real ``slurm/merge.sbatch`` and ``slurm/watch.sbatch`` on a real single-machine SLURM.

The cluster (``tests/slurm_cluster.py``: munged, slurmctld and two emulated nodes ``n1``/``n2`` of
2 CPUs, Debian's Slurm 22.05) is started once for the session. The scripts run unchanged in their CPU
flavour: ``sbatch --gpus-per-node=0`` overrides their ``#SBATCH --gpus-per-node`` (no GPU GRES here),
and ``strategy=ddp`` makes the ranks talk over gloo. Every job gets ``MASTER_ADDR=127.0.0.1``, since the
emulated node names do not resolve.

- 2 tasks on one node (srun, gloo), and 2 nodes with one task each (``sbatch -N2``,
  ``strategy.num_nodes=2``): the same trials (weights, losses) and the same best as one local process;
  on 2 nodes, only global rank 0 writes the run's outputs (``tests/write_audit``).
- A job with ``--requeue``, ``--time=1`` and ``--signal=USR2@1``: SLURM's own signal lands mid-search, the
  trial in flight finishes, the state is saved, the job requeues itself with ``scontrol requeue``, and
  the requeued job resumes in the same folder and finishes the budget; nothing lost or repeated, the Ax
  snapshot agrees with the ledger.
- ``scontrol requeue`` of a running 2-task job from outside (an admin, or preemption): SLURM sends
  SIGCONT+SIGTERM to the tasks; they save at the trial boundary, the job restarts and finishes. (A SIGTERM
  at the very start of a trial, while Lightning sets ``validate`` up, still goes to Lightning's handler and
  aborts the trial: the strict xfail ``test_sigterm_while_lightning_sets_up_a_trials_validate_only_sets_the_flag``
  in tests/test_slurm.py.)
- A sweep through the submitit launcher (``hydra/launcher=slurm``): one SLURM job per point, and the
  sweep summary.
- ``slurm/watch.sbatch`` with ``--dependency=after:TRAIN`` beside a training job that writes
  checkpoints: rounds for the checkpoints that land while it watches.

Every wait has a deadline and fails with ``scontrol show job`` and the job's log; every job a test
submits is cancelled at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from slurm_cluster import FINAL_STATES, slurm_cluster  # noqa: F401  (the session fixture)
from test_resume import last_status, ledger_lines

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parent.parent
MERGE = REPO / "slurm" / "merge.sbatch"
WATCH = REPO / "slurm" / "watch.sbatch"
AUDIT = Path(__file__).resolve().parent / "write_audit"
CPU = ["--gpus-per-node=0"]  # the scripts' CPU flavour: no GPU asked for; their GPU check is skipped then
BLOCK, NBLOCKS, SEARCH_BLOCKS, TRIALS = 24, 37, 13, 4  # 37 and 13: not divisible by 2 ranks


# ----------------------------------------------------------------------------- helpers

def job_env(cluster, **extra: str) -> dict[str, str]:
    """What a job sees (sbatch exports the submitter's environment): this cluster, offline, one thread."""
    return {**cluster.client_env, "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def overrides(tiny_run, out: Path, *extra: str, trials: int = TRIALS) -> list[str]:
    return [f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=3",
            f"data.heldout.path={tiny_run['heldout']}", f"data.heldout.block_size={BLOCK}",
            f"data.heldout.num_blocks={NBLOCKS}", f"data.search_blocks={SEARCH_BLOCKS}", "data.batch_size=4",
            "demo.enabled=false", f"search.trials={trials}", "search.acquisition=ei", "report.progress=false",
            "merge.write=false", f"output_dir={out}", *extra]


def log_of(folder: Path, job_id: str, name: str = "lightning_merge") -> Path:
    """The job's log: the scripts' own ``#SBATCH --output=%x-%j.out`` in the submission folder."""
    return folder / f"{name}-{job_id}.out"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(pred, timeout_s: float, what: str, cluster, job_id: str, *logs: Path, poll_s: float = 0.05):
    """Poll ``pred()`` until true; fail early if the job ended, and after ``timeout_s``, with its record and logs."""
    deadline = time.monotonic() + timeout_s
    last_check = 0.0
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s:g} s\n" + cluster.describe(job_id, *logs))
        if time.monotonic() - last_check > 2:
            last_check = time.monotonic()
            if cluster.state(job_id) in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended before {what}\n" + cluster.describe(job_id, *logs))
        time.sleep(poll_s)


def finished_search(out: Path) -> tuple[dict[int, dict], dict]:
    return last_status(ledger_lines(out)), json.loads((out / "results.json").read_text())


def assert_same_search(ref: tuple[dict, dict], got: tuple[dict, dict]) -> None:
    """Same trials (origin, weights, loss) and the same candidates and best as the one-process run.

    The tolerances of tests/test_distributed.py: a DDP rank sums its shard's token losses in another
    order than one process does.
    """
    (one, res1), (two, res2) = ref, got
    assert sorted(one) == sorted(two)
    for i in one:
        assert two[i]["origin"] == one[i]["origin"] and two[i]["status"] == one[i]["status"] == "completed", i
        assert two[i]["weights"] == pytest.approx(one[i]["weights"], abs=1e-9), i
        assert two[i]["objective"] == pytest.approx(one[i]["objective"], rel=1e-6), i
    assert res2["trials"] == res1["trials"] == TRIALS
    assert [c["name"] for c in res2["candidates"]] == [c["name"] for c in res1["candidates"]]
    for a, b in zip(res1["candidates"], res2["candidates"]):
        assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-6), a["name"]
    assert res2["best"]["weights"] == pytest.approx(res1["best"]["weights"], abs=1e-9)
    assert res2["best"]["heldout_loss"] == pytest.approx(res1["best"]["heldout_loss"], rel=1e-6)


def assert_whole_after_requeue(out: Path, trials: int, before: dict[int, dict]) -> dict[int, dict]:
    """The kill test's checks (tests/test_resume.py) for a graceful stop: nothing lost, nothing repeated,
    nothing failed; the trials of the first run unchanged; the Ax snapshot agrees with the ledger."""
    lines = ledger_lines(out)
    recs = last_status(lines)
    assert all(r["status"] == "completed" for r in recs.values()), \
        [(i, r["status"], r.get("reason")) for i, r in recs.items() if r["status"] != "completed"]
    # Every index once: `running` then `completed`, never completed twice.
    assert Counter(r["trial"] for r in lines if r["status"] == "completed") == Counter(list(recs))
    assert len(lines) == 2 * len(recs)
    search = [r for r in recs.values() if not r["origin"].startswith("baseline:")]
    assert len(search) == trials  # the budget was finished
    for i, r in before.items():
        assert recs[i]["objective"] == r["objective"] and recs[i]["weights"] == r["weights"], i
    from ax import Client

    df = Client.load_from_json_file(str(out / "ax_snapshot.json")).summarize()
    ax_status = {int(i): str(s) for i, s in zip(df["trial_index"], df["trial_status"])}
    assert ax_status == {i: "COMPLETED" for i in recs}
    ax_values = {int(i): float(v) for i, v in zip(df["trial_index"], df["objective"])}
    assert ax_values == pytest.approx({i: r["objective"] for i, r in recs.items()})
    results = json.loads((out / "results.json").read_text())
    assert results["trials"] == trials
    assert results["best"]["weights"] == min(recs.values(), key=lambda r: r["objective"])["weights"]
    return recs


@pytest.fixture
def jobs(slurm_cluster):
    """The ids a test submits; every one still queued or running at its end is cancelled."""
    ids: list[str] = []
    yield ids
    slurm_cluster.cancel(*ids)


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory):
    """The reference: the same search in one local process (strategy=single), not under SLURM."""
    root = tmp_path_factory.mktemp("one_process")
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", *overrides(tiny_run, out), "strategy=single"],
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return finished_search(out)


@pytest.fixture(scope="module")
def big_heldout(tmp_path_factory) -> Path:
    """Held-out text for slow trials (3226 blocks of 128 tokens; ~1 s per 1000 blocks): preemption must land
    mid-search."""
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("big_heldout") / "heldout.jsonl"
    with open(path, "w") as fh:
        for i in range(8000):
            fh.write(json.dumps({"text": CORPUS[i % 5] + f"# doc {i}\n"}) + "\n")
    return path


def slow_overrides(tiny_run, heldout: Path, out: Path, blocks: int, trials: int, *extra: str) -> list[str]:
    """A grid search over the simplex on ``blocks`` blocks: proposals that cost nothing and never stop the search
    early (the GP converges on these checkpoints; a random search's proposal grew to ~1 s at 40 trials)."""
    return [f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=3", "search=grid",
            "search.space=simplex", f"search.trials={trials}", f"data.heldout.path={heldout}",
            "data.heldout.block_size=128", f"data.heldout.num_blocks={blocks}", f"data.search_blocks={blocks}",
            "data.batch_size=16", "demo.enabled=false", "report.progress=false", "merge.write=false",
            f"output_dir={out}", *extra]


# ----------------------------------------------------------------------------- the cluster itself

def test_the_cluster_has_two_idle_nodes(slurm_cluster):
    c = slurm_cluster
    print(f"SLURM test cluster started in {c.startup_s:.1f} s")
    nodes = c.run("sinfo", "-h", "-N", "-o", "%N %c %T").stdout.split("\n")
    assert sorted(line.split()[:2] for line in nodes if line.strip()) == [["n1", "2"], ["n2", "2"]]
    assert c.run("scontrol", "--version").stdout.split()[-1].startswith(("2", "3"))  # e.g. slurm-wlm 22.05.8


# ----------------------------------------------------------------------------- equal to one process

def test_two_tasks_on_one_node_equal_one_process(slurm_cluster, jobs, tiny_run, one_process, tmp_path):
    c, out = slurm_cluster, tmp_path / "run"
    j = c.sbatch(MERGE, "strategy=ddp", *overrides(tiny_run, out), options=[*CPU, "--ntasks-per-node=2"],
                 env=job_env(c), cwd=tmp_path)
    jobs.append(j)
    log = log_of(tmp_path, j)
    rec = c.wait_done(j, 300, log)
    assert rec["NumNodes"] == "1" and rec["NumTasks"] == "2" and rec["Restarts"] == "0"
    text = read(log)
    assert f"merge.sbatch: job {j} (restart 0): 1 node(s) x 2 " in text  # strategy.devices=2 from the allocation
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # two ranks, over srun
    assert_same_search(one_process, finished_search(out))


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster, tiny_run, tmp_path_factory):
    """``sbatch -N2``: one task on each emulated node, with the write audit watching the run folder."""
    c = slurm_cluster
    root = tmp_path_factory.mktemp("two_nodes")
    out, audit = root / "run", root / "audit"
    env = job_env(c, PYTHONPATH=":".join(filter(None, [str(AUDIT), c.client_env.get("PYTHONPATH")])),
                  LM_WRITE_AUDIT_ROOT=str(out), LM_WRITE_AUDIT_DIR=str(audit))
    j = c.sbatch(MERGE, "strategy=ddp", *overrides(tiny_run, out),
                 options=[*CPU, "--nodes=2", "--ntasks-per-node=1"], env=env, cwd=root)
    try:
        rec = c.wait_done(j, 300, log_of(root, j))
    finally:
        c.cancel(j)
    logs = {}
    for f in sorted(audit.glob("*.log")):
        rank, pid = f.stem.rsplit("-", 1)
        logs.setdefault(rank, []).append((int(pid), [tuple(line.split("\t", 1))
                                                     for line in f.read_text().splitlines()]))
    return {"job": j, "record": rec, "out": out, "log": log_of(root, j), "audit": logs}


def test_two_nodes_one_task_each_equal_one_process(two_nodes, one_process):
    rec, text = two_nodes["record"], read(two_nodes["log"])
    assert rec["NumNodes"] == "2" and rec["NumTasks"] == "2" and rec["NodeList"] == "n[1-2]"
    assert f"merge.sbatch: job {two_nodes['job']} (restart 0): 2 node(s) x 1 " in text  # strategy.num_nodes=2
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert_same_search(one_process, finished_search(two_nodes["out"]))


def test_two_nodes_only_rank_zero_writes_the_run(two_nodes):
    audit, out = two_nodes["audit"], two_nodes["out"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in read(two_nodes["log"])  # rank 1 ran (on n2)
    assert set(audit) <= {"rank0", "rank1"}, sorted(audit)  # every audited process knew its SLURM rank
    assert len(audit["rank0"]) == 1 and len(audit.get("rank1", [])) <= 1  # one process per rank (srun's)
    zero = {Path(p).name for _, events in audit["rank0"] for _, p in events}
    assert {"trials.jsonl", "results.json", "candidates.jsonl", "report.md", ".lightning_merge.lock"} <= zero
    assert any(n.startswith(".ax_snapshot.json.") for n in zero), sorted(zero)  # published atomically
    # Rank 1 wrote nothing under the run folder. Its only audited events are Hydra's makedirs of the run
    # folder itself (exist_ok, in every process, before lightning_merge runs): no file, no change once it exists.
    rank1 = [(e, p) for _, events in audit.get("rank1", []) for e, p in events]
    assert all(e == "os.mkdir" and Path(p) == out for e, p in rank1), rank1


# ----------------------------------------------------------------------------- preemption, for real

def test_time_limit_signal_saves_requeues_itself_and_resumes(slurm_cluster, jobs, tiny_run, big_heldout, tmp_path):
    """``--time=1 --signal=USR2@1``: Slurm checks time limits every 30 s and signals a job whose time left is
    at most lead + 30 s, so SLURM's SIGUSR2 comes 29-59 s after the start. The search is under way by then:
    the baselines are off (they ended at ~28 s when idle, and after the earliest signal on a loaded CI machine),
    so it starts once the model is built (~9 s idle), and it lasts ~68 s (44 trials of ~1.55 s on 1600 blocks on
    this 2-core machine when idle: ~18 s past the latest signal; longer under load)."""
    c, out, trials = slurm_cluster, tmp_path / "run", 44
    j = c.sbatch(MERGE, *slow_overrides(tiny_run, big_heldout, out, 1600, trials, "baselines.enabled=false"),
                 options=[*CPU, "--ntasks-per-node=1", "--time=1", "--signal=USR2@1"], env=job_env(c), cwd=tmp_path)
    jobs.append(j)
    # The job's log gets the batch script's lines (its start lines); the driver's lines are read from rank 0's
    # own log in the run folder (Hydra's job log), since srun may drop what a task prints as the job is requeued.
    log, main_log = log_of(tmp_path, j), out / "__main__.log"
    rec = c.job(j)
    assert rec["Requeue"] == "1" and rec["TimeLimit"] == "00:01:00"  # --requeue from the script's #SBATCH lines
    # The job requeues itself: the first run is over and saved once SLURM counts a restart.
    wait_for(lambda: c.job(j).get("Restarts", "0") != "0" and f"requeued SLURM job {j}" in read(main_log), 150,
             "requeued", c, j, log, main_log, poll_s=0.5)
    before = last_status(ledger_lines(out))
    # Slurm's 30 s granularity would signal the restarted run as early again; give it a long limit instead,
    # as a fresh allocation would have (what a second signal would do was just shown).
    c.run("scontrol", "update", f"JobId={j}", "TimeLimit=10")
    rec = c.wait_done(j, 300, log, main_log)

    text, main = read(log), read(main_log)
    assert rec["Restarts"] == "1"
    # Both starts in the one log (--open-mode=append), the second with SLURM_RESTART_COUNT=1.
    starts = [f"merge.sbatch: job {j} (restart {n})" for n in (0, 1)]
    assert [text.count(s) for s in starts] == [1, 1]
    assert text.index("(restart 0)") < text.index("(restart 1)")
    # SLURM's signal (this test sends none), then the job's own `scontrol requeue`, then the resume.
    assert main.index("search stops: preempted (SIGUSR2)") < main.index(f"requeueing SLURM job {j}: ") \
        < main.index(f"requeued SLURM job {j}") < main.index(f"resumed {len(before)} trials")
    assert f"scontrol requeue {j}" in main
    # The signal landed mid-search; the trial in flight was finished, not abandoned, and nothing ran after it.
    assert all(r["status"] == "completed" for r in before.values()), before
    done_first = [r for r in before.values() if not r["origin"].startswith("baseline:")]
    assert 0 < len(done_first) < trials, f"{len(done_first)} of {trials} search trials before the signal"
    assert_whole_after_requeue(out, trials, before)


def test_scontrol_requeue_from_outside_restarts_the_job_and_loses_nothing(slurm_cluster, jobs, tiny_run,
                                                                        big_heldout, tmp_path):
    """What an admin (or a preempting scheduler with PreemptMode=REQUEUE) does to a running 2-task job.

    Slurm 22.05 sends SIGCONT and SIGTERM to every task at once (SIGKILL KillWait=30 s later); the ranks
    agree on the flag at the next trial boundary, rank 0 saves, and its own ``scontrol requeue`` finds the
    job requeued already ("Job is pending execution"), which is fine.

    The requeue is sent 0.3 s into a search trial's ~0.7 s evaluation. Sent at once on the ledger's ``running``
    line it reached Lightning's own SIGTERM handler in 1 of 2 runs (before 4ae5826 in most: then the merge was
    in the window too), which aborts the trial; the strict xfail
    ``test_sigterm_while_lightning_sets_up_a_trials_validate_only_sets_the_flag`` in tests/test_slurm.py.
    """
    c, out, trials = slurm_cluster, tmp_path / "run", 6
    j = c.sbatch(MERGE, "strategy=ddp", *slow_overrides(tiny_run, big_heldout, out, 800, trials),
                 options=[*CPU, "--ntasks-per-node=2"], env=job_env(c), cwd=tmp_path)
    jobs.append(j)
    log, main_log = log_of(tmp_path, j), out / "__main__.log"
    wait_for(lambda: any(r["status"] == "running" and not r["origin"].startswith("baseline:")
                         for r in ledger_lines(out)), 240, "searching", c, j, log, main_log, poll_s=0.02)
    time.sleep(0.3)
    c.run("scontrol", "requeue", j)
    wait_for(lambda: c.job(j).get("Restarts", "0") != "0" and "search stops: preempted (SIGTERM)" in read(main_log),
             120, "requeued and stopped", c, j, log, main_log, poll_s=0.5)
    # The job is requeued, but the old run may still be saving: wait for its last word on it.
    wait_for(lambda: "state saved in" in read(main_log), 60, "saved", c, j, log, main_log, poll_s=0.5)
    before = last_status(ledger_lines(out))
    rec = c.wait_done(j, 300, log, main_log)

    assert rec["Restarts"] == "1"
    text, main = read(log), read(main_log)
    assert f"merge.sbatch: job {j} (restart 0)" in text and f"merge.sbatch: job {j} (restart 1)" in text
    assert f"SLURM job {j} is already requeued (pending)" in main  # its own requeue found it done
    assert "[ERROR]" not in main, main[-3000:]
    assert all(r["status"] == "completed" for r in before.values()), before  # the trial in flight finished
    assert 0 < len([r for r in before.values() if not r["origin"].startswith("baseline:")]) < trials
    assert_whole_after_requeue(out, trials, before)


# ----------------------------------------------------------------------------- a sweep through submitit

def test_submitit_sweep_submits_one_job_per_point_and_writes_the_summary(slurm_cluster, tiny_run, tmp_path):
    c = slurm_cluster
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "lightning_merge", "-m", "hydra/launcher=slurm", "search.alpha=0,0.5",
           *[o for o in overrides(tiny_run, tmp_path / "unused") if not o.startswith("output_dir=")],
           f"hydra.sweep.dir={sweep}", "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=60"]
    proc = subprocess.Popen(cmd, env=job_env(c), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    folder = sweep / ".submitit"  # submitit's: <array>_<task>/ per point, with the task's log and result
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError("the sweep did not finish in 420 s\n" + stderr[-3000:] + c.describe(None))
    finally:
        tasks = sorted(p.name for p in folder.iterdir() if p.is_dir() and "_" in p.name) if folder.is_dir() else []
        if proc.returncode != 0:
            c.cancel(*tasks)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:] + c.describe(None)
    # One SLURM job (a task of one array) per point, run to the end. (The launcher returns once each task's
    # result is written; the task's job may still be finishing.)
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks
    for t in tasks:
        c.wait_done(t, 60, folder / t / f"{t}_0_log.out", folder / t / f"{t}_0_log.err")
        assert f"JobEnvironment(job_id={t}," in read(folder / t / f"{t}_0_log.out")  # submitit's SLURM env
    summary = json.loads((sweep / "summary.json").read_text())
    rows = summary["runs"]
    assert sorted(r["params"]["search.alpha"] for r in rows) == [0, 0.5] and not summary["skipped"], summary
    for r in rows:  # each row is its point's own results
        res = json.loads((Path(r["path"]) / "results.json").read_text())
        assert r["best_heldout_loss"] == res["best"]["heldout_loss"] and r["trials"] == res["trials"] == TRIALS
        assert r["best_weights"] == res["best"]["weights"]
        assert Path(r["path"]).parent == sweep
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()


# ----------------------------------------------------------------------------- the watch job

def test_watch_job_beside_a_training_job(slurm_cluster, jobs, tmp_path):
    from test_watch import common

    from lightning_merge.config import DemoConf
    from lightning_merge.demo_live import prepare

    c = slurm_cluster
    conf = DemoConf(steps=48, num_checkpoints=4, max_train_bytes=200_000, vocab_size=300, seq_len=64,
                    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=2)
    data = prepare(conf, tmp_path / "cache")
    ckdir, out = tmp_path / "train" / "checkpoints", tmp_path / "watch"
    train = tmp_path / "train.sbatch"
    train.write_text("#!/bin/bash\n#SBATCH --job-name=train\n#SBATCH --output=%x-%j.out\n#SBATCH --time=10\n"
                     "set -euo pipefail\n"
                     f'exec "$PYTHON" -m lightning_merge.demo_live --data {data.root} --out {ckdir} '
                     f"--slow-save-s 6.0 --conf '{json.dumps(conf.__dict__)}'\n")
    # Training is submitted held, so the watch job's dependency is seen waiting; then training is released.
    t = c.sbatch(train, options=["--hold"], env=job_env(c), cwd=tmp_path)
    jobs.append(t)
    w = c.sbatch(WATCH, f"checkpoints.sources=[{ckdir}]", "checkpoints.last=2", "watch.poll_s=0.2",
                 "watch.max_poll_s=0.5", f"watch.until_step={conf.steps}", *common(data.heldout, out),
                 options=[*CPU, f"--dependency=after:{t}"], env=job_env(c), cwd=tmp_path)
    jobs.append(w)
    wlog, tlog = log_of(tmp_path, w, "lightning_merge_watch"), log_of(tmp_path, t, "train")
    rec = c.wait(w, lambda r: r if r.get("Reason") == "Dependency" else None, 30, "waiting on its dependency",
                 wlog, tlog)
    time.sleep(3)  # a scheduling pass or more (sched_interval=2): it still waits for the held training job
    rec = c.job(w)
    assert rec["JobState"] == "PENDING" and rec["Reason"] == "Dependency" and f"after:{t}" in rec["Dependency"], rec
    c.run("scontrol", "release", t)
    trec = c.wait_done(t, 300, tlog)
    wrec = c.wait_done(w, 300, wlog, tlog)
    assert wrec["StartTime"] >= trec["StartTime"]  # after: once training had started
    from test_watch import finished

    rounds = finished(out)
    saved = [(i + 1) * conf.steps // conf.num_checkpoints for i in range(conf.num_checkpoints)]
    assert sorted(p.name for p in ckdir.iterdir()) == sorted(f"step{s}" for s in saved)
    steps = [r["step"] for r in rounds]
    # Training saves a checkpoint every ~7 s (a 6 s pause mid-way through each weights file), so the watcher,
    # up ~15 s after the start, runs rounds for the checkpoints that land while it watches: at least two.
    assert len(rounds) >= 2 and all(r["status"] == "completed" for r in rounds), rounds
    assert steps == sorted(set(steps)) and steps[-1] == conf.steps and set(steps) <= set(saved[1:])
    for r in rounds:  # each round merged the two newest whole checkpoints up to its own
        i = saved.index(r["step"])
        assert [Path(s).name for s in r["sources"]] == [f"step{saved[i - 1]}", f"step{saved[i]}"]
        assert (out / "rounds" / r["round"] / "results.json").is_file()
    assert f"watch.sbatch: job {w} (restart 0): 1 node(s) x 1 " in read(wlog)
