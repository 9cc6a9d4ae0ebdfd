"""One writer per run folder (runlock.py): a second run is refused at once, naming the holder; a dead
holder's lock is taken over; a requeued SLURM job waits for its own previous incarnation.

The holders and the second runs are real processes (``python -c``) with the environment each test
gives them (the SLURM variables of this machine, if any, are removed first), so the OS lock is what
decides, never a fake. The refusal's "lock work" is timed inside the refused process, around
``RunLock.acquire``; the CLI tests (slow) time and check the whole command.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_merge import runlock
from lightning_merge.config import ConfigError
from lightning_merge.runlock import HOLDER_NAME, LOCK_NAME, RunLock, read_holder

# Holds the lock (after forking a child that sleeps, with FORK=1) until its stdin closes.
HOLD = r"""
import os, sys, time
from lightning_merge.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
child = 0
if os.environ.get("FORK") == "1":
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
print("held", os.getpid(), child, flush=True)
sys.stdin.read()
lock.release()
"""

# Tries once; prints {"ok", "error", "seconds", "pid"}; a taker holds for HOLD_S seconds, then releases.
TRY = r"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lightning_merge.config import ConfigError
from lightning_merge.runlock import RunLock
t0 = time.perf_counter()
try:
    lock = RunLock(sys.argv[1]).acquire()
    res = {"ok": True, "error": None}
except ConfigError as e:
    lock, res = None, {"ok": False, "error": str(e)}
res.update(seconds=time.perf_counter() - t0, pid=os.getpid())
print(json.dumps(res), flush=True)
if lock is not None:
    time.sleep(float(os.environ.get("HOLD_S", "0")))
    lock.release()
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop(runlock.NO_LOCK_ENV, None)
    env.pop(runlock.WAIT_ENV, None)
    return {**env, **extra}


def hold(folder: Path, **env: str) -> tuple[subprocess.Popen, int, int]:
    """A real holder process; returns it, its pid and its forked child's pid (0 without FORK=1)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=_env(**env))
    words = p.stdout.readline().split()
    assert words and words[0] == "held", f"the holder did not take the lock (exit {p.poll()})"
    return p, int(words[1]), int(words[2])


