"""A ledger two runs wrote at once is refused on resume, naming the trial and lines; every real history is kept.

The mixed ledgers are made for real: two ``SearchLoop`` runs (real Ax, real
ledger writes) started on one empty run folder and run at the same time, and
(slow) two CLI processes on one ``output_dir`` with the run-folder lock turned
off (``LIGHTNING_MERGE_NO_LOCK=1``, as on a filesystem without locks). With the
lock (runlock.py), the second CLI process is refused at once; this check stays
as the defence in depth. The precise cases are hand-written, each beside the
legitimate history it differs from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from lightning_merge.config import BaselinesConf, ConfigError, RunConfig, SearchConf
from lightning_merge.ledger import OBJECTIVE, Ledger
from lightning_merge.loop import SearchLoop
from lightning_merge.search import DIED, AxSearch
from lightning_merge.spaces import PairwiseSpace

from conftest import OneProcess


def line(trial, status, lam=0.5, origin="ei", **extra):
    rec = {"trial": trial, "status": status, "weights": [1 - lam, lam], "params": {"lam": lam}, "origin": origin}
    if status == "completed":
        rec[OBJECTIVE] = 3.6 + (lam - 0.58) ** 2
    return {**rec, **extra}


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_every_history_one_run_writes_is_accepted(tmp_path):
    recs = [line(0, "running", 0.3, "init"), line(0, "completed", 0.3, "init"),
            line(1, "running", 1.0, "init"), line(1, "failed", 1.0, "init", reason="non-finite objective nan"),
            line(2, "running", 0.6), line(2, "failed", 0.6, reason=DIED),  # died, marked failed on resume
            line(3, "running", 0.6), line(3, "completed", 0.6),  # its point evaluated again as a new trial
            line(4, "completed", 0.5),  # a result line alone (a hand-made ledger)
            line(5, "running", 0.7)]  # running when the process died: the resume marks it failed
    led = Ledger.open(write(tmp_path / "trials.jsonl", recs))
    assert {i: r["status"] for i, r in led.records.items()} == {0: "completed", 1: "failed", 2: "failed",
                                                               3: "completed", 4: "completed", 5: "running"}
    # A torn last line (a kill mid-write) is still skipped, and blank lines are not records.
    with open(tmp_path / "trials.jsonl", "a") as fh:
        fh.write("\n" + json.dumps(line(5, "failed", 0.7, reason=DIED))[:30])
    assert Ledger.open(tmp_path / "trials.jsonl").records[5]["status"] == "running"


@pytest.mark.parametrize("recs,match", [
    # two `completed` lines for one index (two runs with the same seed: every trial twice)
    ([line(0, "running"), line(0, "completed"), line(1, "running"), line(0, "completed")],
     r"trial 0 has two different records: two results, `completed` on line 2 and `completed` on line 4"),
    # a result, then a result of the other kind
    ([line(0, "running"), line(0, "failed", reason="x"), line(0, "completed")],
     r"trial 0 .*two results, `failed` on line 2 and `completed` on line 3"),
    # a `running` line after a `completed` one
    ([line(0, "running"), line(0, "completed"), line(0, "running")],
     r"trial 0 .*line 3 starts it again \(`running`\) after `completed` on line 2"),
    # two `running` lines (both runs started trial 0)
    ([line(0, "running"), line(0, "running")], r"trial 0 .*line 2 starts it again \(`running`\) after `running`"),
    # the same index, other weights (two runs with other seeds)
    ([line(0, "running", 0.3, "init"), line(0, "completed", 0.3, "init"), line(1, "running", 0.61),
      line(1, "running", 0.72), line(1, "completed", 0.61)],
     r"trial 1 .*`weights` is \[0.39, 0.61\] on line 3 but \[0.28, 0.72\] on line 4"),
    # the same point under another origin
    ([line(3, "running", 0.5, "ei"), line(3, "completed", 0.5, "baseline:uniform")],
     r"trial 3 .*`origin` is \"ei\" on line 1 but \"baseline:uniform\" on line 2"),
])
def test_two_records_for_one_trial_are_refused_naming_trial_lines_and_what_to_do(tmp_path, recs, match):
    path = write(tmp_path / "trials.jsonl", recs)
    with pytest.raises(ConfigError, match=match) as e:
        Ledger.open(path)
    msg = str(e.value)
    assert str(path) in msg and "two processes most likely wrote this run folder" in msg
    assert "search.restart=true" in msg and "output_dir=" in msg


def test_a_corrupt_line_mid_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    torn = '{"trial": 0, "sta'  # a line cut short, then another appended after it
    path.write_text(json.dumps(line(0, "running")) + "\n" + torn + "\n" + json.dumps(line(0, "completed")) + "\n")
    with pytest.raises(ConfigError, match=r"trials.jsonl: line 2 is not valid JSON.*search.restart=true"):
        Ledger.open(path)


def _loop(out, seed):
    conf = SearchConf(name="paper", acquisition="gp_hedge", trials=5, seed=seed)
    cfg = RunConfig(search=conf, baselines=BaselinesConf(enabled=False))
    space = PairwiseSpace(conf.alpha)

    def objective(w):
        v = 3.6 + (w[1] - 0.58) ** 2
        return v, {"heldout_loss": v}

    return SearchLoop(cfg, OneProcess(), objective, lambda w: {}, out, space, search=AxSearch(conf, space),
                      ledger=Ledger.open(out / "trials.jsonl"))


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)])
def test_two_search_runs_on_one_folder_make_a_ledger_resume_refuses(tmp_path, seeds):
    # Both runs open the (empty) run folder, then search at the same time, as two processes would.
    loops = [_loop(tmp_path, s) for s in seeds]
    threads = [threading.Thread(target=lp.run) for lp in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lp in loops:
        lp.search.close()
        assert len(lp.ledger.search_trials()) == 5  # each run, alone, thinks it is fine
    lines = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 20  # every trial twice
    if seeds[0] != seeds[1]:  # GP-Hedge draws its acquisition by seed: the same trial numbers, other weights
        assert any(len({tuple(r["weights"]) for r in lines if r["trial"] == i}) == 2 for i in range(5))
    with pytest.raises(ConfigError, match=r"trial 0 has two different records: .*line \d+.*line \d+; "
                                          r"5 trials in all \(0, 1, 2, 3, 4\).*"
                                          r"two processes most likely wrote this run folder.*search.restart=true"):
        Ledger.open(tmp_path / "trials.jsonl")


def _cli(tiny_run, out, *extra):
    return [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]",
            "checkpoints.last=2", f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32",
            "data.heldout.num_blocks=8", "data.search_blocks=4", "data.batch_size=4", "demo.enabled=false",
            "search.trials=4", "report.progress=false", "merge.write=false", f"output_dir={out}", *extra]


def _cli_env(**extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "LIGHTNING_MERGE_NO_LOCK"}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
def test_two_cli_runs_on_one_output_dir_and_the_second_is_refused_by_the_lock(tiny_run, tmp_path):
    """Two real processes started at once on one output_dir (other seeds): one runs, the other is refused."""
    out = tmp_path / "run"
    procs = [subprocess.Popen(_cli(tiny_run, out, f"seed={s}", f"search.seed={s}"), env=_cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [e[-2000:] for e in errs]
    winner, loser = procs[codes.index(0)], errs[codes.index(2)]
    assert f"lightning_merge: error: output_dir {out} is in use by another run: pid {winner.pid}" in loser, loser
    led = Ledger.open(out / "trials.jsonl")  # one writer: a ledger that resumes, each trial once
    assert len(led.search_trials()) == 4 and all(r["status"] != "running" for r in led.records.values())
    again = subprocess.run(_cli(tiny_run, out), env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
def test_two_cli_runs_without_the_lock_and_the_resume_is_refused(tiny_run, tmp_path):
    """With the lock turned off (a filesystem without locks), two real processes on one output_dir both run;
    the ledger check refuses the third run's resume.

    Both pass their resume check, then wait for each other before their first write (the loop's test barrier):
    a run of 4 trials on 4 tiny blocks takes about a second, so two processes merely started together may not
    overlap at all (one finished before the other began, on a loaded CI machine; the second then just resumed it)."""
    out = tmp_path / "run"
    env = _cli_env(LIGHTNING_MERGE_NO_LOCK="1", LIGHTNING_MERGE_BARRIER=f"baselines:{tmp_path / 'barrier'}:2")
    procs = [subprocess.Popen(_cli(tiny_run, out, f"seed={s}", f"search.seed={s}"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]  # without the lock nothing stops the second writer
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # both reached the loop and waited for each other
    env.pop("LIGHTNING_MERGE_BARRIER")
    again = subprocess.run(_cli(tiny_run, out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "trials.jsonl: trial" in again.stderr and "has two different records" in again.stderr
    assert "two processes most likely wrote this run folder" in again.stderr
    fresh = subprocess.run(_cli(tiny_run, out, "search.restart=true"), env=env, capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (out / "previous" / "0" / "trials.jsonl").exists()


def test_append_after_a_torn_line_cuts_it_off(tmp_path):
    """A kill mid-write leaves an unterminated line; the next append must not join onto it."""
    from lightning_merge.io import append_jsonl, read_jsonl

    path = tmp_path / "trials.jsonl"
    append_jsonl(path, {"trial": 0, "status": "completed"})
    with open(path, "a") as fh:
        fh.write('{"trial": 1, "status": "runn')  # torn
    assert read_jsonl(path) == [{"trial": 0, "status": "completed"}]
    append_jsonl(path, {"trial": 1, "status": "running"})
    assert read_jsonl(path) == [{"trial": 0, "status": "completed"}, {"trial": 1, "status": "running"}]
    one = tmp_path / "one.jsonl"
    one.write_text('{"torn": ')  # the whole file is one torn line
    append_jsonl(one, {"a": 1})
    assert one.read_text() == '{"a": 1}\n'
