"""The watch service's report (rounds.png, rounds.md, the per-round line) and slurm/watch.sbatch.

The report is drawn from hand-built ``rounds.jsonl`` records (no model, no search);
the PNGs are real files read back with matplotlib. The sbatch script runs for real
under bash with a stand-in ``srun`` first on PATH that records its arguments.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lightning_merge import rounds_report as rr
from lightning_merge.rounds_report import latest_rounds, plot_rounds, round_line, rounds_markdown, write_rounds_report

EXAMPLE = {"round": "step-800", "step": 800, "status": "completed",
           "sources": ["/runs/exp1/ckpt/step500", "/runs/exp1/ckpt/step600", "/runs/exp1/ckpt/step700",
                       "/runs/exp1/ckpt/step800"],
           "best_weights": [0.1, 0.2, 0.3, 0.4], "best_loss": 2.9012, "last_loss": 2.9533,
           "best_baseline": "EMA", "best_baseline_loss": 2.9120, "gain_percent": 1.764,
           "gain_vs_baseline_percent": 0.371, "ood_loss": {"pydoc": 3.41}, "last_ood_loss": {"pydoc": 3.45},
           "trials": 10, "seconds": 41.3, "merged_dir": "/runs/watch/rounds/step-800/merged",
           "warm_start": [[0.1, 0.2, 0.3, 0.4]], "finished": "2026-12-02T18:03:11Z"}
FAILED = {"round": "step-900", "step": 900, "status": "failed", "sources": EXAMPLE["sources"][1:] + ["/x/step900"],
          "reason": "/runs/exp1/ckpt/step600 was deleted while the round read it (No such file)", "seconds": 3.2,
          "finished": "2026-12-02T18:05:00Z"}


def running(name: str, step) -> dict:
    return {"round": name, "step": step, "status": "running", "sources": ["a", "b", "c"], "warm_start": [[0, 0, 1]],
            "started": "2026-12-02T18:00:00Z"}


def completed(step: int, last: float, gain: float, base: str = "EMA", base_gain: float = 0.3) -> dict:
    """A completed round whose best merge is ``gain`` % below the last checkpoint (values by hand)."""
    best = last * (1 - gain / 100)
    base_loss = best / (1 - base_gain / 100)
    return {"round": f"step-{step}", "step": step, "status": "completed", "sources": ["a", "b", "c", "d"],
            "best_weights": [0.1, 0.2, 0.3, 0.4], "best_loss": best, "last_loss": last, "best_baseline": base,
            "best_baseline_loss": base_loss, "gain_percent": gain,
            "gain_vs_baseline_percent": 100 * (base_loss - best) / base_loss, "trials": 12, "seconds": 60.0}


def series(n: int, failed=(), step0: int = 1000, every: int = 1000) -> list[dict]:
    """``n`` rounds as rounds.jsonl holds them: a running line, then the outcome; ``failed`` by index."""
    out = []
    bases = ["EMA", "LAWA", "uniform", "WMA"]
    for i in range(n):
        step = step0 + every * i
        out.append(running(f"step-{step}", step))
        if i in failed:
            out.append({**FAILED, "round": f"step-{step}", "step": step})
        else:
            last = 2.2 + 1.4 * math.exp(-i / 10)
            out.append(completed(step, last, gain=1.5 * math.exp(-i / 20) - 0.2 * (i % 7 == 6),
                                 base=bases[i % 4], base_gain=0.2 + 0.1 * (i % 3)))
    return out


# ----------------------------------------------------------------------------- latest_rounds

def test_latest_rounds_takes_the_last_line_of_each_round_in_step_order():
    recs = [running("step-800", 800), running("step-200", 200), {**EXAMPLE},
            running("final", None), running("step-900", 900), running("best", None),
            {**EXAMPLE, "round": "step-200", "step": 200, "best_loss": 3.5}, FAILED,
            {**EXAMPLE, "round": "final", "step": None}]
    out = latest_rounds(recs)
    assert [r["round"] for r in out] == ["step-200", "step-800", "step-900", "final", "best"]
    assert [r["status"] for r in out] == ["completed", "completed", "failed", "completed", "running"]
    assert out[0]["best_loss"] == 3.5 and out[1] is recs[2]
    assert latest_rounds(out) == out  # idempotent on its own output
    assert latest_rounds([]) == []


def test_latest_rounds_refuses_a_record_without_a_round_name_or_with_a_bad_step():
    with pytest.raises(ValueError, match="line 2 has no 'round'"):
        latest_rounds([EXAMPLE, {"step": 3, "status": "running"}])
    with pytest.raises(ValueError, match="'step' must be an integer or null, got '800'"):
        latest_rounds([{**EXAMPLE, "step": "800"}])


# ----------------------------------------------------------------------------- round_line

def test_round_line_for_a_completed_round_matches_the_service_format():
    assert round_line(EXAMPLE) == ("round step-800: best 2.9012 (last 2.9533, EMA 2.9120) gain +1.76% | "
                                   "10 trials, 41s | weights 0.10 0.20 0.30 0.40")


def test_round_line_derives_a_missing_gain_and_omits_a_missing_baseline():
    rec = {k: v for k, v in EXAMPLE.items() if k not in ("gain_percent", "best_baseline", "best_baseline_loss")}
    rec.update(last_loss=3.0, best_loss=2.97, seconds=125, best_weights=[-0.05, 1.05])
    # 100 * (3.0 - 2.97) / 3.0 = 1.00 %
    assert round_line(rec) == "round step-800: best 2.9700 (last 3.0000) gain +1.00% | 10 trials, 2m05s | " \
                              "weights -0.05 1.05"


def test_round_line_uses_the_recorded_gain_only_without_the_losses():
    inconsistent = {**EXAMPLE, "gain_percent": 9.99}  # the losses win: 100 * (2.9533 - 2.9012) / 2.9533 = 1.764
    assert " gain +1.76% " in round_line(inconsistent)
    no_last = {**EXAMPLE, "last_loss": None, "gain_percent": 1.5}
    assert round_line(no_last).startswith("round step-800: best 2.9012 (last n/a, EMA 2.9120) gain +1.50% |")
    assert " gain n/a |" in round_line({**no_last, "gain_percent": None})


def test_round_line_for_failed_and_running_rounds():
    assert round_line(FAILED) == ("round step-900: FAILED after 3s: /runs/exp1/ckpt/step600 was deleted while "
                                  "the round read it (No such file)")
    assert round_line({**FAILED, "reason": "line one\n  line two", "seconds": 7300}) == \
        "round step-900: FAILED after 2h01m: line one line two"
    assert round_line(running("step-1000", 1000)) == \
        "round step-1000: running over 3 checkpoints (warm start from 1 point)"


# ----------------------------------------------------------------------------- rounds_markdown

def _rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def test_rounds_markdown_has_one_row_per_round_with_the_numbers():
    rec = completed(3000, last=3.0, gain=1.0, base="LAWA", base_gain=0.5)
    md = rounds_markdown(latest_rounds([running("step-4000", 4000), rec, FAILED, {**EXAMPLE, "step": 2000}]))
    header = md.splitlines()[0]
    for col in ("round", "step", "status", "best loss", "last loss", "best baseline", "gain vs last",
                "gain vs baseline", "trials", "seconds", "reason"):
        assert f" {col} |" in header
    rows = _rows(md)
    assert [r[0] for r in rows] == ["step-900", "step-800", "step-3000", "step-4000"]  # by step: 900, 2000, 3000, 4000
    # step-3000: best = 3.0 * 0.99 = 2.97; the baseline is 0.5 % worse than the best: 2.97 / 0.995 = 2.98492
    assert rows[2] == ["step-3000", "3000", "completed", "2.9700", "3.0000", "LAWA 2.9849", "+1.00%", "+0.50%",
                       "12", "60.0", ""]
    assert rows[1][:9] == ["step-800", "2000", "completed", "2.9012", "2.9533", "EMA 2.9120", "+1.76%", "+0.37%",
                           "10"]
    assert rows[0][2] == "failed" and rows[0][-1] == FAILED["reason"] and rows[0][-2] == "3.2"
    assert rows[3][2] == "running" and rows[3][3:] == ["", "", "", "", "", "", "", ""]


def test_rounds_markdown_keeps_a_reason_with_pipes_in_its_cell():
    md = rounds_markdown([{**FAILED, "reason": "a | b\nc"}])
    assert md.splitlines()[2].endswith("| a \\| b c |")


# ----------------------------------------------------------------------------- plot_rounds

def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path)


def _pixels_of(img: np.ndarray, colour: str, tol: float = 0.03) -> int:
    from matplotlib.colors import to_rgb

    return int((np.abs(img[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < tol).sum())


def test_plot_rounds_none_without_a_completed_round(tmp_path):
    assert plot_rounds(tmp_path, []) is None
    assert plot_rounds(tmp_path, [running("step-1", 1), FAILED]) is None
    assert not (tmp_path / "rounds.png").exists()


def test_plot_one_round(tmp_path):
    path = plot_rounds(tmp_path, [running("step-800", 800), EXAMPLE], experiment="exp1")
    assert path == tmp_path / "rounds.png"
    img = _png(path)
    assert img.shape[:2] == (840, 1200)  # 10 x 7 inches at the house 120 dpi
    assert float(np.std(img[..., :3])) > 0.01  # not blank
    assert _pixels_of(img, rr.GAIN_COLOUR) > 500  # the one gain bar
    assert _pixels_of(img, rr.FAILED_COLOUR) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.png"]  # no temp file left behind


def test_plot_forty_rounds_marks_the_failed_ones(tmp_path):
    recs = series(40, failed={4, 17, 31})
    with_failed = _png(plot_rounds(tmp_path / "a", recs, experiment="exp1"))
    assert with_failed.shape[:2] == (840, 1200) and float(np.std(with_failed[..., :3])) > 0.01
    one = _png(plot_rounds(tmp_path / "b", [r for r in recs if r["step"] not in (18000, 32000)]))
    # Each failed round is a cross on both panels' step axis (plus one in the legend): more failures, more
    # crosses; with none there is no cross at all (test_plot_one_round).
    assert _pixels_of(with_failed, rr.FAILED_COLOUR) > _pixels_of(one, rr.FAILED_COLOUR) > 0
    md = rounds_markdown(latest_rounds(recs))
    assert [r[0] for r in _rows(md) if r[2] == "failed"] == ["step-5000", "step-18000", "step-32000"]


def test_plot_rounds_without_steps_uses_file_order(tmp_path):
    recs = [{**EXAMPLE, "round": name, "step": None, "best_loss": 2.9 - 0.01 * i}
            for i, name in enumerate(["final", "best", "latest"])]
    img = _png(plot_rounds(tmp_path, recs))
    assert float(np.std(img[..., :3])) > 0.01


def test_plot_rounds_draws_a_round_with_missing_baseline_and_gains(tmp_path):
    rec = {k: v for k, v in EXAMPLE.items()
           if k not in ("best_baseline", "best_baseline_loss", "gain_percent", "gain_vs_baseline_percent")}
    assert plot_rounds(tmp_path, [rec, {**rec, "round": "step-900", "step": 900, "last_loss": None}]).is_file()


# ----------------------------------------------------------------------------- write_rounds_report

def test_write_rounds_report_publishes_the_plot_and_the_table(tmp_path):
    recs = series(6, failed={2})
    paths = write_rounds_report(tmp_path, recs, experiment="exp1")
    assert paths == [tmp_path / "rounds.png", tmp_path / "rounds.md"]
    md = (tmp_path / "rounds.md").read_text()
    assert md.startswith("# lightning_merge watch: exp1\n")
    assert "6 rounds: 5 completed, 1 failed." in md and "![rounds](rounds.png)" in md
    assert "Latest completed: step-6000: best " in md
    assert len(_rows(md)) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["rounds.md", "rounds.png"]


def test_write_rounds_report_with_only_running_rounds_writes_the_table_alone(tmp_path):
    paths = write_rounds_report(tmp_path, [running("step-100", 100)])
    assert paths == [tmp_path / "rounds.md"]
    md = paths[0].read_text()
    assert md.startswith("# lightning_merge watch\n") and "1 round: 1 running." in md and "rounds.png" not in md


# ----------------------------------------------------------------------------- slurm/watch.sbatch

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "watch.sbatch"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")
USAGE = ["checkpoints.sources=[/runs/exp1/checkpoint]", "checkpoints.last=4", "watch.until_step=100000"]


def _directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key.strip()] = value.strip()
    return out


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, srun_body: str | None = None):
    """Run watch.sbatch with a stand-in srun; by default it writes one argument per line to srun.args."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    record = tmp_path / "srun.args"
    srun = bindir / "srun"
    srun.write_text("#!/bin/sh\n" + (srun_body or f'for a in "$@"; do printf "%s\\n" "$a"; done > "{record}"\n'))
    srun.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WATCH_"))}
    base.pop("COLLECTIVE_TIMEOUT_S", None)
    base["PATH"] = f"{bindir}{os.pathsep}{base.get('PATH', '')}"
    proc = subprocess.run([BASH, str(SCRIPT), *args], check=False, cwd=tmp_path, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)
    return proc, (record.read_text().splitlines() if record.exists() else None)