def attempt(folder: Path, **env: str) -> tuple[dict, str]:
    """One real try in a new process: its JSON result, and its log (stderr)."""
    proc = subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, timeout=120,
                          env=_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def end(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.stdin.close()
        p.wait(timeout=30)


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (hidden ones too): size, mtime and sha256 of files, mtime of folders."""
    out = {".": os.stat(folder).st_mtime_ns}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns,
                                           hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
    return out


def test_a_second_process_is_refused_at_once_naming_the_holder_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    p, pid, _ = hold(run, SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2",
                     SLURM_RESTART_COUNT="0")
    try:
        (run / "trials.jsonl").write_text('{"trial": 0}\n')
        (run / "__main__.log").write_text("the holder's log\n")
        before = snapshot(run)
        time.sleep(0.05)  # so a write by the refused run would show in an mtime
        res, _ = attempt(run, SLURM_JOB_ID="5555")
        assert snapshot(run) == before
    finally:
        end(p)
    assert not res["ok"]
    assert res["seconds"] < 0.5, res  # measured: ~1 ms of lock work
    msg = res["error"]
    import socket

    for part in (f"output_dir {run} is in use by another run", f"pid {pid} on host {socket.gethostname()}",
                 "SLURM job 4242 (array 4240_2, restart 0)", "running since", "`scancel 4240_2`", f"`kill {pid}`",
                 "output_dir=..."):
        assert part in msg, (part, msg)


def test_a_sigkilled_holder_is_taken_over_and_the_identity_names_the_new_holder(tmp_path, monkeypatch, caplog):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    p, pid, _ = hold(tmp_path, SLURM_JOB_ID="31")
    assert read_holder(tmp_path)["pid"] == pid
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="lightning_merge.runlock"):
        lock = RunLock(tmp_path).acquire()
    try:
        assert lock.locked
        assert f"taking over the lock of a run that ended without releasing it (killed, or its node lost): " \
               f"pid {pid}" in caplog.text
        assert read_holder(tmp_path)["pid"] == os.getpid() and read_holder(tmp_path)["slurm_job_id"] is None
        res, _ = attempt(tmp_path)  # and the new holder really holds it
        assert not res["ok"] and f"pid {os.getpid()}" in res["error"]
    finally:
        lock.release()
    assert not (tmp_path / HOLDER_NAME).exists() and (tmp_path / LOCK_NAME).exists()  # the lock file stays
    res, _ = attempt(tmp_path)
    assert res["ok"]


def test_a_forked_child_of_the_holder_does_not_keep_the_lock(tmp_path):
    """POSIX locks are per process: a fork that outlives rank 0 (a DataLoader worker) holds nothing."""
    p, pid, child = hold(tmp_path, FORK="1")
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        os.kill(child, 0)  # the child, which shares the lock file's descriptor, is still alive
        res, _ = attempt(tmp_path)
        assert res["ok"] and res["seconds"] < 0.5, res
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_lock_descriptor_is_not_inherited_by_exec_children(tmp_path):
    with RunLock(tmp_path) as lock:
        assert os.get_inheritable(lock._fd) is False


def test_a_requeued_job_waits_for_its_previous_incarnation_then_takes_over(tmp_path):
    p, pid, _ = hold(tmp_path, SLURM_JOB_ID="777")
    t = subprocess.Popen([sys.executable, "-c", TRY, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env(SLURM_JOB_ID="777", SLURM_RESTART_COUNT="1", HOLD_S="0"))
    try:
        line = t.stderr.readline()
        assert "is held by this SLURM job's previous run (pid %d" % pid in line and "waiting up to 120 s" in line
        time.sleep(1.0)
        assert t.poll() is None  # still waiting while the old incarnation lives
    finally:
        end(p)  # the old incarnation exits and releases
    out, err = t.communicate(timeout=60)
    res = json.loads(out)
    assert res["ok"] and 1.0 <= res["seconds"] < 10, res
    assert "this job's previous run released it after" in err


def test_a_requeued_job_refuses_when_its_previous_run_does_not_end_in_time(tmp_path):
    p, pid, _ = hold(tmp_path, SLURM_JOB_ID="777", SLURM_RESTART_COUNT="2")
    try:
        res, _ = attempt(tmp_path, SLURM_JOB_ID="777", SLURM_RESTART_COUNT="3", LIGHTNING_MERGE_LOCK_WAIT_S="1")
    finally:
        end(p)
    assert not res["ok"] and 1.0 <= res["seconds"] < 3, res
    assert f"pid {pid}" in res["error"] and "did not release it within 1 s (LIGHTNING_MERGE_LOCK_WAIT_S)" \
        in res["error"]


@pytest.mark.parametrize("other", [{"SLURM_JOB_ID": "778", "SLURM_RESTART_COUNT": "1"},  # another job
                                   {"SLURM_JOB_ID": "777"},  # another step of the same allocation
                                   {}])  # not under SLURM
def test_another_job_or_a_sibling_step_is_refused_at_once(tmp_path, other):
    p, pid, _ = hold(tmp_path, SLURM_JOB_ID="777")
    try:
        res, err = attempt(tmp_path, **other)
    finally:
        end(p)
    assert not res["ok"] and res["seconds"] < 0.5 and f"pid {pid}" in res["error"], res
    assert "waiting" not in err


def test_the_same_process_cannot_lock_a_folder_twice_and_keeps_its_lock(tmp_path):
    with RunLock(tmp_path):
        (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)  # another path to the same lock file
        for other in (tmp_path, tmp_path.parent / f"{tmp_path.name}-link"):
            with pytest.raises(ConfigError, match=rf"already in use by this process \(pid {os.getpid()}\)"):
                RunLock(other).acquire()
        res, _ = attempt(tmp_path)  # the refused second RunLock opened nothing, so the lock is still held
        assert not res["ok"] and f"pid {os.getpid()}" in res["error"]
    with RunLock(tmp_path) as again:  # released: free again, for this process too
        assert again.locked


@pytest.mark.parametrize("identity,expect", [
    ('{"host": "gpu-07", "pi', "unknown (its identity file could not be read)"),  # half-written
    ("[1, 2]", "unknown (its identity file could not be read)"),  # not an object
    (None, "record is stale"),  # names a process that no longer runs on this host
])
def test_an_unreadable_or_stale_identity_still_gives_a_clear_refusal(tmp_path, identity, expect):
    p, pid, _ = hold(tmp_path)
    try:
        if identity is None:
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
            rec = {**read_holder(tmp_path), "pid": int(dead)}
            identity = json.dumps(rec)
        (tmp_path / HOLDER_NAME).write_text(identity)
        res, _ = attempt(tmp_path)
    finally:
        end(p)
    assert not res["ok"] and expect in res["error"] and res["seconds"] < 1.0, res
    assert "One run folder has one writer" in res["error"]


def test_a_filesystem_without_locks_is_refused_with_the_opt_out(tmp_path, monkeypatch, caplog):
    """Simulated (no such filesystem here): lockf fails with ENOLCK, as on NFSv3 without lockd."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    monkeypatch.delenv(runlock.NO_LOCK_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"does not support file locks \(ENOLCK: .*LIGHTNING_MERGE_NO_LOCK=1"):
        RunLock(tmp_path).acquire()
    assert not runlock._held and not (tmp_path / HOLDER_NAME).exists()
    monkeypatch.setenv(runlock.NO_LOCK_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="lightning_merge.runlock"):
        with RunLock(tmp_path) as lock:
            assert not lock.locked
    assert f"LIGHTNING_MERGE_NO_LOCK=1: {tmp_path} is not locked" in caplog.text


def test_a_refused_process_closes_its_log_files_in_the_held_folder(tmp_path):
    """Hydra's job log (``<run>/__main__.log``) is opened before the task runs; the refusal must not land in it."""
    p, _, _ = hold(tmp_path)
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "__main__.log")
    root.addHandler(handler)
    try:
        (tmp_path / "__main__.log").write_text("the holder's log\n")
        with pytest.raises(ConfigError):
            RunLock(tmp_path).acquire()
        assert handler not in root.handlers
        logging.getLogger("lightning_merge").error("the refusal, as __main__ logs it")
        assert (tmp_path / "__main__.log").read_text() == "the holder's log\n"
    finally:
        root.removeHandler(handler)
        handler.close()
        end(p)


# --- the driver: rank 0 locks before anything; other ranks never touch the files -------------------------------
def _demo_cfg(tmp_path: Path, out: Path):
    from test_config import _compose

    cfg = _compose(f"cache_dir={tmp_path / 'cache'}")  # the embedded demo: a trajectory would be trained first
    cfg.output_dir = str(out)
    return cfg


def test_run_is_refused_before_the_demo_trajectory_or_any_file(tmp_path, monkeypatch):
    from lightning_merge.driver import run

    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    p, pid, _ = hold(out)
    try:
        cfg, before = _demo_cfg(tmp_path, out), snapshot(out)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"in use by another run: pid {pid}"):
            run(cfg)
        assert time.perf_counter() - t0 < 0.5
        assert snapshot(out) == before and not (tmp_path / "cache").exists()  # no trajectory was built
    finally:
        end(p)


