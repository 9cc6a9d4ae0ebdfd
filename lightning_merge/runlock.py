"""One writer per run folder: global rank 0 holds an OS lock on ``<run>/.lightning_merge.lock`` for the run's life.

Why. Two processes in one run folder (a user's second terminal, a requeued job
whose old incarnation is still exiting, a sweep point launched twice)
interleave its ledger and overwrite each other's snapshot and results. The
ledger's own check (``ledger.py``) finds that only at the next resume, after
both runs' compute is spent. The lock refuses the second run at once, before
any heavy work and before it changes anything in the folder.

The lock: ``fcntl.lockf`` (a POSIX record lock on the whole file, F_SETLK,
non-blocking) on a file that is never deleted (deleting a lock file lets two
processes lock two different inodes), held by a descriptor open for the
process's life. Why POSIX ``lockf`` and not ``flock``:

- POSIX locks are the ones network filesystems send to the server: NFSv3
  (NLM), NFSv4 (in the protocol), Lustre mounted ``-o flock``, GPFS, CephFS.
  ``flock`` is node-local on NFS mounted ``local_lock=flock`` (or ``all``) and
  on old clients, and a node-local lock is the worst outcome: it silently lets
  a job on another node in.
- A POSIX lock belongs to the process and is never inherited across fork, so
  a forked child of rank 0 (a DataLoader worker, a multiprocessing fork) that
  outlives it cannot keep the folder locked. A ``flock`` lock belongs to the
  open file description, which a forked child shares.
- Its price: a process loses its POSIX lock when it closes *any* descriptor of
  the file. So this module never opens the lock file twice in one process (a
  registry of held lock files by device and inode, found with ``stat``, refuses
  a second :class:`RunLock` by any path before opening anything), the holder's
  identity lives in another file, and nothing else opens the lock file (its
  name starts with a dot; the tool's folder scans skip those). The descriptor
  is close-on-exec (Python's default), so exec'd children (Lightning's DDP
  launcher, ``subprocess``) never hold it.

A SIGKILLed holder's lock is released by the kernel; a lost NFS client's by the
server when its lease expires (about 90 s on NFSv4). No PID guessing is needed
for correctness. NFS gives no fencing: a partitioned node that comes back after
its lease expired may still write; the ledger's check stays as the backstop.

Identity: ``.lightning_merge.holder.json`` (host, pid, SLURM job id, array id,
restart count, start time, command), published atomically once the lock is
taken and removed at release (under the lock). So an identity the next holder
finds means the previous run ended without releasing (killed, node lost); that
is logged. It is read only for messages: it may be stale, half-written or
missing, and every reader copes.

The same SLURM job: a requeued job keeps its job id and SLURM raises
``SLURM_RESTART_COUNT``. When the holder is this job at a lower restart count
(its previous incarnation, still exiting, or its lost node's lease not yet
expired), the lock is waited for, up to ``LIGHTNING_MERGE_LOCK_WAIT_S``
(default 120 s, above NFSv4's 90 s lease), then refused. The same job at the
same count is another step of the same allocation (two ``srun`` on one folder):
refused at once.

No lock support (``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS``: Lustre without
``-o flock``, NFSv3 without lockd): refused, saying to move ``output_dir`` or to
set ``LIGHTNING_MERGE_NO_LOCK=1``. A warning in the log of an unattended job
protects nothing, while the refusal costs seconds and the opt-out is one
variable; under it the ledger's two-writers check is the only guard.

Ranks: only global rank 0 takes the lock (the driver decides; this module
knows no ranks). Other ranks never open these files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError
from .io import atomic_write_json

__all__ = ["RunLock", "read_holder", "identity", "LOCK_NAME", "HOLDER_NAME", "NO_LOCK_ENV", "WAIT_ENV"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lightning_merge.lock"
HOLDER_NAME = ".lightning_merge.holder.json"
NO_LOCK_ENV = "LIGHTNING_MERGE_NO_LOCK"  # "1": run without the lock (a filesystem without lock support)
WAIT_ENV = "LIGHTNING_MERGE_LOCK_WAIT_S"  # the wait for this SLURM job's previous incarnation
WAIT_S = 120.0
POLL_S = 0.25
_BUSY = {errno.EACCES, errno.EAGAIN}
_NO_SUPPORT = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_held: dict[tuple[int, int], "RunLock"] = {}  # lock file (device, inode) -> its holder in this process
_held_guard = threading.Lock()


def identity() -> dict:
    """This process as the holder's file records it (also what a refusal names)."""
    env = os.environ
    array = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" \
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else None
    restart = env.get("SLURM_RESTART_COUNT", "")
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID") or None,
            "slurm_array": array, "slurm_restart_count": int(restart) if restart.isdigit() else None,
            "started": now,
            "started_utc": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv))[:2000]}


