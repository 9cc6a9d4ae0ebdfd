"""A real single-machine SLURM for the tests: munged, slurmctld and two slurmd on localhost.

Debian's packages (``apt-get install --no-install-recommends slurmctld slurmd slurm-client munge``;
Slurm 22.05 on Debian 12) run as plain child processes of the test session, in the foreground (``-D``,
``--foreground``: no systemd, no cgroups), with every file they write (the munge key and socket, the
controller's state, the nodes' spools, PID and log files) under one temp folder, and are stopped by
PID at the end. Two nodes are emulated on this one machine: ``slurmd -N n1`` and ``slurmd -N n2`` on
their own ports, both ``NodeHostname=localhost``; ``sbatch -N2`` then gives one task on each.

Settings that matter here (measured on a 2-core Debian 12 VM, running as root):

- ``ProctrackType=proctrack/pgid`` and ``TaskPlugin=task/none``: no cgroups needed (with
  ``proctrack/linuxproc`` a background child outlived its job).
- ``AuthInfo=...,cred_expire=10`` and ``SchedulerParameters=sched_interval=2,bf_interval=2``: a
  requeued job restarts ~15 s after ``scontrol requeue`` instead of ~145 s (its tasks end, then it waits
  cred_expire + 1 s, then for a scheduling pass). An outside requeue signals the tasks with SIGCONT and
  SIGTERM, and SIGKILL ``KillWait=30`` s later.
- ``SlurmdParameters=config_overrides``: the nodes are what this file says (2 CPUs each), whatever the
  machine has.
- The node names ``n1``/``n2`` do not resolve, so jobs get ``MASTER_ADDR=127.0.0.1`` (Lightning's
  SLURMEnvironment would otherwise use the first name of ``SLURM_NODELIST``). On a real cluster node
  names are hostnames and nothing is needed.

Slurm checks time limits (and sends ``--signal=SIG@N``) about every 30 s, so that signal lands
between N and N-30 s before the limit, not exactly at N.

Use the session fixture ``slurm_cluster`` (import it into a test module). It skips the tests, with the
reason, where the daemons are not installed or cannot start, unless ``LIGHTNING_MERGE_REQUIRE_SLURM=1``
(``.ci/run`` sets it): then it fails. ``python tests/slurm_cluster.py`` starts one by hand and prints
the ``SLURM_CONF`` to export; Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REQUIRE_ENV = "LIGHTNING_MERGE_REQUIRE_SLURM"
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
MARKER = "LM_TEST_SLURM_CLUSTER"  # in the daemons' environment (and so their slurmstepd's): finds leftovers

# Job states after which a job never runs again (scontrol's JobState).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})


class ClusterUnavailable(RuntimeError):
    """The daemons are not installed, or would not start; the message says which and why."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    return text[-n:]