def test_run_on_another_rank_never_opens_the_lock(tmp_path, monkeypatch):
    from lightning_merge.driver import run

    level = logging.getLogger("lightning_merge").level
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "run"
    cfg = _demo_cfg(tmp_path, out)
    cfg.checkpoints.sources = [str(tmp_path / "ckpt")]  # no held-out data given: refused early by the driver
    try:
        with pytest.raises(ConfigError, match="data.heldout.path"):
            run(cfg)
    finally:
        logging.getLogger("lightning_merge").setLevel(level)  # run() quiets other ranks' logs
    assert not (out / LOCK_NAME).exists() and not (out / HOLDER_NAME).exists()
    monkeypatch.setenv("RANK", "0")  # the same refusal on rank 0: the lock was taken, and released
    with pytest.raises(ConfigError, match="data.heldout.path"):
        run(cfg)
    assert (out / LOCK_NAME).exists() and not (out / HOLDER_NAME).exists() and not runlock._held


# --- real CLI runs (slow) ---------------------------------------------------------------------------------------
AUDIT = Path(__file__).parent / "write_audit"


def _audit_env(root: Path, logs: Path, **extra: str) -> dict:
    """The CLI's environment with the write audit (tests/write_audit/sitecustomize.py) watching ``root``."""
    from test_resume import env

    path = os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")]))
    return _env(**{**env(), "PYTHONPATH": path, "LM_WRITE_AUDIT_ROOT": str(root), "LM_WRITE_AUDIT_DIR": str(logs),
                   **extra})


