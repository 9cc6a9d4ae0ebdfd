"""SLURM: rendering the sbatch script, and preemption (a signal flag, then ``scontrol requeue``).

Preemption follows lingua's pattern: a signal handler only records that the job
must stop; the driver checks :attr:`Preemption.requested` at the next trial
boundary, saves, calls :func:`requeue` on global rank 0 and exits. Nothing else is
safe inside a handler: Python runs it between two bytecodes of whatever the main
thread is doing, possibly in the middle of a collective.

What Lightning does to these signals during ``trainer.validate`` (read from
lightning 2.6, ``trainer/connectors/signal_connector.py``, ``trainer.py``,
``loops/evaluation_loop.py``):

- ``Trainer._run`` calls ``_SignalConnector.register_signal_handlers()`` on every
  ``fit``/``validate``/``test``/``predict``, after the strategy is set up, and
  ``teardown()`` restores the handlers it saved at registration when the call
  ends, normally or by an exception. A handler we installed before ``validate``
  is therefore back afterwards.
- SIGTERM: Lightning installs a composite handler: its notifier first, then (SLURM
  with ``auto_requeue``) a "bypass" handler, then the handler that was there
  before (ours), so our flag is still set. But the notifier also sets
  ``trainer.received_sigterm``, runs ``dist.broadcast`` *inside the handler*
  when the world size is > 1 (a collective issued at an arbitrary point, which can
  pair with a different collective on another rank), and the evaluation loop then
  raises ``SIGTERMException`` (a ``SystemExit``) after the current batch, unless it
  was the last one: the trial is aborted, on the ranks that saw the signal only.
- SIGUSR1/SIGUSR2: touched only when the cluster environment is a
  ``SLURMEnvironment`` with ``auto_requeue=True`` (Lightning's default when it
  detects SLURM): it then handles ``requeue_signal`` (default SIGUSR1) by saving
  an "hpc" checkpoint and running ``scontrol requeue`` itself, but only if no
  handler is installed for that signal yet. Our SIGUSR2 is left alone either way.

So the driver should (1) install :class:`Preemption` before building the
``Trainer``; (2) pass ``plugins=[SLURMEnvironment(auto_requeue=False)]`` under
SLURM, so Lightning never saves or requeues on its own; (3) add
:meth:`Preemption.lightning_callback` to the ``Trainer``: the Evaluator then keeps
Lightning from registering its handlers at all (``Evaluator._leave_signals_alone``),
and the callback takes SIGUSR2/SIGTERM back at ``on_validation_start`` should
anything else have replaced them, so during evaluation only our flag is set (no
broadcast from a handler, no ``SIGTERMException`` mid-trial; a real SLURM's
outside ``scontrol requeue`` hit the window between Lightning's registration and
``on_validation_start`` before); and (4) agree on the flag across ranks at the
trial boundary (``strategy.reduce_boolean_decision(flag, all=False)``), since
SLURM signals each task separately.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["TEMPLATE", "Preemption", "RequeueError", "main", "render_sbatch", "requeue"]

log = logging.getLogger("lightning_merge")

#: The sbatch template; it is also a working script with the defaults in its #SBATCH lines.
TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "merge.sbatch"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_NAMES = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(,[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")
_MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal=<sig>@<time>: at most 65535 s


# ----------------------------------------------------------------------------- sbatch rendering

def _time_seconds(time: str) -> int:
    """Seconds in an sbatch ``--time`` value; ``ValueError`` naming the option if malformed."""
    m = _TIME.match(time.strip()) if isinstance(time, str) else None
    if not m:
        raise ValueError(f"--time {time!r}: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if m.group(4) is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + b  # M or M:S


def _directive(lines: list[str], key: str, value: str | None) -> None:
    """Set ``#SBATCH --key=value`` in place (``""``: a flag, ``--key``); ``None`` disables it (``##SBATCH``).

    The directive is found by its key whether active or disabled; a key the
    template lacks is added after its last directive (sbatch reads directives
    only before the first command).
    """
    pat = re.compile(rf"^#+SBATCH\s+--{re.escape(key)}(?:[=\s]|$)")
    idx = [i for i, line in enumerate(lines) if pat.match(line)]
    if value is None:
        for i in idx:
            lines[i] = "##" + lines[i].lstrip("#")
        return
    new = f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}"
    if idx:
        lines[idx[0]] = new
        for i in reversed(idx[1:]):
            del lines[i]
        return
    last = max((i for i, line in enumerate(lines) if re.match(r"^#+SBATCH\s", line)), default=0)
    lines.insert(last + 1, new)


def _replace_line(lines: list[str], pattern: str, new: str, what: str, template: Path) -> None:
    pat = re.compile(pattern)
    idx = [i for i, line in enumerate(lines) if pat.match(line)]
    if len(idx) != 1:
        raise ValueError(f"sbatch template {template}: expected one {what} line "
                         f"(matching {pattern!r}), found {len(idx)}")
    lines[idx[0]] = new


def render_sbatch(nodes: int, gpus_per_node: int, partition: str | None = None, time: str = "04:00:00",
                  job_name: str = "lightning_merge", extra_args: Sequence[str] = (), *,
                  account: str | None = None, signal_lead_s: int = 600,
                  template: str | Path | None = None) -> str:
    """The sbatch script for ``nodes`` x ``gpus_per_node`` GPUs, one task per GPU.

    Fills ``slurm/merge.sbatch`` (or ``template``): its ``#SBATCH`` lines for job
    name, nodes, tasks and GPUs per node, time, partition/account (``None``: left
    disabled, the cluster default) and ``--signal=USR2@signal_lead_s``; the
    defaults the script falls back to outside SLURM; and ``extra_args``, Hydra
    overrides baked into the job (shell-quoted; arguments given to ``sbatch``
    follow them and win). Every value is checked, and errors name the option.
    """
    for opt, v in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--signal-lead-s", signal_lead_s)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{opt}: must be a positive integer, got {v!r}")
    if signal_lead_s > _MAX_SIGNAL_LEAD_S:
        raise ValueError(f"--signal-lead-s: sbatch allows at most {_MAX_SIGNAL_LEAD_S} s, got {signal_lead_s}")
    limit = _time_seconds(time)
    if signal_lead_s >= limit:
        raise ValueError(f"--signal-lead-s {signal_lead_s}: must be shorter than --time {time} ({limit} s), "
                         "or the job is signalled before it starts; lower it or raise --time")
    if not isinstance(job_name, str) or not _NAME.match(job_name):
        raise ValueError(f"--job-name {job_name!r}: use letters, digits and . _ + - only")
    for opt, v in (("--partition", partition), ("--account", account)):
        if v is not None and (not isinstance(v, str) or not _NAMES.match(v)):
            raise ValueError(f"{opt} {v!r}: use a name (or a comma-separated list) of letters, digits and . _ + -")
    if isinstance(extra_args, str) or not all(isinstance(a, str) for a in extra_args):
        raise ValueError(f"extra_args: must be a list of strings (Hydra overrides), got {extra_args!r}")

    path = Path(template) if template is not None else TEMPLATE
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"sbatch template {path}: cannot read it ({e.strerror})") from None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise ValueError(f"sbatch template {path}: the first line must be a #! line")

    _directive(lines, "job-name", job_name)
    _directive(lines, "nodes", str(nodes))
    _directive(lines, "ntasks-per-node", str(gpus_per_node))
    _directive(lines, "gpus-per-node", str(gpus_per_node))
    _directive(lines, "time", time.strip())
    _directive(lines, "partition", partition)
    _directive(lines, "account", account)
    _directive(lines, "signal", f"USR2@{signal_lead_s}")
    _directive(lines, "requeue", "")  # requeueable, and the log of a requeued run is appended to
    _directive(lines, "open-mode", "append")
    _replace_line(lines, r'^GPUS_PER_NODE="\$\{SLURM_NTASKS_PER_NODE:-\d+\}"\s*$',
                  f'GPUS_PER_NODE="${{SLURM_NTASKS_PER_NODE:-{gpus_per_node}}}"', "GPUS_PER_NODE", path)
    _replace_line(lines, r'^NUM_NODES="\$\{SLURM_NNODES:-\d+\}"\s*$',
                  f'NUM_NODES="${{SLURM_NNODES:-{nodes}}}"', "NUM_NODES", path)
    _replace_line(lines, r"^EXTRA_ARGS=\(.*\)\s*$",
                  "EXTRA_ARGS=(" + " ".join(shlex.quote(a) for a in extra_args) + ")", "EXTRA_ARGS=(...)", path)
    lines.insert(1, f"# Rendered from {path.name} by `python -m lightning_merge.slurm render`; "
                    "edit the template, not this copy.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- preemption

class Preemption:
    """A flag set by SIGUSR2 (time limit near) or SIGTERM (preemption); nothing else happens.

    A second signal (an impatient user, a scheduler's follow-up) ends the process at once.

    ``install()`` saves the current handlers and installs ours; calling it again
    takes the signals back (from Lightning, see the module docstring) without
    losing the saved ones. ``restore()`` puts the saved handlers back. Usable as a
    context manager. The first signal received is kept (``signal_name``).
    """

    SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, signals: Iterable[int] = SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._saved: dict[signal.Signals, Any] = {}
        self._installed = False
        self._signum: int | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._signum is None:
            self._signum = signum
            # A second signal ends the process at once: the OS default action (terminate), which
            # acts even while Python waits inside a long forward or a collective. The state on
            # disk stays whole: ledger lines are single fsync'd writes (a torn last line is
            # dropped on resume) and every other file is published by rename.
            self._to_default()
            with contextlib.suppress(OSError):  # os.write: no locks or buffers inside a handler
                os.write(2, (f"lightning_merge: {signal.Signals(signum).name} received: the trial in flight "
                             f"finishes, then the state is saved (pid {os.getpid()}). Send it again to stop at "
                             f"once; that trial is then re-run on resume.\n").encode())

    def install(self) -> Preemption:
        """Install (or re-install) the flag handlers; main thread only, as Python requires."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption.install() must run in the main thread: Python installs signal "
                               "handlers only there")
        for s in self.signals:
            if not self._installed:
                self._saved[s] = signal.getsignal(s)
            if self._signum is None and signal.getsignal(s) != self._handler:
                signal.signal(s, self._handler)
        if self._signum is not None:  # already signalled: a second signal must still end the process at once
            self._to_default()
        self._installed = True
        return self

    def _to_default(self) -> None:
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)

    def restore(self) -> None:
        """Put back the handlers found by the first ``install()`` (no-op if not installed)."""
        if not self._installed:
            return
        for s, h in self._saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._saved.clear()
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived: save at the next trial boundary and requeue."""
        return self._signum is not None

    @property
    def signal_name(self) -> str | None:
        """``"SIGUSR2"`` / ``"SIGTERM"`` for the first signal received, else ``None``."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def lightning_callback(self):
        """A Lightning ``Callback`` that re-installs these handlers when an evaluation starts.

        Lightning replaces the SIGTERM handler for the duration of every
        ``validate``/``test``/``predict`` call (see the module docstring); taking it
        back in ``on_*_start`` keeps Lightning's notifier (a collective inside a
        handler, and ``SIGTERMException`` mid-trial) out of our evaluations.
        """
        import lightning.pytorch as L

        preemption = self

        class _TakeSignalsBack(L.Callback):
            owns_signals = True  # the Evaluator then keeps Lightning from registering its own handlers

            def on_validation_start(self, trainer, pl_module) -> None:
                preemption.install()

            def on_test_start(self, trainer, pl_module) -> None:
                preemption.install()

            def on_predict_start(self, trainer, pl_module) -> None:
                preemption.install()

        return _TakeSignalsBack()

    def __enter__(self) -> Preemption:  # noqa: PYI034
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


