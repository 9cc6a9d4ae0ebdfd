"""Test-only: record every write a Python process makes under a folder (``sys.addaudithook``).

Put this folder first on ``PYTHONPATH`` and set ``LM_WRITE_AUDIT_ROOT`` (the folder watched, e.g. a
run folder) and ``LM_WRITE_AUDIT_DIR`` (where the logs go, outside the root). Every process that
starts then appends one line per write-like event under the root (an open for writing, a rename or
replace, mkdir, remove, rmdir, truncate, chmod) to ``<DIR>/rank<R>-<pid>.log``, where ``R`` is
``RANK``, ``SLURM_PROCID`` or ``LOCAL_RANK`` (``-`` if none). The tests read the logs to check
that only global rank 0 writes a run folder. Python's audit hooks see every such call made through
Python (``open``, ``os.open``, ``os.replace``, ``shutil``); C extensions writing with their own
``fopen`` are not seen, so tests also compare the folder's files before and after.
"""

import os
import sys

_ROOT = os.environ.get("LM_WRITE_AUDIT_ROOT")
_DIR = os.environ.get("LM_WRITE_AUDIT_DIR")

if _ROOT and _DIR:
    _ROOT = os.path.realpath(_ROOT)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _busy = []

    def _rank() -> str:
        for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
            if var in os.environ:
                return os.environ[var]
        return "-"

    def _under(path) -> bool:
        try:
            p = os.fsdecode(path) if not isinstance(path, int) else None
        except TypeError:
            return False
        if not p:
            return False
        p = os.path.realpath(os.path.abspath(p))
        return p == _ROOT or p.startswith(_ROOT + os.sep)

    def _log(event: str, path) -> None:
        _busy.append(1)
        try:
            os.makedirs(_DIR, exist_ok=True)
            with open(os.path.join(_DIR, f"rank{_rank()}-{os.getpid()}.log"), "a") as f:
                f.write(f"{event}\t{os.fsdecode(path)}\n")
        finally:
            _busy.pop()

    def _hook(event: str, args) -> None:
        if _busy:
            return
        try:
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                         (isinstance(flags, int) and flags & _WRITE_FLAGS)
                if writes and _under(path):
                    _log(event, path)
            elif event in ("os.rename", "os.link", "os.symlink"):
                for p in args[:2]:
                    if _under(p):
                        _log(event, p)
            elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.utime",
                           "shutil.rmtree", "shutil.move", "shutil.copyfile"):
                cand = args[:2] if event in ("shutil.move", "shutil.copyfile") else args[:1]
                for p in cand:
                    if not isinstance(p, int) and _under(p):
                        _log(event, p)
        except Exception:  # an audit hook must never break the process it watches
            pass

    sys.addaudithook(_hook)