def parse_record(line: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=value Key=value ...`` on one line) as a dict."""
    return dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", line.strip()))


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all children of this process, state under ``root``."""

    def __init__(self, root: str | os.PathLike | None = None, nodes: Sequence[str] = NODES,
                 cpus_per_node: int = CPUS_PER_NODE) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="lm-slurm-", dir="/tmp"))
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_s: float | None = None
        self._logs: list = []

    # ------------------------------------------------------------------------ environment

    @property
    def client_env(self) -> dict[str, str]:
        """The environment for sbatch/scontrol/...: this process's, less any enclosing job's SLURM_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    @staticmethod
    def missing() -> list[str]:
        """What this machine lacks to run the cluster (empty: nothing)."""
        out = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
        if os.geteuid() != 0:
            out.append("root (the daemons run as root with SlurmUser=root; munged as user munge)")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            out.append("the user `munge` (created by Debian's munge package)")
        return out

    # ------------------------------------------------------------------------ start / stop

    def _conf_text(self, ctld_port: int, node_ports: Sequence[int]) -> str:
        r = self.root
        lines = [
            "# Written by tests/slurm_cluster.py: a single-machine test cluster.",
            "ClusterName=lmtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=30",
            "InactiveLimit=0",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self._logs.append(log)
        env = dict(self.client_env, **{MARKER: str(self.root)})
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, **kw)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with code {p.returncode} during start-up:\n"
                                         + self.daemon_logs(name))

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        """Start munged, slurmctld and the slurmd's; return once every node is idle (else raise, stopped)."""
        t0 = time.monotonic()
        lacking = self.missing()
        if lacking:
            raise ClusterUnavailable("missing " + ", ".join(lacking)
                                     + " (apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)")
        try:
            self._start(timeout_s)
        except (OSError, subprocess.SubprocessError) as e:
            self.stop()
            raise ClusterUnavailable(f"could not start the daemons: {e}" + self.daemon_logs()) from e
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        munge = pwd.getpwnam("munge")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must reach its socket folder
        for d in ("state", "spool"):
            (self.root / d).mkdir(exist_ok=True)
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        mdir.chmod(0o755)  # clients connect to the socket in it
        key = mdir / "munge.key"  # our own key: nothing depends on /etc/munge
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        sock = mdir / "munge.socket.2"
        self._spawn("munged", [shutil.which("munged", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")),
                               "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}", "--num-threads=4"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[], cwd=mdir)
        while not sock.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not create {sock} in time:\n" + self.daemon_logs("munged"))
            time.sleep(0.05)

        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._conf_text(ctld_port, node_ports))
        sbin = "/usr/sbin:/sbin:" + os.environ.get("PATH", "")
        self._spawn("slurmctld", [shutil.which("slurmctld", path=sbin), "-D", "-f", str(self.conf)], cwd=self.root)
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [shutil.which("slurmd", path=sbin), "-D", "-f", str(self.conf), "-N", n],
                        cwd=self.root)
        states: dict[str, str] = {}
        while True:
            self._check_alive()
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
            if proc.returncode == 0:
                states = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
                if sorted(states) == sorted(self.nodes) and all(s.strip() == "idle" for s in states.values()):
                    return
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"the nodes were not idle within {timeout_s:g} s "
                                         f"(sinfo: {states or proc.stderr})" + self.daemon_logs())
            time.sleep(0.25)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Cancel every job, stop the daemons by PID (SIGTERM, then SIGKILL), kill leftover job processes."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--user=root", check=False, timeout=10)
                self._wait_until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False,
                                                      timeout=10).stdout.strip(), 15)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.kill_leftovers()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def kill_leftovers(self) -> list[int]:
        """SIGKILL, by PID, any process left from this cluster: a slurmstepd (it inherits the daemons'
        ``LM_TEST_SLURM_CLUSTER``) or a job's task (its ``SLURM_CONF`` is this cluster's)."""
        marks = (f"{MARKER}={self.root}".encode(), f"SLURM_CONF={self.conf}".encode())
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(m in environ for m in marks):
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
        return killed

    def daemon_logs(self, *names: str, n: int = 3000) -> str:
        names = names or tuple(self.procs)
        out = []
        for name in names:
            for path in (self.root / f"{name}.out", self.root / f"{name}.log",
                         self.root / "munge" / "munged.log" if name == "munged" else None):
                if path is not None and path.exists() and path.stat().st_size:
                    out.append(f"--- {path} (end) ---\n{_tail(path, n)}")
        return "\n" + "\n".join(out)

    # ------------------------------------------------------------------------ clients

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) against this cluster, with a timeout."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env if env is not None else self.client_env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed with exit code {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def sbatch(self, script: str | os.PathLike, *args: str, options: Iterable[str] = (),
               env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit ``script args`` with sbatch ``options``; the job's environment is ``env`` (all of it)."""
        proc = self.run("sbatch", "--parsable", *options, str(script), *args, cwd=cwd,
                        env=dict(env if env is not None else self.client_env, SLURM_CONF=str(self.conf)))
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict ({} once SLURM has forgotten it)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=15)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return parse_record(proc.stdout.splitlines()[0])

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def describe(self, job_id: str | None = None, *logs: str | os.PathLike) -> str:
        """What to print when a wait fails: ``scontrol show job``, the job logs' ends, squeue and sinfo."""
        out = []
        if job_id is not None:
            proc = self.run("scontrol", "show", "job", str(job_id), check=False, timeout=15)
            out.append(f"--- scontrol show job {job_id} ---\n{proc.stdout}{proc.stderr}")
        for path in logs:
            out.append(f"--- {path} (end) ---\n{_tail(Path(path), 6000)}")
        for argv in (("squeue", "-a"), ("sinfo", "-N")):
            proc = self.run(*argv, check=False, timeout=15)
            out.append(f"--- {' '.join(argv)} ---\n{proc.stdout}{proc.stderr}")
        return "\n".join(out) + self.daemon_logs("slurmctld", n=1500)

    def _wait_until(self, pred: Callable[[], object], timeout_s: float, poll_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while True:
            value = pred()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(poll_s)

    def wait(self, job_id: str, pred: Callable[[dict[str, str]], object], timeout_s: float, what: str,
             *logs: str | os.PathLike, poll_s: float = 0.5):
        """Poll ``scontrol show job`` until ``pred(record)`` is true; ``AssertionError`` with the job's
        record and logs after ``timeout_s``."""
        value = self._wait_until(lambda: pred(self.job(job_id)), timeout_s, poll_s)
        if not value:
            raise AssertionError(f"job {job_id}: not {what} within {timeout_s:g} s\n" + self.describe(job_id, *logs))
        return value

    def wait_done(self, job_id: str, timeout_s: float, *logs: str | os.PathLike) -> dict[str, str]:
        """Wait for the job to end; ``AssertionError`` (with its record and logs) unless it COMPLETED."""
        rec = self.wait(job_id, lambda r: r if r.get("JobState") in FINAL_STATES else None, timeout_s,
                        "finished", *logs)
        if rec["JobState"] != "COMPLETED":
            raise AssertionError(f"job {job_id} ended {rec['JobState']} ({rec.get('Reason')}, exit "
                                 f"{rec.get('ExitCode')})\n" + self.describe(job_id, *logs))
        return rec

    def cancel(self, *job_ids: str, timeout_s: float = 60.0) -> None:
        """scancel the jobs and wait until none of them runs any more."""
        ids = [str(j) for j in job_ids if j]
        if not ids:
            return
        self.run("scancel", *ids, check=False, timeout=15)
        self._wait_until(lambda: all(self.state(j) in FINAL_STATES or self.state(j) == "UNKNOWN" for j in ids),
                         timeout_s)


# ---------------------------------------------------------------------------- the pytest fixture

try:
    import pytest
except ImportError:  # run by hand without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm_cluster():
        """One cluster for the session; skipped with the reason where it cannot run (unless required)."""
        required = os.environ.get(REQUIRE_ENV) == "1"
        cluster = SlurmCluster()
        try:
            cluster.start()
        except ClusterUnavailable as e:
            shutil.rmtree(cluster.root, ignore_errors=True)
            if required:
                pytest.fail(f"{REQUIRE_ENV}=1 but the SLURM test cluster did not start: {e}", pytrace=False)
            pytest.skip(f"no SLURM test cluster: {str(e).splitlines()[0]}")
        print(f"\nSLURM test cluster up in {cluster.startup_s:.1f} s (SLURM_CONF={cluster.conf})", file=sys.stderr)
        try:
            yield cluster
        finally:
            cluster.stop()
            if os.environ.get("LM_KEEP_SLURM_CLUSTER_DIR") != "1":
                shutil.rmtree(cluster.root, ignore_errors=True)


def _main() -> int:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM):  # a background `&` job ignores SIGINT: take both back
        signal.signal(s, interrupt)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    print(f"up in {cluster.startup_s:.1f} s: export SLURM_CONF={cluster.conf}   (Ctrl-C or SIGTERM stops it)",
          flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