class RequeueError(RuntimeError):
    """``scontrol requeue`` is missing or failed; the message has the command, exit code and stderr."""


def _job_id_from_env() -> str | None:
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(job_id: str | None = None, *, timeout_s: float = 60.0) -> bool:
    """Requeue this SLURM job (``scontrol requeue <id>``); call it on global rank 0 only, after saving.

    ``job_id`` defaults to the job of this process (``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``
    for an array task, else ``SLURM_JOB_ID``). Returns ``True`` once requeued
    (SLURM then ends this run; the job restarts with the same id), also when SLURM had
    requeued it already (``scontrol requeue`` from outside, or preemption: the tasks got
    SIGTERM, and scontrol answers "Job is pending execution"), ``False`` when
    not under SLURM or when ``LIGHTNING_MERGE_REQUEUE=0`` (a watch service started inside a training
    job's allocation, whose job id is the training job's). Raises :class:`RequeueError` if ``scontrol`` is not on PATH,
    fails or hangs, so the driver can report it and exit non-zero: the saved state
    is intact, and resubmitting the same command resumes it.
    """
    if os.environ.get("LIGHTNING_MERGE_REQUEUE", "1") == "0":  # a watcher inside the training job's allocation
        log.info("LIGHTNING_MERGE_REQUEUE=0: not requeueing; the enclosing job owns its requeue")
        return False
    job_id = job_id if job_id is not None else _job_id_from_env()
    if not job_id:
        log.info("not running under SLURM (no SLURM_JOB_ID): nothing to requeue")
        return False
    job_id = str(job_id)
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise RequeueError(f"SLURM job id {job_id!r} is not a job id (digits, or ARRAYID_TASKID)")
    exe = shutil.which("scontrol")
    hint = "the search state is saved: resubmit the same command to resume"
    if exe is None:
        raise RequeueError(f"cannot requeue SLURM job {job_id}: `scontrol` is not on PATH; {hint}")
    cmd = [exe, "requeue", job_id]
    log.info("requeueing SLURM job %s: %s", job_id, shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RequeueError(f"`{shlex.join(cmd)}` did not finish within {timeout_s:g} s; {hint}") from None
    except OSError as e:
        raise RequeueError(f"`{shlex.join(cmd)}` could not run ({e}); {hint}") from None
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip() or "no output")
        if "pending execution" in out:
            # SLURM requeued the job already: an admin's `scontrol requeue`, or preemption with
            # PreemptMode=REQUEUE. Both SIGTERM the tasks, which saved and came here; the job is pending
            # again and restarts on its own (Slurm 22.05: "Job is pending execution for job N").
            log.info("SLURM job %s is already requeued (pending); it restarts on its own", job_id)
            return True
        raise RequeueError(f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}: {out} (was the job "
                           f"submitted with --requeue, and does the cluster allow requeueing?); {hint}")
    log.info("requeued SLURM job %s", job_id)
    return True


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_merge.slurm render --nodes 2 --gpus-per-node 8 [...] -- OVERRIDES > job.sbatch``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_merge.slurm",
                                     description="SLURM helpers for lightning_merge.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print an sbatch script for N nodes x G GPUs",
                       description="Print slurm/merge.sbatch filled in for this allocation; Hydra "
                                   "overrides after `--` are baked into the job.")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--partition", default=None)
    r.add_argument("--account", default=None)
    r.add_argument("--time", default="04:00:00", help="sbatch --time (default 04:00:00)")
    r.add_argument("--job-name", default="lightning_merge")
    r.add_argument("--signal-lead-s", type=int, default=600,
                   help="SIGUSR2 this many seconds before the time limit (default 600)")
    r.add_argument("--template", default=None, help=f"default: {TEMPLATE}")
    r.add_argument("-o", "--output", default=None, help="write here (executable) instead of stdout")
    r.add_argument("overrides", nargs="*", help="Hydra overrides for python -m lightning_merge")
    args = parser.parse_args(argv)
    try:
        text = render_sbatch(args.nodes, args.gpus_per_node, args.partition, args.time, args.job_name,
                             list(args.overrides), account=args.account, signal_lead_s=args.signal_lead_s,
                             template=args.template)
    except ValueError as e:
        print(f"lightning_merge.slurm: error: {e}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
