"""The sweep summary: one table (and one figure) over the runs of a Hydra multirun.

A sweep (``python -m lightning_merge -m search.alpha=0,0.5``) writes one run
directory per point under ``hydra.sweep.dir``, named by Hydra's
``override_dirname`` (``search.alpha=0.5``), each with its ``results.json``
and ``.hydra/overrides.yaml`` (written once the run is accepted, see
``record.py``: a point refused by its checks leaves no record, and an earlier
run's record is never overwritten by it). :func:`summarize` reads them all and publishes
``summary.json``, ``summary.md`` and ``summary.png`` in the sweep directory;
it runs at the end of every sweep through the :class:`SweepSummary` Hydra
callback (``hydra.callbacks.sweep_summary`` in conf/config.yaml), and by hand
with ``python -m lightning_merge.summary SWEEP_DIR``.

The sweep directory is deterministic, not timestamped, so a second sweep
into the same folder adds its runs to the earlier ones: the summary covers
every finished run found there. A run with no ``results.json`` (still
running, killed, failed) is skipped with a warning and listed as skipped.
Nothing is recomputed: every number is read from the runs' results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .io import atomic_write_json, atomic_write_text

__all__ = ["NoRunsError", "find_runs", "load_run", "summarize", "SweepSummary", "main"]

log = logging.getLogger(__name__)


class NoRunsError(FileNotFoundError):
    """The sweep folder holds no finished run (no ``results.json`` in any subfolder)."""


# --- reading runs ------------------------------------------------------------------------------

def _is_run(d: Path) -> bool:
    return (d / "results.json").is_file() or (d / ".hydra" / "overrides.yaml").is_file()


def find_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Run directories below ``sweep_dir``: folders with ``results.json`` or ``.hydra/overrides.yaml``.

    A run's own subfolders (the merged model, ``.hydra``) are not searched, and
    neither are hidden or temporary folders.
    """
    sweep_dir = Path(sweep_dir)
    runs = []
    for root, dirs, _ in os.walk(sweep_dir):
        here = Path(root)
        if here != sweep_dir and _is_run(here):
            runs.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return runs


def _parse_override(s: str) -> tuple[str, Any]:
    """``"search.alpha=0.5"`` -> ``("search.alpha", 0.5)``; ``+``/``++``/``~`` prefixes dropped."""
    import yaml

    key, _, raw = s.partition("=")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.lstrip("+~"), json.loads(json.dumps(value, default=str))  # YAML dates etc. as strings


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _gain(loss, ref) -> float | None:
    """Relative improvement over ``ref`` in percent (positive is better), as report.py defines it."""
    loss, ref = _num(loss), _num(ref)
    return 100.0 * (ref - loss) / ref if loss is not None and ref else None


def load_run(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None) -> dict:
    """One summary row from a run directory. Raises ``FileNotFoundError``/``ValueError`` if incomplete."""
    import yaml

    run_dir = Path(run_dir)
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no results.json yet (still running, killed or failed)")
    try:
        res = json.loads(res_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir}: results.json is not valid JSON ({e})") from None
    ov_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in (yaml.safe_load(ov_path.read_text(encoding="utf-8")) or [])] \
        if ov_path.is_file() else []
    best = res.get("best") or {}
    cands = res.get("candidates") or []
    singles = [c for c in cands if c.get("kind") == "checkpoint"]
    last = singles[-1] if singles else {}
    ood_best, ood_last = best.get("ood_loss") or {}, last.get("ood_loss") or {}
    name = run_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else run_dir.name
    gain = res.get("gain_vs_last_percent")
    return {
        "run": name,
        "path": str(run_dir),
        "overrides": overrides,
        "params": dict(_parse_override(o) for o in overrides),
        "best_weights": best.get("weights"),
        "best_heldout_loss": _num(best.get("heldout_loss")),
        "last_checkpoint_loss": _num(last.get("heldout_loss")),
        "gain_vs_last_percent": _num(gain) if gain is not None
        else _gain(best.get("heldout_loss"), last.get("heldout_loss")),
        "gain_vs_best_single_percent": _num(res.get("gain_vs_best_single_percent")),
        "ood_gain_vs_last_percent": {n: _gain(ood_best.get(n), ood_last.get(n))
                                     for n in list(ood_best) + [n for n in ood_last if n not in ood_best]},
        "search_objective": _num(best.get("search_objective")),
        "trials": res.get("trials"),
        "merged_dir": res.get("merged_dir"),
    }


