"""Faults survived (issue 14): each is injected for real, then the same command is run again.

- a DDP rank SIGKILLed mid-trial (2 gloo ranks): the job ends at once naming the rank, not after
  ``strategy.timeout_s``; the re-run resumes with nothing lost;
- SIGTERM twice: the second ends the process at once; the state on disk resumes whole;
- a torn last line in ``trials.jsonl``: the resume says what it dropped and re-runs that trial;
- a full disk (a real tmpfs, as root) while the merged model or the Ax snapshot is written: a clear
  error naming the path and the bytes needed, nothing partial where a reader would take it, the
  ledger intact; the re-run completes once space is freed;
- a source checkpoint damaged mid-run: the merged model's write (its second read) fails naming the
  file, nothing is published, and the run completes once the file is restored; a read failing on
  one rank of two makes both stop with the file named (no hang); a failed read inside a trial
  fails that trial and ends the search.

"Nothing lost" is checked the same way as the kill test (tests/resume_checks.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resume_checks import assert_resumed_whole, last_status, ledger_lines

TRIALS = 4


def command(tiny_run, out: Path, *extra: str, trials: int = TRIALS, sources: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{sources or tiny_run['ckdir']}]",
            "checkpoints.last=3", f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32",
            "data.heldout.num_blocks=16", "data.search_blocks=8", "data.batch_size=4", "demo.enabled=false",
            f"search.trials={trials}", "search.acquisition=ei", "report.progress=false", "merge.write=false",
            f"output_dir={out}", *extra]


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(base, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def wait_for_search_trial(proc: subprocess.Popen, out: Path, timeout_s: float = 300) -> dict | None:
    """The first ``running`` line of a search trial (not a baseline), polled while ``proc`` runs."""
    end = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < end:
        lines = ledger_lines(out)
        running = [r for r in lines if r["status"] == "running" and not r["origin"].startswith("baseline:")]
        if running:
            return running[-1]
        time.sleep(0.005)
    return None


def rerun(cmd: list[str], fault: str, detect_s: float | None = None) -> subprocess.CompletedProcess:
    """The same command again, timed; prints the figures docs/reliability.md records (``pytest -s``)."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    detect = f"stopped {detect_s:.2f} s after the fault, " if detect_s is not None else ""
    print(f"\nRECOVERY {fault}: {detect}re-run to the end {took:.1f} s (exit {proc.returncode})")
    return proc


def _children(pid: int) -> list:
    import psutil

    return [c for c in psutil.Process(pid).children(recursive=True) if "python" in c.name()]


# ----------------------------------------------------------------------------- a lost rank

@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_at_once_naming_it_and_the_rerun_resumes(tiny_run, tmp_path):
    out = tmp_path / "run"
    timeout_s = 300
    cmd = command(tiny_run, out, "strategy=ddp", "strategy.devices=2", f"strategy.timeout_s={timeout_s}")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for_search_trial(proc, out) is not None, proc.communicate()[0][-3000:]
    rank1 = [c for c in _children(proc.pid) if any("train_ddp_process_1" in a for a in c.cmdline())]
    assert len(rank1) == 1
    victim = rank1[0].pid
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    log, _ = proc.communicate(timeout=timeout_s)
    ended_s = time.monotonic() - killed
    before = last_status(ledger_lines(out))
    # Ends in seconds, not after the collective timeout, and says which rank died and how.
    assert ended_s < 30, (ended_s, log[-3000:])
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in log, log[-3000:]
    # Exit 4 (RankLostError), unless Lightning's own child watcher SIGKILLed rank 0 first (it polls
    # every 5 s); the message above is logged within 0.1 s either way.
    assert proc.returncode in (4, -signal.SIGKILL), (proc.returncode, log[-3000:])
    assert not [r for r in before.values() if r["status"] == "failed"]  # not mistaken for a failed trial
    assert any(r["status"] == "running" for r in before.values())

    again = rerun(cmd, "rank killed", ended_s)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_whole(out, TRIALS, before)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_zero_ends_the_other_rank_naming_it(tiny_run, tmp_path):
    """The launcher itself (rank 0) dies: rank 1, left inside a collective, exits at once saying rank 0 is gone."""
    import psutil

    out = tmp_path / "run"
    cmd = command(tiny_run, out, "strategy=ddp", "strategy.devices=2", "strategy.timeout_s=300")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for_search_trial(proc, out) is not None, proc.communicate()[0][-3000:]
    rank1 = [c for c in _children(proc.pid) if any("train_ddp_process_1" in a for a in c.cmdline())]
    assert len(rank1) == 1
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    log, _ = proc.communicate(timeout=300)  # the pipe closes when rank 1, which shares it, exits too
    gone, alive = psutil.wait_procs(rank1, timeout=60)
    ended_s = time.monotonic() - killed
    assert not alive and ended_s < 30, (ended_s, log[-3000:])
    assert f"rank 0 (pid {proc.pid} on " in log and ") is gone" in log, log[-3000:]
    before = last_status(ledger_lines(out))
    again = rerun(cmd, "rank 0 killed", ended_s)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_whole(out, TRIALS, before)


