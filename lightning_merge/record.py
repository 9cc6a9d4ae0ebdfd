"""Hydra's record of a run (``.hydra/``), written only once the run is accepted.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` at
job start, before the task has checked anything. In a deterministic run folder
that is wrong: a run that is then refused (a resume whose config changed, see
``ledger.check_fingerprint``) has already overwritten the record of the run
whose trials are in that folder, and the sweep summary (``summary.py``) would
report the refused overrides next to the old results. So ``conf/config.yaml``
sets ``hydra.output_subdir: null`` and the driver calls
:func:`write_hydra_record` at its acceptance point: for ``mode=search`` after
the resume check, for the other modes after the checkpoints (and data) are
opened. The three files hold what Hydra would have written (``_save_config``
in ``hydra/core/utils.py``), each published atomically, ``overrides.yaml``
last (the summary reads it).

History: an accepted run may follow another accepted run in the same folder
with other overrides (a resume with a bigger ``search.trials``, or
``search.restart=true``). The earlier record is then moved to
``.hydra/attempts/N/`` (N = 1, 2, ... oldest first) rather than overwritten,
so the folder still says how each part of its ledger was made. A rerun with
the same config and overrides only refreshes ``hydra.yaml`` (its runtime
fields: cwd, job id).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .io import atomic_write_text, fsync_dir

__all__ = ["RECORD_FILES", "record_texts", "write_hydra_record"]

log = logging.getLogger(__name__)

RECORD_DIR = ".hydra"
RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # the order they are written in


def record_texts(task_cfg: Any, hydra_cfg: Any) -> dict[str, str]:
    """The three files as Hydra writes them: the task config and the hydra node unresolved, the task overrides."""
    from omegaconf import OmegaConf

    return {"config.yaml": OmegaConf.to_yaml(task_cfg),
            "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def _archive(folder: Path) -> Path:
    """Move the record in ``folder`` to ``folder/attempts/N`` (the next free N)."""
    attempts = folder / "attempts"
    taken = [int(p.name) for p in attempts.iterdir() if p.name.isdigit()] if attempts.is_dir() else []
    dest = attempts / str(max(taken, default=0) + 1)
    dest.mkdir(parents=True)
    for name in RECORD_FILES:
        if (folder / name).exists():
            os.replace(folder / name, dest / name)
    fsync_dir(dest)
    fsync_dir(folder)
    return dest


def write_hydra_record(output_dir: str | os.PathLike, task_cfg: Any, hydra_cfg: Any = None) -> Path | None:
    """Write ``output_dir/.hydra/{config,hydra,overrides}.yaml`` for an accepted run; return the folder.

    ``hydra_cfg`` defaults to the running job's (``HydraConfig``); without a
    Hydra job (the Python API) there is nothing to record and ``None`` is
    returned. Nothing is written either when ``hydra.output_subdir`` is set
    (the user asked Hydra to write its record itself, at job start). An
    earlier record with another config or other overrides is kept in
    ``.hydra/attempts/N/`` (see the module docstring). Call it on rank 0 only.
    """
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.instance().cfg
    if hydra_cfg.hydra.get("output_subdir") is not None:
        return None
    texts = record_texts(task_cfg, hydra_cfg)
    folder = Path(output_dir) / RECORD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    old = {n: (folder / n).read_text(encoding="utf-8") if (folder / n).is_file() else None
           for n in ("config.yaml", "overrides.yaml")}
    if any(v is not None for v in old.values()) and old != {n: texts[n] for n in old}:
        dest = _archive(folder)
        log.info("an earlier run in %s had other overrides; its record is kept in %s", output_dir, dest)
    for name in RECORD_FILES:
        atomic_write_text(folder / name, texts[name])
    return folder
