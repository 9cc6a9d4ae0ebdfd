"""What a person sees: the ``--help`` text, the srun warning, and log lines beside the live bar.

The CLI runs are real subprocesses on the ``tiny_run`` checkpoints; "SLURM installed" is a fake
``srun`` on PATH (all Lightning checks is that it exists), so the tests need no SLURM.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRUN_HINT = "The `srun` command is available on your system but is not used"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _help(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _check_help(text: str) -> None:
    assert "merge the checkpoints" in text  # says what the tool is
    for mode in ("search", "evaluate", "merge"):
        assert re.search(rf"^\s+{mode}\s", text, re.M), f"mode {mode} not described"
    for option in ("checkpoints.sources", "checkpoints.last", "checkpoints.config_dir",
                   "checkpoints.tokenizer_dir", "data.heldout.path", "data.heldout.block_size",
                   "data.heldout.txt_documents", "search.name", "search.space", "search.alpha",
                   "search.trials", "search.acquisition", "strategy=", "mode=", "merge.weights",
                   "merge.normalize", "output_dir", "+experiment=NAME"):
        assert option in text, f"{option} missing from --help"
    assert "== Examples ==" in text and "README.md" in text
    examples = text.split("== Examples ==")[1].split("==")[0]
    assert examples.count("python -m lightning_merge") >= 3
    assert "-m search.alpha" in examples and "mode=merge" in examples
    assert "experiment: baichuan7b" in text  # the config groups, with their options
    assert "Powered by Hydra" not in text and "== Config ==" not in text  # not Hydra's generic dump


def test_help_says_what_the_tool_is_its_modes_options_and_examples():
    _check_help(_help([sys.executable, "-m", "lightning_merge", "--help"]))


def test_console_script_help_also_with_overrides_before_the_flag():
    script = Path(sys.executable).parent / "lightning-merge"
    cmd = [str(script)] if script.exists() else \
        [sys.executable, "-c", "from lightning_merge.__main__ import cli; cli()"]
    _check_help(_help([*cmd, "mode=evaluate", "--help"]))


@pytest.fixture(scope="module")
def fake_srun(tmp_path_factory) -> Path:
    """A folder holding an ``srun`` that does nothing: Lightning only checks that one is on PATH."""
    bin_dir = tmp_path_factory.mktemp("slurm_bin")
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    return bin_dir


def _search_run(tiny_run, out: Path, fake_srun: Path, **env: str) -> str:
    """A short real search (5 baselines + 2 trials + the best): Lightning validates about 8 times."""
    args = ["demo.enabled=false", f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=2",
            f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=64",
            "data.heldout.num_blocks=8", "data.search_blocks=4", "search.trials=2",
            "merge.write=false", f"output_dir={out}", f"cache_dir={out / 'cache'}"]
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", *args], capture_output=True, text=True,
                          timeout=300, cwd=out.parent,
                          env=_env(PATH=f"{fake_srun}{os.pathsep}{os.environ['PATH']}", **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_no_srun_warning_outside_slurm(tiny_run, tmp_path, fake_srun):
    out = _search_run(tiny_run, tmp_path / "run", fake_srun)
    assert "trial budget reached" in out or "search stops" in out
    assert out.count(SRUN_HINT) == 0


def test_srun_warning_once_in_a_slurm_job_run_without_srun(tiny_run, tmp_path, fake_srun):
    # a batch script that calls python directly: SLURM_JOB_ID set, no SLURM_NTASKS (srun sets it)
    out = _search_run(tiny_run, tmp_path / "run", fake_srun, SLURM_JOB_ID="4242", SLURM_JOB_NAME="merge")
    assert out.count(SRUN_HINT) == 1


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: a minimal VT100 (\\r, \\n, cursor up, erase line, SGR)."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            n = int(re.sub(r"\D", "", token) or 1) if token[-1] in "AK" else 0
            if token[-1] == "A":
                row = max(0, row - n)
            elif token[-1] == "K" and token[2:-1] == "2":
                lines[row] = ""
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines]


class _FixedStreamHandler(logging.StreamHandler):
    """A stream handler with a read-only ``stream`` (as ``logging.lastResort``, which follows sys.stderr)."""

    def __init__(self, stream) -> None:
        self._fixed = stream
        logging.Handler.__init__(self, logging.CRITICAL)  # present while the bar is live, silent

    @property
    def stream(self):
        return self._fixed


def test_log_lines_print_above_the_live_bar_each_on_its_own_line():
    from rich.console import Console

    from lightning_merge.report import trial_progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    logger = logging.getLogger("lightning_merge.test_cli_ux")
    # as Hydra sets it up: a StreamHandler holding the stream the bar is drawn on, resolved beforehand
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("[lightning_merge.loop][INFO] - %(message)s"))
    logger.addHandler(handler)
    fixed = _FixedStreamHandler(buf)  # like logging.lastResort: its stream cannot be set; left as it is
    logger.addHandler(fixed)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with trial_progress(4, console=console) as bar:
            for i in range(4):
                bar.advance({"trial": i, "objective": 3.0 - i / 10, "weights": [0.5, 0.5]}, None)
                bar.progress.refresh()  # the bar is on screen when the line is logged
                logger.info("trial %d done", i)
        assert handler.stream is buf  # the handler's own stream is back afterwards
        logger.info("after the bar")
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(fixed)
    screen = _screen(buf.getvalue())
    for i in range(4):
        assert f"[lightning_merge.loop][INFO] - trial {i} done" in screen, "\n".join(screen)
    assert screen.index("[lightning_merge.loop][INFO] - trial 3 done") < \
        next(n for n, line in enumerate(screen) if "4/4" in line)  # the log lines sit above the bar
    assert screen[-2:] == ["[lightning_merge.loop][INFO] - after the bar", ""] or \
        screen[-1] == "[lightning_merge.loop][INFO] - after the bar"
    assert sum("4/4" in line for line in screen) == 1, "\n".join(screen)  # one bar, not a trail of them