def read_holder(folder: str | os.PathLike) -> dict | None:
    """The recorded holder of ``folder``'s lock, or None (none recorded, or unreadable: a hint, never trusted)."""
    try:
        data = json.loads((Path(folder) / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """The run folder's lock: ``acquire()`` (or ``with RunLock(folder):``), held until ``release()`` or exit.

    ``acquire`` raises :class:`~lightning_merge.config.ConfigError` naming the holder when another
    process (or this one) holds the folder; see the module docstring for the rules.
    ``wait_s`` overrides ``LIGHTNING_MERGE_LOCK_WAIT_S`` (the wait for this job's previous incarnation).
    """

    def __init__(self, folder: str | os.PathLike, wait_s: float | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait_s = wait_s
        self.holder: dict | None = None  # this process's identity while it holds the lock
        self._fd: int | None = None
        self._pid: int | None = None
        self._key: tuple[int, int] | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        if os.environ.get(NO_LOCK_ENV) == "1":
            log.warning("%s=1: %s is not locked; a second run in it would interleave its ledger (refused only "
                        "at the next resume)", NO_LOCK_ENV, self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = _file_key(self.path)
        with _held_guard:  # checked before any open: closing a second descriptor would drop this process's lock
            if key in _held:
                raise ConfigError(f"output_dir {self.folder} is already in use by this process (pid {os.getpid()}): "
                                  "one run folder has one writer. Give this run its own output_dir=...")
            _held[key] = self
        try:
            self._take()
        except BaseException:
            with _held_guard:
                _held.pop(key, None)
            raise
        self._key = key
        return self

    def _take(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # close-on-exec: Python's default
        me, deadline, t0 = identity(), None, time.monotonic()
        try:
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno in _NO_SUPPORT:
                        raise ConfigError(_no_support(self.folder, e)) from None
                    if e.errno not in _BUSY:
                        raise
                holder = _read_settled(self.folder)
                if deadline is None and _own_previous(holder, me):
                    wait = _wait_s(self.wait_s)
                    deadline = t0 + wait
                    log.warning("%s is held by this SLURM job's previous run (%s); waiting up to %.0f s (%s) for "
                                "it to exit", self.folder, _describe(holder), wait, WAIT_ENV)
                if deadline is None or time.monotonic() >= deadline:
                    _detach_file_logs(self.folder)
                    raise ConfigError(_refusal(self.folder, holder, me, time.monotonic() - t0 if deadline else None))
                time.sleep(POLL_S)
            if deadline is not None:
                log.info("%s: this job's previous run released it after %.1f s", self.folder, time.monotonic() - t0)
            previous = read_holder(self.folder)
            if previous is not None:
                log.warning("%s: taking over the lock of a run that ended without releasing it (killed, or its "
                            "node lost): %s", self.folder, _describe(previous))
            atomic_write_json(self.folder / HOLDER_NAME, me)
        except BaseException:
            os.close(fd)  # drops the lock if it was taken
            raise
        self._fd, self._pid, self.holder = fd, os.getpid(), me

    def release(self) -> None:
        """Remove the identity and unlock (idempotent). In a forked child only its copy of the descriptor closes."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.getpid() == self._pid:
            try:
                (self.folder / HOLDER_NAME).unlink(missing_ok=True)
            except OSError as e:  # the lock still goes; the next holder only logs a stale identity
                log.warning("could not remove %s: %s", self.folder / HOLDER_NAME, e)
            with _held_guard:
                _held.pop(self._key, None)
        os.close(fd)  # the kernel drops this process's POSIX lock with it


def _file_key(path: Path) -> tuple[int, int]:
    """The lock file's (device, inode), found without opening a file this process may hold (any path to it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))  # a new file: no lock of ours on it to lose
        st = os.stat(path)
    return st.st_dev, st.st_ino


def _read_settled(folder: Path) -> dict | None:
    """The holder's identity; a holder writes it just after locking, so a missing one is read once more."""
    holder = read_holder(folder)
    if holder is None:
        time.sleep(0.2)
        holder = read_holder(folder)
    return holder


def _restart(rec: dict) -> int:
    try:
        return int(rec.get("slurm_restart_count") or 0)
    except (TypeError, ValueError):
        return 0


def _own_previous(holder: dict | None, me: dict) -> bool:
    """The holder is this SLURM job's earlier incarnation (same job id, lower restart count)."""
    return bool(holder and me["slurm_job_id"] and str(holder.get("slurm_job_id")) == me["slurm_job_id"]
                and _restart(me) > _restart(holder))


def _wait_s(given: float | None) -> float:
    if given is not None:
        return float(given)
    text = os.environ.get(WAIT_ENV)
    try:
        return float(text) if text else WAIT_S
    except ValueError:
        raise ConfigError(f"{WAIT_ENV}={text!r}: give the seconds to wait as a number") from None


def _describe(h: dict | None) -> str:
    """``pid 123 on host gpu-07, SLURM job 4242 (array 4240_2, restart 1), since ... (5 min ago): `cmd```."""
    if not h:
        return "unknown (its identity file could not be read)"
    parts = [f"pid {h.get('pid', '?')} on host {h.get('host', '?')}"]
    if h.get("slurm_job_id"):
        extra = [f"array {h['slurm_array']}"] if h.get("slurm_array") else []
        if h.get("slurm_restart_count") is not None:
            extra.append(f"restart {h['slurm_restart_count']}")
        parts.append(f"SLURM job {h['slurm_job_id']}" + (f" ({', '.join(extra)})" if extra else ""))
    text = ", ".join(parts)
    if isinstance(h.get("started"), (int, float)):
        ago = max(0.0, time.time() - h["started"])
        ago_s = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
        text += f", running since {h.get('started_utc', '?')} ({ago_s} ago)"
    if h.get("command"):
        cmd = str(h["command"]).replace("\n", "\\n")
        text += f": `{cmd[:300]}{' ...' if len(cmd) > 300 else ''}`"
    return text


def _refusal(folder: Path, h: dict | None, me: dict, waited: float | None) -> str:
    how = []
    if h and h.get("slurm_job_id"):
        how.append(f"`scancel {h.get('slurm_array') or h['slurm_job_id']}`")
    if h and h.get("pid"):
        how.append(f"`kill {h['pid']}`" + (f" on {h.get('host')}" if h.get("host") != me["host"] else ""))
    stale = ""
    if h and h.get("host") == me["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
        stale = (f" (no process {h['pid']} runs on this host now, so that record is stale; a live process holds "
                 f"the lock: `fuser {folder / LOCK_NAME}` names it)")
    waited_s = f" This SLURM job's previous run did not release it within {waited:.0f} s ({WAIT_ENV})." \
        if waited is not None else ""
    return (f"output_dir {folder} is in use by another run: {_describe(h)}{stale}.{waited_s} One run folder has one "
            f"writer (two would interleave its ledger and overwrite each other's results). Wait for that run to "
            f"end, or stop it ({' or '.join(how) or 'find it with `fuser ' + str(folder / LOCK_NAME) + '`'}) and "
            f"run this command again (a search resumes the folder's trials); or give this run its own output_dir=...")


def _no_support(folder: Path, e: OSError) -> str:
    code = errno.errorcode.get(e.errno, e.errno)
    return (f"output_dir {folder}: its filesystem does not support file locks ({code}: {e.strerror}), so a "
            f"second run in this folder could not be refused (e.g. Lustre mounted without `-o flock`, NFSv3 "
            f"without lockd). Give an output_dir on a filesystem with locks, or set {NO_LOCK_ENV}=1 to run without "
            f"the lock if you make sure yourself that one run writes this folder at a time (two would interleave "
            f"its ledger; the next resume would then refuse it)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _detach_file_logs(folder: Path) -> None:
    """A refused process writes nothing into a folder another run holds, not even its log.

    Hydra opens ``<run>/<job name>.log`` (its ``job_logging`` file handler) before the task runs; the
    refusal would be appended to the holder's log. Such handlers are closed, so it goes to the console only.
    """
    root = os.path.realpath(folder) + os.sep
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in list(getattr(lg, "handlers", ())):
            name = getattr(h, "baseFilename", None)
            if name and os.path.realpath(name).startswith(root):
                lg.removeHandler(h)
                h.close()
