"""SLURM: the sbatch template renders and runs (with a stand-in srun), preemption flags, requeue.

No cluster is needed: ``srun`` and ``scontrol`` are tiny shell scripts put first on
PATH that record their arguments, and signals are real ones sent to this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_merge import slurm
from lightning_merge.slurm import Preemption, RequeueError, render_sbatch, requeue

SLURM_DIR = Path(slurm.TEMPLATE).parent
SCRIPTS = sorted(p for p in SLURM_DIR.iterdir() if p.suffix in (".sbatch", ".sh"))
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _directives(text: str) -> dict[str, str]:
    """Active ``#SBATCH --key[=value]`` lines as {key: value} ('' for a flag); disabled ``##SBATCH`` skipped."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key.strip()] = value.strip()
    return out


def _stub(bindir: Path, name: str, body: str) -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    p = bindir / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def _run_script(script: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    """Run an sbatch script with a stand-in srun that writes one argument per line to srun.args."""
    bindir = tmp_path / "bin"
    record = tmp_path / "srun.args"
    _stub(bindir, "srun", f'for a in "$@"; do printf "%s\\n" "$a"; done > "{record}"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base["PATH"] = f"{bindir}{os.pathsep}{base.get('PATH', '')}"
    base.pop("COLLECTIVE_TIMEOUT_S", None)
    proc = subprocess.run([BASH, str(script), *args], check=False, cwd=tmp_path, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)
    return proc, (record.read_text().splitlines() if record.exists() else None)


# ----------------------------------------------------------------------------- the scripts

def test_slurm_folder_has_the_sbatch_template():
    assert slurm.TEMPLATE.is_file() and slurm.TEMPLATE in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_passes_bash_n(script):
    proc = subprocess.run([BASH, "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_template_defaults_one_task_per_gpu_requeue_and_usr2_to_the_tasks():
    d = _directives(slurm.TEMPLATE.read_text())
    assert d["nodes"] == "1" and d["ntasks-per-node"] == d["gpus-per-node"] == "8"
    assert "requeue" in d and d["open-mode"] == "append"
    # No "B:" prefix: the srun-launched python processes must get the signal, not the batch shell.
    assert d["signal"] == "USR2@600"
    assert "partition" not in d  # disabled (##SBATCH): the cluster's default partition


def test_template_runs_with_defaults_and_passes_overrides(tmp_path):
    proc, args = _run_script(slurm.TEMPLATE, tmp_path, "+experiment=pythia", "search.trials=4")
    assert proc.returncode == 0, proc.stderr
    i = args.index("lightning_merge")
    assert args[i - 2:i] == ["python", "-m"] and "--kill-on-bad-exit=1" in args[:i]
    assert args[i + 1:] == ["strategy.num_nodes=1", "strategy.devices=8", "+experiment=pythia", "search.trials=4"]


# ----------------------------------------------------------------------------- render_sbatch

EXTRA = ["+experiment=baichuan7b", "checkpoints.sources=[a b,c]", "search.trials=20"]


def test_render_fills_the_directives():
    text = render_sbatch(nodes=2, gpus_per_node=8, partition="gpu", time="08:00:00", job_name="bc7",
                         extra_args=EXTRA)
    d = _directives(text)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert d["partition"] == "gpu" and d["time"] == "08:00:00" and d["job-name"] == "bc7"
    assert "requeue" in d and d["signal"] == "USR2@600" and d["open-mode"] == "append"
    assert "account" not in d
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    body = text[text.index(srun[0]):]
    assert '"${PYTHON}" -m lightning_merge' in body  # PYTHON defaults to python (see the run tests)
    assert 'strategy.num_nodes="${NUM_NODES}"' in body and 'strategy.devices="${GPUS_PER_NODE}"' in body
    assert 'GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-8}"' in text and 'NUM_NODES="${SLURM_NNODES:-2}"' in text
    assert "EXTRA_ARGS=(+experiment=baichuan7b 'checkpoints.sources=[a b,c]' search.trials=20)" in text


def test_render_without_partition_keeps_the_cluster_default():
    d = _directives(render_sbatch(1, 4, None, "30", "x", []))
    assert "partition" not in d and d["ntasks-per-node"] == d["gpus-per-node"] == "4" and d["time"] == "30"


def test_rendered_script_passes_bash_n_and_runs(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(2, 8, "gpu", "08:00:00", "bc7", EXTRA, signal_lead_s=900))
    assert _directives(script.read_text())["signal"] == "USR2@900"
    assert subprocess.run([BASH, "-n", str(script)], check=False).returncode == 0
    # Outside SLURM the script falls back to the rendered allocation ...
    proc, args = _run_script(script, tmp_path, "search.alpha=0.5")
    assert proc.returncode == 0, proc.stderr
    tail = args[args.index("lightning_merge") + 1:]
    assert tail == ["strategy.num_nodes=2", "strategy.devices=8", *EXTRA, "search.alpha=0.5"]
    # ... inside, it follows the allocation (sbatch --nodes=3 --ntasks-per-node=4 --gpus-per-node=4).
    proc, args = _run_script(script, tmp_path, env={"SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "4",
                                                    "SLURM_GPUS_ON_NODE": "4", "COLLECTIVE_TIMEOUT_S": "600"})
    assert proc.returncode == 0, proc.stderr
    assert "--ntasks-per-node=4" in args
    tail = args[args.index("lightning_merge") + 1:]
    assert tail == ["strategy.num_nodes=3", "strategy.devices=4", "strategy.timeout_s=600", *EXTRA]


def test_script_refuses_tasks_and_gpus_that_differ(tmp_path):
    proc, args = _run_script(slurm.TEMPLATE, tmp_path, env={"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "4"})
    assert proc.returncode == 2 and args is None
    assert "--ntasks-per-node=N --gpus-per-node=N" in proc.stderr


@pytest.mark.parametrize("kwargs, option", [
    ({"nodes": 0}, "--nodes"),
    ({"gpus_per_node": True}, "--gpus-per-node"),
    ({"time": "4h"}, "--time"),
    ({"time": "00:05:00"}, "--signal-lead-s"),          # the default 600 s lead >= 5 min
    ({"signal_lead_s": 70000, "time": "2-00:00:00"}, "--signal-lead-s"),
    ({"partition": "gpu; rm -rf /"}, "--partition"),
    ({"job_name": "a b"}, "--job-name"),
    ({"extra_args": "+experiment=x"}, "extra_args"),
])
def test_render_rejects_bad_values_naming_the_option(kwargs, option):
    args = {"nodes": 1, "gpus_per_node": 8, "partition": None, "time": "04:00:00", "job_name": "j",
            "extra_args": [], **kwargs}
    with pytest.raises(ValueError, match=option):
        render_sbatch(**args)


def test_render_refuses_a_template_without_the_overrides_line(tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text(slurm.TEMPLATE.read_text().replace("EXTRA_ARGS=()", "ARGS=()"))
    with pytest.raises(ValueError, match="EXTRA_ARGS"):
        render_sbatch(1, 8, template=bad)


def test_cli_render(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_merge.slurm", "render", "--nodes", "2",
                           "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00", "--",
                           "+experiment=pythia", "search.alpha=0.5"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    d = _directives(proc.stdout)
    assert d["nodes"] == "2" and d["gpus-per-node"] == "8" and d["partition"] == "gpu" and d["time"] == "1-00:00:00"
    assert "EXTRA_ARGS=(+experiment=pythia search.alpha=0.5)" in proc.stdout

    out = tmp_path / "job.sbatch"
    assert slurm.main(["render", "--nodes", "1", "--gpus-per-node", "4", "-o", str(out), "+experiment=pythia"]) == 0
    assert os.access(out, os.X_OK) and _directives(out.read_text())["ntasks-per-node"] == "4"


def test_cli_render_error_names_the_option(capsys):
    assert slurm.main(["render", "--time", "soon"]) == 2
    assert "--time 'soon'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Preemption

def _wait(pred, timeout_s: float = 2.0) -> bool:
    end = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < end:
        time.sleep(0.01)
    return pred()


@pytest.fixture
def saved_handlers():
    saved = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=lambda s: s.name)
def test_preemption_flag_set_by_a_real_signal(sig, saved_handlers):
    before = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
    with Preemption() as p:
        assert not p.requested and p.signal_name is None
        os.kill(os.getpid(), sig)
        assert _wait(lambda: p.requested)
        assert p.signal_name == sig.name
    assert {s: signal.getsignal(s) for s in Preemption.SIGNALS} == before and not p.installed


def test_preemption_keeps_the_first_signal_and_reinstall_keeps_the_saved_handlers(saved_handlers):
    def other(signum, frame):  # e.g. what Lightning installs during trainer.validate
        raise AssertionError("the replaced handler must not run")

    original = signal.getsignal(signal.SIGTERM)
    p = Preemption().install()
    signal.signal(signal.SIGTERM, other)
    p.install()  # takes SIGTERM back
    assert signal.getsignal(signal.SIGTERM) == p._handler
    os.kill(os.getpid(), signal.SIGUSR2)
    assert _wait(lambda: p.requested) and p.signal_name == "SIGUSR2"
    # Once signalled, a second signal must end the process at once: the OS default, kept on re-install.
    assert all(signal.getsignal(s) == signal.SIG_DFL for s in Preemption.SIGNALS)
    signal.signal(signal.SIGTERM, other)
    p.install()
    assert all(signal.getsignal(s) == signal.SIG_DFL for s in Preemption.SIGNALS)
    p.restore()
    assert signal.getsignal(signal.SIGTERM) == original  # not `other`
    p.restore()  # idempotent


_TWICE = """
import os, signal, sys, time
from lightning_merge.slurm import Preemption
p = Preemption().install()
os.kill(os.getpid(), signal.SIGTERM)
while not p.requested:
    time.sleep(0.001)
print("flag set", flush=True)
t = time.monotonic()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still alive after", time.monotonic() - t, flush=True)
"""


def test_a_second_signal_ends_the_process_at_once():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _TWICE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert "flag set" in proc.stdout and "still alive" not in proc.stdout
    assert "SIGTERM received: the trial in flight finishes" in proc.stderr
    assert "Send it again to stop at once" in proc.stderr
    assert time.monotonic() - t0 < 30  # the interpreter's start-up; not the 5 s sleep after the second signal


def test_preemption_install_refuses_other_threads():
    import threading

    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, Preemption().install)))
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0].value)


@pytest.mark.parametrize("with_callback", [False, True], ids=["lightning_alone", "with_callback"])
def test_signal_during_trainer_validate(with_callback, saved_handlers):
    """What the module docstring says about Lightning: SIGTERM mid-validate aborts it unless we take it back."""
    torch = pytest.importorskip("torch")
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.batches = 0

        def validation_step(self, batch, batch_idx):
            self.batches += 1
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.layer(batch[0]).sum()

        def val_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.zeros(3, 2))
            return torch.utils.data.DataLoader(data, batch_size=1)

    p = Preemption().install()
    module = Module()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[p.lightning_callback()] if with_callback else [])
    if with_callback:
        trainer.validate(module, verbose=False)
        assert module.batches == 3
    else:
        with pytest.raises(SIGTERMException):
            trainer.validate(module, verbose=False)
        assert module.batches == 1
    assert p.requested and p.signal_name == "SIGTERM"
    # Lightning's teardown put our handlers back after validate.
    assert all(signal.getsignal(s) == p._handler for s in Preemption.SIGNALS)
    p.restore()


