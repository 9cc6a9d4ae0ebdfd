"""A lost rank ends the run at once, with a message that says which rank and how to resume.

When one rank of a job dies (SIGKILL, the OOM killer, a lost node), the others
are left inside a collective. On gloo and NCCL the peers of a dead process see
its sockets close and the collective raises at once ("Connection reset by
peer"); a rank that hangs instead is caught by the collective's timeout
(``strategy.timeout_s``, ``init_process_group(timeout=...)``). Either way the
error is a ``RuntimeError`` that says nothing about which rank is gone, and the
trial loop must not mistake it for a failed trial (the trial was fine; the job
is not). So:

- :func:`is_comm_failure` tells a failed collective from a failed trial (the
  loop re-raises the first);
- :class:`RankWatch` knows every rank's host and pid (gathered once, when the
  ranks connect) and, on the process that launched the others (Lightning's
  subprocess launcher), watches its children: a child that dies is reported
  within a tenth of a second, by rank, pid and signal, even while rank 0 is in a long
  forward and has not yet reached the collective that will fail;
- :func:`guard` turns the failed collective into :class:`RankLostError` naming
  the rank, which the CLI prints and exits 4 with. The ledger already holds
  every completed trial; the one in flight stays ``running`` there, and the next
  run marks it failed and evaluates its point again.

Knows ranks and processes, not Lightning's internals beyond the launcher's
``procs`` list, nor Hydra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator

import torch

from .errors import RankLostError

__all__ = ["RankWatch", "guard", "is_comm_failure"]

log = logging.getLogger(__name__)

# What gloo, NCCL and the c10d store say when a peer is gone or a collective timed out.
_COMM_PATTERNS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                  "Timed out waiting", "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL error", "NCCL communicator",
                  "Watchdog caught collective operation timeout", "TCPStore", "recvValue failed",
                  "Socket Timeout", "failed to recv", "failed to send")


def is_comm_failure(e: BaseException) -> bool:
    """True for an error of a collective or the process group (a peer died or hung), not of a trial."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e) for p in _COMM_PATTERNS)


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class RankWatch:
    """Every rank's ``(host, pid)``, and a watcher of the ranks this process launched.

    ``roster[r]`` is rank ``r``'s ``(host, pid)`` (gathered by the Evaluator when the ranks
    connect). ``children`` maps global rank -> ``subprocess.Popen`` for the ranks this
    process started (Lightning's launcher on rank 0); :meth:`start` polls them on a daemon
    thread and logs the first death at once.
    """

    def __init__(self, rank: int, roster: list[tuple[str, int]], children: dict[int, object] | None = None,
                 timeout_s: float | None = None, poll_s: float = 0.1) -> None:
        self.rank = rank
        self.roster = roster
        self.children = children or {}
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.lost: list[tuple[int, str]] = []  # (rank, how), as found
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RankWatch:
        if self.children and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="lightning-merge-rank-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._check_children():
                return

    def _check_children(self) -> bool:
        found = False
        for r, proc in sorted(self.children.items()):
            code = proc.poll()
            if code not in (None, 0) and all(r != lr for lr, _ in self.lost):
                how = _how(code)
                self.lost.append((r, how))
                log.error("rank %d (pid %d) %s; every rank stops now (the run resumes from its ledger)",
                          r, proc.pid, how)
                found = True
        return found

    def diagnose(self, settle_s: float = 2.0) -> str:
        """Which rank is gone, as far as this process can tell: its children, then pids on this host.

        A killed process closes its sockets (which fails our collective) a moment before it can be
        reaped, so the checks are repeated for up to ``settle_s`` until one finds the dead rank.
        """
        host = socket.gethostname()
        end = time.monotonic() + settle_s
        while True:
            self._check_children()
            found = [f"rank {r} (pid {self.children[r].pid}) {how}" for r, how in self.lost]
            for r, (h, pid) in enumerate(self.roster):
                if r == self.rank or r in self.children or h != host:
                    continue
                if not _alive(pid):
                    found.append(f"rank {r} (pid {pid} on {h}) is gone")
            if found:
                return "; ".join(found)
            if time.monotonic() >= end:
                break
            time.sleep(0.02)
        others = sorted({h for h, _ in self.roster} - {host})
        where = f" on {', '.join(others)}" if others else ""
        return (f"no rank on this host ({host}) has died, so a rank{where} died or hung, or the network "
                f"failed (see the other ranks' logs; srun names the task that failed)")


@contextlib.contextmanager
def guard(watch_of: Callable[[], RankWatch | None], timeout_s: float | None = None) -> Iterator[None]:
    """Turn a failed collective into :class:`RankLostError` naming the lost rank (see the module docstring).

    ``watch_of()`` gives the run's :class:`RankWatch` when the error arrives (it exists once the
    ranks have connected).
    """
    try:
        yield
    except Exception as e:
        if not is_comm_failure(e) or isinstance(e, RankLostError):
            raise
        watch = watch_of()
        who = watch.diagnose() if watch is not None else "another rank died or hung"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        limit = f" (strategy.timeout_s={timeout_s:g})" if timeout_s else ""
        msg = (f"a collective failed on rank {watch.rank if watch else '?'}: {who}. Every rank stops instead of "
               f"waiting{limit}. The run folder holds every completed trial and the trial in flight is re-run: "
               f"run the same command again to resume. The collective's error: {first}")
        raise RankLostError(msg) from e
