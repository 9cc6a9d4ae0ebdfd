"""``mode=watch`` for real: a training job writes checkpoints while the service follows it, in subprocesses.

- A live trainer (the demo's own loop, ``demo_live.py``) writes checkpoints in place, pausing mid-way
  through each weights file; the watcher (the CLI) takes only whole checkpoints, one round each or the
  newest when it falls behind, and a round's figures equal a separate ``mode=search`` run on the same
  sources with the same warm start (the same trials, the same losses, exactly).
- Kills: SIGKILL mid-round, after the merge is published but before the round is recorded, and
  between rounds; the restarted service finishes with every round once and the same figures as a
  run that was never killed. Under DDP (2 gloo ranks) the rounds are the same too.
- A source deleted mid-round (a training job's keep-last-k cleanup): that round fails with the
  reason, the next one succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_merge.io import read_jsonl

pytestmark = pytest.mark.slow

STEPS = (100, 200, 300, 400, 500)


def env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def common(held: Path, out: Path) -> list[str]:
    return [f"data.heldout.path={held}", "data.heldout.block_size=32", "data.heldout.num_blocks=16",
            "data.search_blocks=8", "data.batch_size=4", "demo.enabled=false", "search.trials=3",
            "search.acquisition=ei", "report.progress=false", "report.plot_every_s=1000", f"output_dir={out}"]


def watch_cmd(src: Path, held: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_merge", "mode=watch", f"checkpoints.sources=[{src}]",
            "checkpoints.last=2", "watch.poll_s=0.2", "watch.max_poll_s=0.5", *common(held, out), *extra]


def latest(out: Path) -> dict[str, dict]:
    recs = {}
    for r in read_jsonl(out / "rounds.jsonl"):
        recs[r["round"]] = r
    return recs


def finished(out: Path) -> list[dict]:
    return [r for r in latest(out).values() if r["status"] != "running"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tokenizer) -> dict:
    """Five tiny checkpoints (step100..step500) in a staging folder, and held-out text."""
    from conftest import CORPUS, make_llama

    root = tmp_path_factory.mktemp("watch_pool")
    paths = [make_llama(root / "staging" / f"step{s}", seed=10 + i, tokenizer=tokenizer, layers=1)
             for i, s in enumerate(STEPS)]
    held = root / "heldout.jsonl"
    with open(held, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": CORPUS[i % 5] + f"# doc {i}\n"}) + "\n")
    return {"paths": paths, "heldout": held}


class Feeder(threading.Thread):
    """Plays a training job: the next checkpoint lands (copied, then renamed in: whole) once the round
    of the previous one has ended, so every checkpoint gets its own round. ``on_running(round, out)``
    is called once per round while it runs."""

    def __init__(self, pool: dict, watched: Path, out: Path, k: int = 2, on_running=None) -> None:
        super().__init__(daemon=True)
        self.pool, self.watched, self.out, self.k, self.on_running = pool, watched, out, k, on_running
        self.stop = threading.Event()
        self.fed = 0
        self.seen_running: set[str] = set()

    def put(self) -> None:
        src = self.pool["paths"][self.fed]
        tmp = self.watched / f".{src.name}.copying"
        shutil.copytree(src, tmp)
        os.replace(tmp, self.watched / src.name)
        self.fed += 1

    def run(self) -> None:
        self.watched.mkdir(parents=True, exist_ok=True)
        while self.fed < self.k:
            self.put()
        while not self.stop.is_set() and self.fed < len(self.pool["paths"]):
            recs = latest(self.out) if (self.out / "rounds.jsonl").exists() else {}
            for name, r in recs.items():
                if r["status"] == "running" and name not in self.seen_running and self.on_running:
                    self.seen_running.add(name)
                    self.on_running(name, self.out)
            done = sum(r["status"] != "running" for r in recs.values())
            if done >= self.fed - self.k + 1:
                self.put()
            time.sleep(0.1)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**kw), capture_output=True, text=True, timeout=900)


def _figures(r: dict) -> tuple:
    return (r["round"], r["step"], [Path(s).name for s in r["sources"]], r["status"], r.get("best_weights"),
            r.get("best_loss"), r.get("last_loss"), r.get("best_baseline_loss"), r.get("trials"))


def test_kills_lose_no_round_and_repeat_none(pool, tmp_path):
    four = {**pool, "paths": pool["paths"][:4]}  # three rounds: step-200, step-300, step-400
    ref_out, ref_dir = tmp_path / "ref", tmp_path / "ref_ckpts"
    feeder = Feeder(four, ref_dir, ref_out)
    feeder.start()
    res = _run(watch_cmd(ref_dir, pool["heldout"], ref_out, "watch.until_step=400"))
    feeder.stop.set()
    assert res.returncode == 0, res.stderr[-3000:]
    ref = finished(ref_out)
    assert [r["round"] for r in ref] == [f"step-{s}" for s in STEPS[1:4]]
    assert all(r["status"] == "completed" for r in ref)
    # Rounds after the first are warm-started from the previous best, shifted by one checkpoint.
    assert ref[1]["warm_start"][0] == ref[0]["best_weights"] and "previous best" in ref[1]["warm_origins"]

    out, watched = tmp_path / "killed", tmp_path / "ckpts"
    feeder = Feeder(four, watched, out)
    feeder.start()
    deaths = []
    # Mid-round (a trial recorded, not yet told to Ax), with the merge published but the round not yet
    # recorded, and between rounds (recorded, before the next look).
    for spec in ("completed:12", "round_published:1", "round_recorded:1"):
        res = _run(watch_cmd(watched, pool["heldout"], out, "watch.until_step=400"), LIGHTNING_MERGE_KILL_AT=spec)
        deaths.append((spec, res.returncode))
        assert res.returncode == -9, (spec, res.returncode, res.stderr[-3000:])
    res = _run(watch_cmd(watched, pool["heldout"], out, "watch.until_step=400"))
    feeder.stop.set()
    assert res.returncode == 0, res.stderr[-3000:]
    got = finished(out)
    assert [_figures(r) for r in got] == [_figures(r) for r in ref]
    lines = read_jsonl(out / "rounds.jsonl")
    for r in ref:  # each round ended exactly once, and its trials were each completed once
        assert sum(1 for x in lines if x["round"] == r["round"] and x["status"] == "completed") == 1
        trials = read_jsonl(out / "rounds" / r["round"] / "trials.jsonl")
        done = [t["trial"] for t in trials if t["status"] == "completed"]
        assert len(done) == len(set(done)), (r["round"], done)
    assert (out / "merged").resolve() == (out / "rounds" / "step-400" / "merged").resolve()
    assert (out / "rounds.png").is_file() and (out / "rounds.md").is_file()

    # Two gloo ranks (rank 0 decides and broadcasts each wait, round and stop): the same rounds, exactly.
    ddp_out, ddp_dir = tmp_path / "ddp", tmp_path / "ddp_ckpts"
    feeder = Feeder(four, ddp_dir, ddp_out)
    feeder.start()
    res = _run(watch_cmd(ddp_dir, pool["heldout"], ddp_out, "watch.until_step=400", "strategy=ddp",
                         "strategy.devices=2"))
    feeder.stop.set()
    assert res.returncode == 0, res.stderr[-3000:]
    assert [_figures(r) for r in finished(ddp_out)] == [_figures(r) for r in ref]


def test_source_deleted_mid_round_fails_that_round_only(pool, tmp_path):
    out, watched = tmp_path / "out", tmp_path / "ckpts"

    def delete_oldest(name: str, out_: Path) -> None:
        if name != "step-300":
            return
        trials = out_ / "rounds" / name / "trials.jsonl"
        t0 = time.time()
        while not trials.exists() and time.time() - t0 < 120:
            time.sleep(0.02)
        shutil.rmtree(watched / "step200")  # the round step-300 merges step200 and step300

    feeder = Feeder(pool, watched, out, on_running=delete_oldest)
    feeder.start()
    res = _run(watch_cmd(watched, pool["heldout"], out, "watch.until_step=400", "report.loggers=[csv]"))
    feeder.stop.set()
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = {r["round"]: r for r in finished(out)}
    # The trackers hold each completed round's figures (one tracker run for the service).
    import csv

    (metrics,) = (out / "trackers" / "csv").rglob("metrics.csv")
    logged = [float(r["round/best_loss"]) for r in csv.DictReader(metrics.open()) if r.get("round/best_loss")]
    assert logged == pytest.approx([rounds[n]["best_loss"] for n in ("step-200", "step-400")], rel=1e-12)
    assert rounds["step-200"]["status"] == "completed"
    assert rounds["step-300"]["status"] == "failed"
    assert "step200" in rounds["step-300"]["reason"] and "delet" in rounds["step-300"]["reason"]
    assert rounds["step-400"]["status"] == "completed"
    assert [Path(s).name for s in rounds["step-400"]["sources"]] == ["step300", "step400"]
    # merged/ is the newest completed round's
    assert (out / "merged").resolve() == (out / "rounds" / "step-400" / "merged").resolve()


def test_live_trainer_whole_checkpoints_and_rounds_equal_search(tmp_path):
    """The demo's training loop in a subprocess writes checkpoints in place while the watcher follows it."""
    from lightning_merge.config import DemoConf
    from lightning_merge.demo_live import prepare, start

    conf = DemoConf(steps=48, num_checkpoints=4, max_train_bytes=200_000, vocab_size=300, seq_len=64,
                    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=2)
    data = prepare(conf, tmp_path / "cache")
    ckdir, out = tmp_path / "run" / "checkpoints", tmp_path / "watch"
    trainer = start(conf, data, ckdir, slow_save_s=1.0, log_file=tmp_path / "train.log")
    try:
        res = _run(watch_cmd(ckdir, data.heldout, out, f"watch.until_step={conf.steps}"))
    finally:
        trainer.wait(timeout=600)
    assert trainer.returncode == 0, (tmp_path / "train.log").read_text()[-2000:]
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    # It looked while a weights file was half written, and waited for it.
    assert "is being written; waiting for it to complete" in log
    rounds = finished(out)
    steps = [r["step"] for r in rounds]
    saved = [(i + 1) * conf.steps // conf.num_checkpoints for i in range(conf.num_checkpoints)]
    assert all(r["status"] == "completed" for r in rounds)
    assert steps == sorted(set(steps)) and steps[-1] == conf.steps and set(steps) <= set(saved[1:])
    if len(steps) < len(saved) - 1:  # it fell behind: then it took the newest, and said so
        assert "taking the newest" in log
    for r in rounds:  # each round merged the two newest whole checkpoints up to its own
        i = saved.index(r["step"])
        assert [Path(s).name for s in r["sources"]] == [f"step{saved[i - 1]}", f"step{saved[i]}"]

    # A separate mode=search on the last round's sources, with its warm start: the same trials and losses.
    last = rounds[-1]
    sep = tmp_path / "search"
    warm = ",".join("[" + ",".join(repr(w) for w in ws) + "]" for ws in last["warm_start"])
    res = _run([sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{','.join(last['sources'])}]",
                "checkpoints.last=2", f"search.warm_start=[{warm}]" if warm else "search.warm_start=null",
                *common(data.heldout, sep)])
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads((out / "rounds" / last["round"] / "results.json").read_text())
    b = json.loads((sep / "results.json").read_text())
    assert [(c["name"], c["heldout_loss"], c["weights"]) for c in a["candidates"]] == \
        [(c["name"], c["heldout_loss"], c["weights"]) for c in b["candidates"]]
    assert a["best"]["heldout_loss"] == b["best"]["heldout_loss"] == last["best_loss"]
    ta = [(t["weights"], t.get("objective")) for t in read_jsonl(out / "rounds" / last["round"] / "trials.jsonl")
          if t["status"] == "completed"]
    tb = [(t["weights"], t.get("objective")) for t in read_jsonl(sep / "trials.jsonl") if t["status"] == "completed"]
    assert ta == tb