# ----------------------------------------------------------------------------- SIGTERM twice

@pytest.mark.slow
def test_sigterm_twice_exits_at_once_and_the_state_resumes_whole(tiny_run, tmp_path):
    out = tmp_path / "run"
    cmd = command(tiny_run, out, trials=6)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_search_trial(proc, out) is not None
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    second = time.monotonic()
    _, err = proc.communicate(timeout=60)
    ended_s = time.monotonic() - second
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-3000:])
    assert ended_s < 5, ended_s
    assert "SIGTERM received: the trial in flight finishes" in err
    # The state on disk is whole: the ledger opens, the snapshot parses.
    from lightning_merge.ledger import Ledger

    before = Ledger.open(out / "trials.jsonl").records
    if (out / "ax_snapshot.json").exists():
        json.loads((out / "ax_snapshot.json").read_text())
    again = rerun(cmd, "SIGTERM twice", ended_s)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_whole(out, 6, before, expect_failed=False)


# ----------------------------------------------------------------------------- a torn ledger line

@pytest.mark.slow
def test_a_torn_last_line_is_dropped_said_and_its_trial_re_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    cmd = command(tiny_run, out, trials=3)
    first = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    path = out / "trials.jsonl"
    text = path.read_text()
    last = json.loads(text.splitlines()[-1])
    assert last["status"] == "completed"
    # A crash in the middle of writing the last line: only its first 40 bytes reached the disk.
    body = text[: text.rstrip("\n").rfind("\n") + 1]
    path.write_text(body + text.splitlines()[-1][:40])
    before = last_status(ledger_lines(out))
    assert before[last["trial"]]["status"] == "running"

    again = rerun(cmd, "torn ledger line")
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr  # Hydra's log goes to stdout
    assert "the last line is torn" in said and "dropped: 40 bytes" in said, said[-3000:]
    assert f"trial {last['trial']} is left `running`, so it is marked failed" in said
    recs = assert_resumed_whole(out, 3, before)
    assert recs[last["trial"]]["status"] == "failed"
    redo = [r for r in recs.values() if r["trial"] > last["trial"] and r["weights"] == last["weights"]]
    assert redo and redo[0]["objective"] == pytest.approx(last["objective"], rel=1e-12)  # deterministic


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 1 MiB (root only); yields (mount point, resize(bytes))."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_for_the_merged_model_is_named_nothing_partial_and_the_rerun_completes(tiny_run, tmp_path,
                                                                                           small_disk):
    mnt, resize = small_disk
    out = tmp_path / "run"
    target = mnt / "merged"
    cmd = command(tiny_run, out, "merge.write=true", f"merge.out={target}", trials=3)
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert f"no space left on the device of {target} while writing the merged model" in proc.stderr
    assert "bytes free" in proc.stderr and "it needs" in proc.stderr
    assert os.listdir(mnt) == []  # no partial folder where a reader would take it
    recs = last_status(ledger_lines(out))
    assert len([r for r in recs.values() if r["status"] == "completed"
                and not r["origin"].startswith("baseline:")]) == 3  # the search itself was finished
    assert not (out / "results.json").exists()

    resize(64 << 20)  # space freed
    again = rerun(cmd, "full disk (merged model)")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_whole(out, 3, recs, expect_failed=False)
    assert {r["trial"] for r in last_status(ledger_lines(out)).values()} == set(recs)  # no trial re-run
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    assert all(torch_isfinite(p) for p in model.parameters())


def torch_isfinite(p) -> bool:
    import torch

    return bool(torch.isfinite(p).all())


