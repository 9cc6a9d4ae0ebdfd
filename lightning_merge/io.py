"""Atomic file and directory publishing, and the append-only JSONL ledger.

Every output of a run is either whole or absent: files are written to a
temporary sibling and renamed into place (``os.replace`` is atomic on POSIX
within one filesystem), and directories are built under a temporary name and
renamed when complete. A reader that sees a path therefore sees all of it,
which is what lets a requeued job trust whatever it finds in its run
directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import disk_full

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "publishing_dir",
    "append_jsonl",
    "read_jsonl",
    "fsync_dir",
    "cut_torn_tail",
    "sweep_leftovers",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse O_RDONLY on dirs
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; publish with normal permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(path, len(text.encode("utf-8")), path.name) from e
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON and publish it atomically at ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def publishing_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that is renamed to ``final`` when the block succeeds.

    On an exception the temporary folder is removed and ``final`` is left as it
    was. With ``overwrite`` an existing ``final`` is replaced only after the new
    folder is complete (moved aside, renamed in, then deleted), so at every
    moment ``final`` is either the old whole folder or the new whole folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or allow overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as a line and fsync it before returning.

    A line is written with a single ``write`` call so that a kill leaves at most
    one torn final line, which :func:`read_jsonl` skips. That torn line is cut
    off before the next append (it was never a record), so the new line does not
    join onto it and leave a corrupt line in the middle of the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False) + "\n"
    cut_torn_tail(path)
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:  # one write call: a kill leaves at most one torn line
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            with contextlib.suppress(OSError):  # no half line left behind: the file is as it was
                os.ftruncate(fd, start)
            raise disk_full(path, len(data), f"a line of {path.name}") from e
    finally:
        os.close(fd)


def cut_torn_tail(path: Path) -> None:
    """Truncate an unterminated last line (a kill mid-write) back to the last newline."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Find the last newline: the torn tail starts after it (or the file is one torn line).
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                fh.truncate(start + i + 1)
                break
            pos = start
        else:
            fh.truncate(0)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL ledger, ignoring a torn (unterminated, unparsable) last line."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # torn tail from a kill mid-write
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return out


_LEFTOVER = re.compile(r"^\..+(\.tmp|\.partial|\.old-\d+)$")


def sweep_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove what interrupted atomic writes left under ``folder``; return what was removed.

    A process killed mid-write leaves its temporary sibling (``.<name>.<random>.tmp``, a
    ``.<name>.<random>.partial`` folder, or a ``.<name>.old-<pid>`` folder being replaced). No
    reader takes them (their names start with a dot), but they hold disk space, which matters
    after a full disk. Call it only while holding the folder's lock (runlock.py): another
    writer's temporary file in flight would otherwise be taken from under it.
    """
    removed: list[Path] = []
    for root, dirs, files in os.walk(folder):
        if Path(root) == Path(folder) and "training_run" in dirs:
            dirs.remove("training_run")  # the live demo's trainer (another process, not under the lock) writes there
        for name in list(dirs):
            if _LEFTOVER.match(name):
                shutil.rmtree(Path(root) / name, ignore_errors=True)
                removed.append(Path(root) / name)
                dirs.remove(name)
        for name in files:
            if _LEFTOVER.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(root) / name)
                    removed.append(Path(root) / name)
    return removed
