"""Never lose work: a real search process is SIGKILLed mid-trial at several moments, then re-run.

The process is the CLI. It dies at exact moments through the
``LIGHTNING_MERGE_KILL_AT`` hook (see ``loop._fault_point``), and once from
outside, at whatever moment a ``kill -9`` from this test lands. After each
death the same command is run again; the last run finishes the budget. Then
the ledger must hold every trial once, the trial that was in flight must be
failed and re-run, nothing completed may be evaluated twice, and the Ax
snapshot must agree with the ledger.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from resume_checks import last_status, ledger_lines

pytestmark = pytest.mark.slow

TRIALS = 6


def command(tiny_run, out: Path, *extra: str, trials: int = TRIALS) -> list[str]:
    return [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]",
            "checkpoints.last=3", f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32",
            "data.heldout.num_blocks=16", "data.search_blocks=8", "data.batch_size=4", "demo.enabled=false",
            f"search.trials={trials}", "search.acquisition=ei", "report.progress=false", "merge.write=false",
            f"output_dir={out}", *extra]


def env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def test_sigkill_mid_trial_loses_nothing(tiny_run, tmp_path):
    out = tmp_path / "run"
    cmd = command(tiny_run, out)
    deaths = []
    # Die at exact moments: in the baselines, mid-evaluation of a search trial, with a result
    # computed but unrecorded, and recorded in the ledger but not yet in Ax.
    for spec in ("running:2", "evaluated:2", "completed:1", "running:1"):
        proc = subprocess.run(cmd, env=env(LIGHTNING_MERGE_KILL_AT=spec), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, proc.stderr[-2000:])
        deaths.append((spec, last_status(ledger_lines(out))))
    # And once from outside, as soon as the ledger shows a trial running after this run's start.
    start = len(ledger_lines(out))
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        lines = ledger_lines(out)
        if len(lines) > start and lines[-1]["status"] == "running":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)

    final = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

    lines = ledger_lines(out)
    recs = last_status(lines)
    completed = [r for r in recs.values() if r["status"] == "completed"]
    search = [r for r in completed if not r["origin"].startswith("baseline:")]
    assert len(search) == TRIALS  # the budget was finished
    # No trial completed twice, and no index left running.
    assert max(Counter(r["trial"] for r in lines if r["status"] == "completed").values()) == 1
    assert all(r["status"] in ("completed", "failed") for r in recs.values())
    # Every trial that died was failed with the reason, and its point was evaluated again later.
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert failed, "no kill landed mid-trial"
    for r in failed:
        assert "died" in r["reason"]
        assert any(c["trial"] > r["trial"] and c["params"] == r["params"] for c in completed), r
    # The ledger's trials at each death are still there, unchanged, at the end.
    for spec, before in deaths:
        for idx, rec in before.items():
            if rec["status"] == "completed":
                assert recs[idx]["objective"] == rec["objective"], (spec, idx)
    # Ax agrees with the ledger.
    from ax import Client

    df = Client.load_from_json_file(str(out / "ax_snapshot.json")).summarize()
    ax_status = {int(i): str(s) for i, s in zip(df["trial_index"], df["trial_status"])}
    assert ax_status == {i: r["status"].upper() for i, r in recs.items()}
    ax_values = {int(i): float(v) for i, v, s in zip(df["trial_index"], df["objective"], df["trial_status"])
                 if s == "COMPLETED"}
    assert ax_values == pytest.approx({r["trial"]: r["objective"] for r in completed})
    results = json.loads((out / "results.json").read_text())
    assert results["trials"] == TRIALS
    best = min(completed, key=lambda r: r["objective"])
    assert results["best"]["weights"] == best["weights"]


def test_a_changed_config_is_refused_on_resume(tiny_run, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(command(tiny_run, out, trials=2), env=env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(command(tiny_run, out, "search.alpha=0.5"), env=env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2
    assert "`search.space` changed" in again.stderr and "search.restart=true" in again.stderr
    fresh = subprocess.run(command(tiny_run, out, "search.alpha=0.5", "search.restart=true", trials=2),
                           env=env(), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (out / "previous" / "0" / "trials.jsonl").exists()


def test_sigusr2_saves_at_a_trial_boundary_requeues_and_resumes(tiny_run, tmp_path):
    """SLURM's warning signal mid-trial: the trial finishes, state is saved, `scontrol requeue` is called."""
    out = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    e = env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    cmd = command(tiny_run, out, trials=8)
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    sent_at = None
    while proc.poll() is None and time.time() - t0 < 300:
        lines = ledger_lines(out)
        search_running = [r for r in lines if r["status"] == "running" and not r["origin"].startswith("baseline:")]
        if search_running:
            proc.send_signal(signal.SIGUSR2)
            sent_at = len(lines)
            break
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=300)
    assert sent_at is not None
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted (SIGUSR2)" in stderr + stdout
    assert calls.read_text().split() == ["requeue", "4242"]
    recs = last_status(ledger_lines(out))
    # The trial in flight when the signal came was finished, not abandoned; no new one was started after it.
    assert all(r["status"] == "completed" for r in recs.values())
    done = [r for r in recs.values() if not r["origin"].startswith("baseline:")]
    assert 1 <= len(done) < 8
    assert not (out / "results.json").exists()  # the run is not over
    # The requeued job (same command, same folder) resumes and finishes the budget.
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    recs2 = last_status(ledger_lines(out))
    assert {i: r["objective"] for i, r in recs.items()} == {i: recs2[i]["objective"] for i in recs}
    assert len([r for r in recs2.values() if not r["origin"].startswith("baseline:")
                and r["status"] == "completed"]) == 8
    assert json.loads((out / "results.json").read_text())["trials"] == 8