def test_a_full_disk_mid_write_leaves_the_earlier_merged_model_and_no_partial(tiny_run, small_disk, monkeypatch):
    """The write's own ENOSPC (the disk filled after the free-space check passed): the real tmpfs fills up."""
    from lightning_merge import writer as merge
    from lightning_merge.errors import DiskFullError
    from lightning_merge.series import CheckpointSeries

    mnt, _ = small_disk
    series = CheckpointSeries.from_paths(tiny_run["paths"][:2])
    (mnt / "merged").mkdir()
    (mnt / "merged" / "model.safetensors").write_bytes(b"the earlier merge")
    (mnt / "filler").write_bytes(b"\0" * (1024 * 1024 - 96 * 1024))  # leaves less than one model
    real = shutil.disk_usage
    monkeypatch.setattr(merge.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1 << 40))  # the check passes; the disk does not
    with pytest.raises(DiskFullError) as e:
        merge.write_merged(series, [0.5, 0.5], mnt / "merged")
    assert f"no space left on the device of {mnt / 'merged'}" in str(e.value)
    assert e.value.errno == 28
    assert sorted(os.listdir(mnt)) == ["filler", "merged"]  # the temp folder is gone
    assert (mnt / "merged" / "model.safetensors").read_bytes() == b"the earlier merge"


def test_a_full_disk_for_the_snapshot_or_a_ledger_line_keeps_the_old_file_whole(small_disk):
    from ax import Client, RangeParameterConfig

    from lightning_merge.errors import DiskFullError
    from lightning_merge.io import append_jsonl
    from lightning_merge.search import _save_client

    mnt, _ = small_disk
    client = Client()
    client.configure_experiment(parameters=[RangeParameterConfig(name="lam", parameter_type="float",
                                                                 bounds=(0.0, 1.0))])
    client.configure_optimization(objective="-loss")
    _save_client(client, mnt / "ax_snapshot.json")
    old = (mnt / "ax_snapshot.json").read_bytes()
    append_jsonl(mnt / "trials.jsonl", {"trial": 0, "status": "running"})
    ledger = (mnt / "trials.jsonl").read_bytes()
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * (free - 4096))
    for _ in range(3):  # a few trials' worth of Ax state: the snapshot no longer fits
        client.attach_trial({"lam": 0.5})
    with pytest.raises(DiskFullError, match="no space left on the device of .*ax_snapshot.json while writing the "
                                            "Ax snapshot"):
        _save_client(client, mnt / "ax_snapshot.json")
    assert (mnt / "ax_snapshot.json").read_bytes() == old
    with pytest.raises(DiskFullError, match="a line of trials.jsonl"):
        append_jsonl(mnt / "trials.jsonl", {"trial": 1, "status": "running", "pad": "x" * 8192})
    assert (mnt / "trials.jsonl").read_bytes() == ledger  # no half line
    assert sorted(os.listdir(mnt)) == ["ax_snapshot.json", "filler", "trials.jsonl"]  # no temp file


# ----------------------------------------------------------------------------- a source damaged mid-run