def _varying(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between runs (absent counts as a value)."""
    keys = []
    for r in rows:
        keys += [k for k in r["params"] if k not in keys]
    return [k for k in keys if len({json.dumps(r["params"].get(k, "<absent>"), sort_keys=True, default=str)
                                    for r in rows}) > 1]


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


# --- writing -----------------------------------------------------------------------------------

def _f(x, fmt: str = "{:.4f}") -> str:
    return fmt.format(x) if x is not None else "n/a"


def _w(ws) -> str:
    return "[" + ", ".join(f"{w:.3f}" for w in ws) + "]" if ws else "n/a"


def _markdown(summary: dict) -> str:
    rows, ood = summary["runs"], summary["ood_sets"]
    head = ["run", "overrides", "best weights", "best held-out loss", "last-checkpoint loss",
            "gain vs last %", "trials"] + [f"{n} gain vs last %" for n in ood]
    lines = [f"# Sweep summary: `{summary['sweep_dir']}`", "",
             f"{len(rows)} finished run(s)" + (f"; varying: {', '.join(summary['varying'])}"
                                               if summary["varying"] else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['run']}`", " ".join(f"`{o}`" for o in r["overrides"]) or "-", _w(r["best_weights"]),
                 _f(r["best_heldout_loss"]), _f(r["last_checkpoint_loss"]),
                 _f(r["gain_vs_last_percent"], "{:+.2f}"), str(r["trials"] if r["trials"] is not None else "n/a")]
        cells += [_f(r["ood_gain_vs_last_percent"].get(n), "{:+.2f}") for n in ood]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("Gains are relative to the last checkpoint of the same run, in percent of its loss "
                   "(positive = the merge has lower loss).")]
    if summary["skipped"]:
        lines += ["", "## Skipped (not finished)", ""] + [f"- `{s['run']}`: {s['reason']}" for s in summary["skipped"]]
    if summary.get("figure"):
        lines += ["", f"![sweep summary]({summary['figure']})"]
    return "\n".join(lines) + "\n"


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {summary['sweep_dir']} ({len(summary['runs'])} runs)")
    for col, right in [("run", False), ("best weights", False), ("best loss", True), ("last ckpt", True),
                       ("gain vs last", True), ("trials", True)] + [(f"{n} gain", True) for n in summary["ood_sets"]]:
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for r in summary["runs"]:
        table.add_row(r["run"], _w(r["best_weights"]), _f(r["best_heldout_loss"]), _f(r["last_checkpoint_loss"]),
                      _f(r["gain_vs_last_percent"], "{:+.2f}%"), str(r["trials"]),
                      *[_f(r["ood_gain_vs_last_percent"].get(n), "{:+.2f}%") for n in summary["ood_sets"]])
    con = Console(width=max(Console().width, 120))
    con.print(table)
    for s in summary["skipped"]:
        con.print(f"[yellow]skipped[/] {s['run']}: {s['reason']}")


def _plot(sweep_dir: Path, summary: dict) -> Path:
    """``summary.png``: losses against the one numeric swept key, else the gain of each run."""
    from .plots import _figure, save_figure

    rows, x_key = summary["runs"], summary["x_key"]
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"]
    if x_key is not None:
        others = [k for k in summary["varying"] if k != x_key]
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(", ".join(f"{k}={r['params'].get(k)}" for k in others), []).append(r)
        fig = _figure(8, 4.8)
        ax = fig.add_subplot()
        lasts = {json.dumps(sorted((r["params"][x_key], r["last_checkpoint_loss"]) for r in rs))
                 for rs in groups.values()}
        shared_last = len(groups) > 1 and len(lasts) == 1  # same checkpoints in every group: one line
        for i, (g, rs) in enumerate(groups.items()):
            c = colours[i % len(colours)]
            rs = sorted(rs, key=lambda r: r["params"][x_key])
            xs = [r["params"][x_key] for r in rs]
            best = [r["best_heldout_loss"] if r["best_heldout_loss"] is not None else math.nan for r in rs]
            last = [r["last_checkpoint_loss"] if r["last_checkpoint_loss"] is not None else math.nan for r in rs]
            tag = f" ({g})" if g else ""
            ax.plot(xs, best, marker="o", color=c, lw=1.8, label=f"best merge{tag}")
            if not shared_last:
                ax.plot(xs, last, marker="s", ms=4, color=c, ls="--", lw=1.2, alpha=0.8,
                        label=f"last checkpoint{tag}")
            for x, y, r in zip(xs, best, rs):
                if r["gain_vs_last_percent"] is not None and math.isfinite(y):
                    ax.annotate(f"{r['gain_vs_last_percent']:+.2f}%", (x, y), textcoords="offset points",
                                xytext=(0, -13), ha="center", fontsize=7, color=c)
        if shared_last:
            ax.plot(xs, last, marker="s", ms=4, color="grey", ls="--", lw=1.2, label="last checkpoint (all runs)")
        xvals = sorted({r["params"][x_key] for r in rows})
        if len(xvals) <= 12:
            ax.set_xticks(xvals, [f"{x:g}" for x in xvals])
        ax.set_xlabel(x_key)
        ax.set_ylabel("held-out loss (nats/token; lower is better)")
        ax.set_title(f"Sweep over {x_key}: best merge vs last checkpoint ({len(rows)} runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.margins(x=0.08, y=0.15)
    else:
        fig = _figure(9, 1.6 + 0.45 * len(rows))
        ax = fig.add_subplot()
        gains = [r["gain_vs_last_percent"] if r["gain_vs_last_percent"] is not None else math.nan for r in rows]
        ys = list(range(len(rows)))
        ax.barh(ys, [g if math.isfinite(g) else 0.0 for g in gains], height=0.6,
                color=["#d62728" if g < 0 else "#2ca02c" for g in gains], edgecolor="black", linewidth=0.5)
        for y, g, r in zip(ys, gains, rows):
            txt = (f"{g:+.2f}%  (best {_f(r['best_heldout_loss'])} vs last {_f(r['last_checkpoint_loss'])})"
                   if math.isfinite(g) else "n/a")
            ax.annotate(txt, (max(g, 0.0) if math.isfinite(g) else 0.0, y), textcoords="offset points",
                        xytext=(4, 0), ha="left", va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        # label runs by what differs between them (the full names are in summary.md)
        labels = [", ".join(f"{k}={r['params'][k]}" for k in summary["varying"] if k in r["params"]) or r["run"]
                  for r in rows]
        ax.set_yticks(ys, [n if len(n) <= 40 else "\u2026" + n[-39:] for n in labels], fontsize=8)
        ax.invert_yaxis()
        finite = [abs(g) for g in gains if math.isfinite(g)] or [1.0]
        span = max(finite) or 1.0
        lo = min([0.0] + [g for g in gains if math.isfinite(g)])
        ax.set_xlim(lo - 0.1 * span, max(0.0, *[g for g in gains if math.isfinite(g)]) + 1.2 * span)
        ax.set_xlabel("held-out loss gain vs the last checkpoint (%; positive = merge is better)")
        ax.set_ylabel("run")
        ax.set_title(f"Sweep summary: best merge vs last checkpoint ({len(rows)} runs)")
        ax.grid(axis="x", alpha=0.3)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="#2ca02c", edgecolor="black", label="merge beats last checkpoint"),
                           Patch(facecolor="#d62728", edgecolor="black", label="merge is worse")],
                  fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, sweep_dir / "summary.png")


def summarize(sweep_dir: str | os.PathLike, print_table: bool = True) -> dict:
    """Read every finished run under ``sweep_dir``; write summary.json, summary.md, summary.png.

    Returns the summary (``runs``: one row per finished run; ``skipped``:
    runs without results, each with a reason; ``varying``: the override keys
    that differ; ``x_key``: the one numeric key plotted on x, or ``None``).
    Raises :class:`NoRunsError` naming the folder when it holds no finished run.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NoRunsError(f"{sweep_dir}: no such folder")
    rows, skipped = [], []
    for d in find_runs(sweep_dir):
        try:
            rows.append(load_run(d, sweep_dir))
        except (OSError, ValueError) as e:
            log.warning("sweep summary: skipping %s", e)
            skipped.append({"run": d.relative_to(sweep_dir).as_posix(), "reason": str(e).removeprefix(f"{d}: ")})
    if not rows:
        extra = f" ({len(skipped)} unfinished run(s))" if skipped else ""
        raise NoRunsError(f"{sweep_dir}: no finished runs (no subfolder holds a results.json){extra}")
    varying = _varying(rows)
    numeric = [k for k in varying if all(_num(r["params"].get(k)) is not None for r in rows)]
    x_key = numeric[0] if len(numeric) == 1 else None
    if x_key:
        others = [k for k in varying if k != x_key]
        rows.sort(key=lambda r: ([json.dumps(r["params"].get(k), default=str) for k in others],
                                 r["params"][x_key]))
    else:
        rows.sort(key=lambda r: _natural(r["run"]))
    ood = []
    for r in rows:
        ood += [n for n in r["ood_gain_vs_last_percent"] if n not in ood]
    summary = {"sweep_dir": str(sweep_dir), "runs": rows, "skipped": skipped, "varying": varying,
               "x_key": x_key, "ood_sets": ood, "figure": None}
    try:
        summary["figure"] = _plot(sweep_dir, summary).name
    except Exception:  # the tables matter more than the figure
        log.warning("sweep summary: summary.png failed", exc_info=True)
    atomic_write_json(sweep_dir / "summary.json", summary)
    atomic_write_text(sweep_dir / "summary.md", _markdown(summary))
    if print_table:
        _print_table(summary)
    return summary


# --- Hydra callback and command line -----------------------------------------------------------

class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends.

    Registered in conf/config.yaml as ``hydra.callbacks.sweep_summary``. Hydra
    instantiates it for single runs too, where it does nothing. A failure is
    logged and never fails the sweep, whose runs are already written.
    """

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None)
            if not sweep_dir.is_absolute() and cwd:
                sweep_dir = Path(cwd) / sweep_dir
            s = summarize(sweep_dir)
            log.info("sweep summary of %d run(s) written to %s", len(s["runs"]), sweep_dir / "summary.md")
        except Exception as e:  # never fail a finished sweep over its summary
            log.warning("sweep summary failed: %s: %s", type(e).__name__, e,
                        exc_info=not isinstance(e, NoRunsError))


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_merge.summary SWEEP_DIR``: exit 0, or 2 when the folder holds no finished run."""
    parser = argparse.ArgumentParser(prog="python -m lightning_merge.summary",
                                     description="Summarise the runs of a lightning_merge sweep (hydra -m): "
                                                 "writes summary.json, summary.md and summary.png there.")
    parser.add_argument("sweep_dir", help="the sweep folder, e.g. outputs/tiny/multirun")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = summarize(args.sweep_dir, print_table=not args.quiet)
    except NoRunsError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.sweep_dir) / 'summary.md'} ({len(s['runs'])} runs, {len(s['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