def _events(logs: Path, pid: int | None = None, not_pid: int | None = None) -> list[tuple[str, str]]:
    """The audited ``(event, path)`` of the processes whose log name ends in ``-<pid>`` (or all but ``not_pid``)."""
    out = []
    for f in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        p = int(f.stem.rsplit("-", 1)[1])
        if (pid is None or p == pid) and p != not_pid:
            out += [tuple(line.split("\t", 1)) for line in f.read_text().splitlines()]
    return out


@pytest.mark.slow
def test_cli_a_second_identical_search_is_refused_while_the_first_runs(tiny_run, tmp_path):
    from test_resume import TRIALS, command, env, ledger_lines

    from lightning_merge.ledger import Ledger

    out = tmp_path / "run"
    cmd = command(tiny_run, out)
    first = subprocess.Popen(cmd, env=_env(**env()), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while (read_holder(out) or {}).get("pid") != first.pid:
            assert first.poll() is None and time.time() - t0 < 120, "the first run did not take the lock"
            time.sleep(0.05)
        logs = tmp_path / "audit"
        t1 = time.perf_counter()
        second = subprocess.run(cmd, env=_audit_env(out, logs), capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t1
        assert first.poll() is None  # the refusal came while the first one ran
    finally:
        _, err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"lightning_merge: error: output_dir {out} is in use by another run: pid {first.pid} on host" \
        in second.stderr and f"`kill {first.pid}`" in second.stderr
    assert "stage open checkpoints" not in second.stdout + second.stderr  # refused before any checkpoint or model
    print(f"refused CLI run: {wall:.2f} s wall (Python, Hydra, imports)")
    # What the refused process did in the folder: no-op mkdirs of the existing folder (Hydra, RunLock), Hydra's
    # log handler opened for append, and the lock file opened to try it; nothing was written.
    assert {e for e, _ in _events(logs)} <= {"os.mkdir", "open"}
    assert {Path(p).name for _, p in _events(logs)} <= {"run", "__main__.log", LOCK_NAME}
    assert (out / LOCK_NAME).stat().st_size == 0 and "in use by another run" not in (out / "__main__.log").read_text()
    # The first run finished normally, alone: each trial once, a ledger that resumes.
    assert first.returncode == 0, err[-3000:]
    assert len(Ledger.open(out / "trials.jsonl").search_trials()) == TRIALS
    assert all(r["status"] != "running" for r in Ledger.open(out / "trials.jsonl").records.values())
    lines = ledger_lines(out)
    assert len(lines) == 2 * len({r["trial"] for r in lines})  # `running` then its result, for every trial
    assert not (out / HOLDER_NAME).exists()  # released at the end of run()


@pytest.mark.slow
def test_a_sweep_point_launched_twice_is_refused_and_each_point_locks_its_own_folder(tiny_run, tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "lightning_merge", "-m", "search.alpha=0,0.5",
           f"checkpoints.sources=[{tiny_run['ckdir']}]", f"data.heldout.path={tiny_run['heldout']}",
           "data.heldout.block_size=32", "data.heldout.num_blocks=8", "data.search_blocks=4", "demo.enabled=false",
           "search.trials=2", "baselines.enabled=false", "report.progress=false", "merge.write=false",
           f"hydra.sweep.dir={sweep}"]
    from test_resume import env

    proc = subprocess.run(cmd, env=_env(**env()), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Long override lists make hashed folder names: each point's record says which it is.
    points = sorted((p for p in sweep.iterdir() if p.is_dir()),
                    key=lambda p: "search.alpha=0.5" in (p / ".hydra" / "overrides.yaml").read_text())
    assert len(points) == 2 and "search.alpha=0.5" in (points[1] / ".hydra" / "overrides.yaml").read_text()
    p, pid, _ = hold(points[1])  # the second point is running elsewhere (the same sweep launched twice)
    try:
        again = subprocess.run(cmd, env=_env(**env()), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        end(p)
    assert again.returncode == 2, again.stderr[-3000:]
    assert f"output_dir {points[1]} is in use by another run: pid {pid}" in again.stderr
    assert f"output_dir {points[0]}" not in again.stderr  # the first point took its own lock and ran


@pytest.fixture(scope="module")
def ddp_audit(tiny_run, tmp_path_factory):
    """A 2-rank gloo DDP search through the CLI with the write audit watching its run folder."""
    from test_resume import command

    root = tmp_path_factory.mktemp("ddp_audit")
    out, logs = root / "run", root / "audit"
    cmd = command(tiny_run, out, "strategy=ddp", "strategy.devices=2", trials=2)
    proc = subprocess.run(cmd, env=_audit_env(out, logs), cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = {f.stem.split("-", 1)[0]: int(f.stem.rsplit("-", 1)[1]) for f in logs.glob("*.log")}
    # Rank 1's process was audited (its no-op mkdirs are logged), so an empty list below means something.
    assert ranks.get("rank1") and ranks.get("rank0") and ranks["rank1"] != ranks["rank0"], sorted(logs.iterdir())
    return {"out": out, "logs": logs, "rank0": ranks["rank0"], "rank1": ranks["rank1"]}


def _rank1_writes(a: dict) -> list[tuple[str, str]]:
    """Rank 1's audited events, less its no-op mkdirs of the run folder itself (Hydra's run_job and the driver make
    the folder with exist_ok; rank 0 made it, and holds its lock, before it launched rank 1: EEXIST, no change)."""
    return [(e, p) for e, p in _events(a["logs"], pid=a["rank1"]) if not (e == "os.mkdir" and Path(p) == a["out"])]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_only_rank_zero_writes_the_run_folder_and_holds_its_lock(ddp_audit):
    a = ddp_audit
    zero = {Path(p).name for _, p in _events(a["logs"], pid=a["rank0"])}
    assert {LOCK_NAME, "trials.jsonl", "results.json"} <= zero  # rank 0 (one pid, before and after the launch)
    assert any(n.startswith(f".{HOLDER_NAME}.") for n in zero) and any(n.startswith(".ax_snapshot.json.") for n in zero)
    # Rank 1 wrote nothing: not the lock, the identity, the run's outputs, nor Hydra's job log (os.devnull on
    # ranks > 0, conf/config.yaml's lm_rank_log).
    assert _rank1_writes(a) == []
    assert not (a["out"] / HOLDER_NAME).exists() and not list(a["out"].glob("train_ddp_process_*.log"))