@pytest.mark.slow
def test_a_source_damaged_mid_run_fails_the_write_naming_it_and_the_restored_run_completes(tiny_run, tmp_path):
    src = tmp_path / "checkpoints"
    shutil.copytree(tiny_run["ckdir"], src)
    victim = src / "step1100" / "model.safetensors"
    good = victim.read_bytes()
    out = tmp_path / "run"
    cmd = command(tiny_run, out, "merge.write=true", trials=4, sources=src)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_search_trial(proc, out) is not None
    os.truncate(victim, len(good) // 2)  # the sources are resident by now: the trials go on, the write reads again
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    assert f"{victim}: truncated while reading tensor" in err, err[-3000:]
    assert not (out / "merged").exists() and not [p for p in os.listdir(out) if p.endswith(".partial")]
    recs = last_status(ledger_lines(out))
    assert len([r for r in recs.values() if r["status"] == "completed"
                and not r["origin"].startswith("baseline:")]) == 4

    victim.write_bytes(good)
    again = rerun(cmd, "source damaged mid-run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_whole(out, 4, recs, expect_failed=False)
    assert (out / "merged" / "model.safetensors").is_file()


def test_a_read_failure_inside_a_trial_fails_it_and_ends_the_search(tmp_path):
    from lightning_merge.config import BaselinesConf, RunConfig, SearchConf
    from lightning_merge.errors import SourceReadError
    from lightning_merge.ledger import Ledger
    from lightning_merge.loop import SearchLoop
    from lightning_merge.search import AxSearch
    from lightning_merge.spaces import PairwiseSpace

    from conftest import OneProcess

    conf = SearchConf(name="paper", acquisition="ei", trials=6)
    space = PairwiseSpace(conf.alpha)
    calls = []

    def objective(w):
        calls.append(tuple(w))
        if len(calls) == 3:
            raise SourceReadError("/ckpt/step2/model.safetensors: truncated while reading tensor 'lm_head.weight'")
        return 3.6 + (w[1] - 0.58) ** 2, {}

    loop = SearchLoop(RunConfig(search=conf, baselines=BaselinesConf(enabled=False)), OneProcess(), objective,
                      lambda w: {}, tmp_path, space, search=AxSearch(conf, space),
                      ledger=Ledger.open(tmp_path / "trials.jsonl"))
    with pytest.raises(SourceReadError, match="step2/model.safetensors"):
        loop.run()
    loop.search.close()
    assert len(calls) == 3  # no trial after the failed read
    recs = Ledger.open(tmp_path / "trials.jsonl").ordered()
    assert [r["status"] for r in recs] == ["completed", "completed", "failed"]
    assert "step2/model.safetensors: truncated" in recs[-1]["reason"]


VOTE_WORKER = r"""
import json, os, sys
import torch
from lightning_merge.config import StrategyConf
from lightning_merge.errors import SourceReadError
from lightning_merge.evaluate import Evaluator
from lightning_merge.model import build_model
from lightning_merge.series import CheckpointSeries
from lightning_merge.sharding import ShardMerger

torch.set_num_threads(1)
src, out = sys.argv[1], sys.argv[2]
series = CheckpointSeries.from_sources([os.path.join(src, "step900"), os.path.join(src, "step1000")])
rank = int(os.environ["RANK"])

def factory(model, prefix):
    if rank == 1:  # this rank's read fails, as a damaged slice would
        raise SourceReadError(f"{series.paths[1]}/model.safetensors: rank 1 could not read its slice")
    return ShardMerger(model, "whole", series, prefix=prefix)

ev = Evaluator(build_model(series.config_dir, torch.float32), StrategyConf(name="ddp", devices=2), batch_size=4,
               merger_factory=factory)
blocks = torch.randint(0, 200, (4, 16))
try:
    ev.connect(blocks, [0.5, 0.5])
    res = {"raised": None}
except Exception as e:
    res = {"raised": type(e).__name__, "message": str(e)}
json.dump(res, open(os.path.join(out, f"rank{rank}.json"), "w"))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_read_failing_on_one_rank_stops_both_naming_the_file(tiny_run, tmp_path):
    worker = tmp_path / "vote_worker.py"
    worker.write_text(VOTE_WORKER)
    t0 = time.monotonic()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(worker), str(tiny_run["ckdir"]), str(tmp_path)],
                          env=env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["raised"] for r in res] == ["SourceReadError", "SourceReadError"], (res, proc.stderr[-3000:])
    assert res[0]["message"] == res[1]["message"]
    assert "step1000/model.safetensors: rank 1 could not read its slice" in res[0]["message"]
    assert took < 120, took  # no rank waited out a collective timeout


def test_leftovers_of_interrupted_writes_are_swept_and_nothing_else(tmp_path):
    from lightning_merge.io import sweep_leftovers

    keep = [".lightning_merge.lock", ".lightning_merge.holder.json", "trials.jsonl", "merged/model.safetensors",
            ".hydra/config.yaml", "training_run/checkpoints/.step8.partial/x", "rounds/step-8/report.md"]
    junk = [".trials.jsonl.a1b2.tmp", ".ax_snapshot.json.zz.tmp", ".merged.k3.partial/model.safetensors",
            ".merged.old-4242/config.json", "rounds/step-8/.results.json.q.tmp"]
    for rel in keep + junk:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    gone = sweep_leftovers(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in gone) == sorted(
        [".trials.jsonl.a1b2.tmp", ".ax_snapshot.json.zz.tmp", ".merged.k3.partial", ".merged.old-4242",
         "rounds/step-8/.results.json.q.tmp"])
    assert all((tmp_path / rel).exists() for rel in keep)
    assert not any((tmp_path / rel).exists() for rel in junk)