@needs_bash
def test_watch_sbatch_passes_bash_n_and_has_the_watch_defaults():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], check=False).returncode == 0
    text = SCRIPT.read_text()
    d = _directives(text)
    assert d["job-name"] == "lightning_merge_watch" and d["nodes"] == "1"
    assert d["ntasks-per-node"] == d["gpus-per-node"] == "1" and d["time"] == "2-00:00:00"
    assert "requeue" in d and d["signal"] == "USR2@600" and d["open-mode"] == "append"
    assert "partition" not in d and "account" not in d
    assert "--dependency=after:$TRAIN_JOB slurm/watch.sbatch" in text and "srun --overlap" in text


@needs_bash
def test_watch_sbatch_runs_mode_watch_with_the_allocation(tmp_path):
    proc, args = _run(tmp_path, *USAGE)
    assert proc.returncode == 0, proc.stderr
    i = args.index("lightning_merge")
    assert args[:i - 2] == ["--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=1"]
    assert args[i - 2:i] == ["python", "-m"]
    assert args[i + 1:] == ["mode=watch", "strategy.num_nodes=1", "strategy.devices=1", *USAGE]
    # inside an allocation of 2 nodes x 4 GPUs, with a collective timeout
    proc, args = _run(tmp_path, "checkpoints.last=8", env={"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
                                                           "SLURM_GPUS_ON_NODE": "4", "COLLECTIVE_TIMEOUT_S": "900"})
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=2" in args and "--ntasks-per-node=4" in args
    assert args[args.index("lightning_merge") + 1:] == ["mode=watch", "strategy.num_nodes=2", "strategy.devices=4",
                                                        "strategy.timeout_s=900", "checkpoints.last=8"]


