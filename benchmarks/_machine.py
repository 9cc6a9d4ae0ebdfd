"""Machine-load helpers shared by the benchmarks: how busy other processes keep the CPUs.

On a shared 2-core machine a row measured while another process runs can be 3-10x slower, so every
benchmark reports that load next to its figures and can wait for a quiet machine first.
"""

from __future__ import annotations

import os
import time


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have spent busy (from /proc/stat; 0 if absent)."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (and its waited-for children) has used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(limit_s: float, other_max: float = 0.1) -> None:
    """Wait (up to ``limit_s``) until other processes keep < ``other_max`` CPUs busy for 3 s."""
    if limit_s <= 0:
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0, o0 = busy_cpu_seconds(), own_cpu_seconds()
        time.sleep(3)
        if (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / 3 < other_max:
            return
    print(f"  (machine still busy after {limit_s:.0f} s; running anyway)")