# ----------------------------------------------------------------------------- requeue

@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` first on PATH that appends its arguments to a file; no SLURM env."""
    record = tmp_path / "scontrol.calls"
    _stub(tmp_path / "bin", "scontrol", f'echo "$@" >> "{record}"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    return record


def test_requeue_calls_scontrol_with_the_job_id(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    assert requeue() is True
    assert scontrol.read_text().splitlines() == ["requeue 12345"]


def test_requeue_array_task_and_explicit_id(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12350")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12340")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue() is True
    assert requeue("777") is True
    assert scontrol.read_text().splitlines() == ["requeue 12340_3", "requeue 777"]


def test_requeue_outside_slurm_returns_false(scontrol):
    assert requeue() is False
    assert not scontrol.exists()


def test_requeue_failure_is_raised_with_scontrol_stderr(tmp_path, monkeypatch):
    _stub(tmp_path / "bin", "scontrol", 'echo "scontrol: error: Requested operation is presently disabled" >&2\n'
                                       "exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(RequeueError, match="exit code 1: scontrol: error: Requested operation is presently disabled"):
        requeue()


def test_requeue_without_scontrol_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(RequeueError, match="`scontrol` is not on PATH"):
        requeue()
    with pytest.raises(RequeueError, match="not a job id"):
        requeue("42; true")


def test_requeue_of_a_job_slurm_already_requeued_is_not_an_error(tmp_path, monkeypatch, caplog):
    """An admin's `scontrol requeue` (or preemption) SIGTERMs the tasks; the driver saves and asks again.

    Slurm 22.05 then answers with exit code 1 and "Job is pending execution for job N" (measured on the
    test cluster of tests/test_slurm_cluster.py): the job is requeued, which is what was asked.
    """
    _stub(tmp_path / "bin", "scontrol", 'echo "Job is pending execution for job $2" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with caplog.at_level("INFO", logger="lightning_merge"):
        assert requeue() is True
    assert "SLURM job 42 is already requeued" in caplog.text


def _evaluator_with_preemption(tiny_run):
    """An Evaluator as the driver builds it (Preemption installed first, its callback given), and 8 blocks."""
    pytest.importorskip("lightning.pytorch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_merge.config import StrategyConf, TextSetConf
    from lightning_merge.data import load_blocks
    from lightning_merge.evaluate import Evaluator

    path = tiny_run["paths"][0]
    blocks = load_blocks(TextSetConf(path=str(tiny_run["heldout"]), block_size=24, num_blocks=8),
                         AutoTokenizer.from_pretrained(path))
    p = Preemption().install()
    ev = Evaluator(AutoModelForCausalLM.from_pretrained(path).eval(), StrategyConf(), batch_size=2,
                   callbacks=[p.lightning_callback()])
    return ev, blocks, p


def test_sigterm_while_a_trial_merges_only_sets_the_flag(tiny_run, saved_handlers):
    """The Evaluator as the driver builds it (Preemption's callback in ``callbacks``); the signal lands while the
    trial's weights are merged (``on_merged`` runs inside ``on_validation_start``, as the merge does). The
    Evaluator runs the given callbacks before its merge, so Lightning's SIGTERM handler (a SIGTERMException
    after one batch: the trial aborted, nothing saved) is gone by then and only the flag is set.

    Seen on the real SLURM of tests/test_slurm_cluster.py: an ``scontrol requeue`` right after the ledger's
    ``running`` line was handled by Lightning ("[rank: 0] Received SIGTERM: 15"), and the trial was re-run.
    """
    ev, blocks, p = _evaluator_with_preemption(tiny_run)
    ev.on_merged = lambda: os.kill(os.getpid(), signal.SIGTERM)
    try:
        res = ev.evaluate(blocks)  # the whole evaluation: the flag waits for the trial boundary
    finally:
        p.restore()
    assert p.requested and p.signal_name == "SIGTERM"
    assert res.tokens == blocks.shape[0] * (blocks.shape[1] - 1)


def test_sigterm_while_lightning_sets_up_a_trials_validate_only_sets_the_flag(tiny_run, saved_handlers):
    """The rest of the window above, before any callback's ``on_validation_start``: the signal lands in
    ``on_validation_model_eval``, which Lightning calls after registering its handlers.

    Seen on the real SLURM after 4ae5826: an ``scontrol requeue`` sent as soon as the ledger showed a search
    trial running went to Lightning's handler in 1 of 2 runs ("[rank: 0] Received SIGTERM: 15"; the trial
    was failed and re-run on resume). The Evaluator given Preemption's callback now keeps Lightning from
    registering its handlers at all (the driver owns SIGTERM and SIGUSR2): the evaluation completes and
    only the flag is set.
    """
    ev, blocks, p = _evaluator_with_preemption(tiny_run)
    model_eval = ev.module.on_validation_model_eval

    def signalled_model_eval() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        model_eval()

    ev.module.on_validation_model_eval = signalled_model_eval
    try:
        res = ev.evaluate(blocks)
    finally:
        p.restore()
    assert p.requested and p.signal_name == "SIGTERM"
    assert res.tokens == blocks.shape[0] * (blocks.shape[1] - 1)