@needs_bash
def test_watch_sbatch_inside_a_training_allocation_sizes_its_own_step(tmp_path):
    env = {"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8",
           "WATCH_NODES": "1", "WATCH_GPUS_PER_NODE": "1", "WATCH_SRUN_ARGS": "--overlap --exact"}
    proc, args = _run(tmp_path, *USAGE, env=env)
    assert proc.returncode == 0, proc.stderr
    i = args.index("lightning_merge")
    assert args[:i - 2] == ["--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=1", "--overlap", "--exact"]
    assert args[i + 1:i + 4] == ["mode=watch", "strategy.num_nodes=1", "strategy.devices=1"]


@needs_bash
@pytest.mark.parametrize("env, message", [
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "4"}, "--ntasks-per-node=N --gpus-per-node=N"),
    ({"WATCH_GPUS_PER_NODE": "one"}, "GPUS_PER_NODE=one is not a positive whole number"),
    ({"WATCH_NODES": "0"}, "NUM_NODES=0 is not a positive whole number"),
])
def test_watch_sbatch_refuses_a_bad_allocation(tmp_path, env, message):
    proc, args = _run(tmp_path, env=env)
    assert proc.returncode == 2 and args is None
    assert message in proc.stderr


@needs_bash
def test_watch_sbatch_launches_python_with_the_offline_environment(tmp_path):
    """An srun that really runs its command (options dropped), and a PYTHON that records what it got."""
    seen = tmp_path / "python.seen"
    py = tmp_path / "fake-python"
    py.write_text(f'#!/bin/sh\n{{ pwd; echo "HF_HUB_OFFLINE=$HF_HUB_OFFLINE"; '
                  f'echo "NCCL=$TORCH_NCCL_ASYNC_ERROR_HANDLING"; for a in "$@"; do echo "$a"; done; }} > "{seen}"\n')
    py.chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    srun = 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n'
    proc, _ = _run(tmp_path, *USAGE, srun_body=srun,
                   env={"PYTHON": str(py), "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "77"})
    assert proc.returncode == 0, proc.stderr
    lines = seen.read_text().splitlines()
    assert lines[0] == str(submit) and lines[1:3] == ["HF_HUB_OFFLINE=1", "NCCL=1"]
    assert lines[3:] == ["-m", "lightning_merge", "mode=watch", "strategy.num_nodes=1", "strategy.devices=1", *USAGE]
    assert "watch.sbatch: job 77 (restart 0): 1 node(s) x 1 GPU(s)" in proc.stdout
