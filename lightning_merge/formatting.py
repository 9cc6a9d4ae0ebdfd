"""How the report and the model card write numbers, weights and the command that made a run.

Its own module so that ``report`` and ``card`` both build on it without importing
each other at load time.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["command_line", "lmeval_table"]


def _gain(loss: float, ref: float) -> float:
    """Relative improvement over ``ref`` in percent (positive is better)."""
    return 100.0 * (ref - loss) / ref


def _w(weights: Sequence[float]) -> str:
    return "[" + ", ".join(f"{w:.3f}" for w in weights) + "]"


def command_line() -> str:
    """The command that made this run, as typed: the program and its overrides, shell-quoted.

    The program is ``lightning-merge`` for the console script, else ``python -m
    lightning_merge``; the overrides are ``sys.argv`` as given. One point of a
    sweep (``-m``) is given as the single run it is: its own overrides (Hydra's
    ``overrides.task``, not the sweep's comma lists) and its folder as ``output_dir``.
    Called from Python (``driver.run``, no Hydra job), ``sys.argv`` is another
    program's, and the line says so instead of inventing a command.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    script = Path(sys.argv[0]).name == "lightning-merge"
    prog = "lightning-merge" if script else "python -m lightning_merge"
    args = sys.argv[1:]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hc = HydraConfig.get()
        args = [o for o in hc.overrides.task if not o.startswith("output_dir=")]
        args.append(f"output_dir={hc.runtime.output_dir}")
    elif not (HydraConfig.initialized() or script
              or Path(sys.argv[0]).resolve() == Path(__file__).with_name("__main__.py").resolve()):
        return "(not run from the command line: lightning_merge.driver.run was called from Python)"
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def lmeval_table(lmeval: dict | None) -> list[str]:
    """The lm-eval report tasks as markdown lines: one row per candidate, a column per task and metric."""
    rows = (lmeval or {}).get("rows") or []
    if not rows:
        return []
    cols = [(t, m) for t, ms in rows[0]["metrics"].items() for m in ms]
    lines = ["| candidate | " + " | ".join(f"{t} {m.removesuffix(',none')}" for t, m in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        vals = " | ".join(f"{r['metrics'].get(t, {}).get(m, float('nan')):.4f}" for t, m in cols)
        lines.append(f"| {r['name']} | {vals} |")
    shots, limit = lmeval.get("num_fewshot"), lmeval.get("limit")
    limit = "none" if limit is None else f"{limit:g}" + (" items per task" if limit >= 1 else " of each task")
    lines += ["", f"lm-evaluation-harness, scored on the merge in place; limit {limit}, "
                  f"few-shot {'as each task says' if shots is None else shots}, seed {lmeval.get('seed')}."]
    return lines
