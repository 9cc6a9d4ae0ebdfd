"""What a person reads: the summary table, results.json, report.md with plots, the model card.

Nothing here computes a metric; it only presents the figures the driver
measured. ``results.json`` holds the keys fixed in DESIGN.md (``sources``,
``best``, ``candidates``, ``trials``, ``merged_dir``) plus stage timings.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Iterator, Sequence

from .io import atomic_write_json, atomic_write_text

__all__ = ["results_dict", "write_results", "write_report", "print_summary", "model_card", "trial_progress"]

log = logging.getLogger(__name__)


def _gain(loss: float, ref: float) -> float:
    """Relative improvement over ``ref`` in percent (positive is better)."""
    return 100.0 * (ref - loss) / ref


def results_dict(series, best: dict, candidates: list[dict], trials: int, merged_dir, stages: dict) -> dict:
    """The machine-readable summary of a run."""
    out: dict = {
        "sources": [str(p.resolve()) for p in series.paths],
        "best": best,
        "candidates": candidates,
        "trials": trials,
        "merged_dir": str(Path(merged_dir).resolve()) if merged_dir else None,
        "seconds": {k: round(v, 3) for k, v in stages.items()},
    }
    singles = [c["heldout_loss"] for c in candidates if c.get("kind") == "checkpoint"]
    if singles and "heldout_loss" in best:
        out["gain_vs_last_percent"] = _gain(best["heldout_loss"], singles[-1])
        out["gain_vs_best_single_percent"] = _gain(best["heldout_loss"], min(singles))
    return out


def write_results(out: Path, results: dict) -> Path:
    return atomic_write_json(Path(out) / "results.json", results)


def command_line() -> str:
    """The command that reproduces this run, as typed."""
    return "python -m lightning_merge " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _objective_label(objective: str) -> str:
    return {"heldout_loss": "held-out loss (search set, nats/token)",
            "mc_acc": "1 - accuracy (multiple choice)",
            "mc_acc_norm": "1 - acc_norm (multiple choice)"}.get(objective, objective)


def _plot_lam(out: Path, trials: Sequence[dict], candidates: list[dict], cfg_objective: str) -> str | None:
    lams = [t["params"]["lam"] for t in trials if "lam" in t.get("params", {})]
    if not lams:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [t["objective"] for t in trials if "lam" in t.get("params", {})]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.scatter(lams, losses, c=range(len(lams)), cmap="viridis", label="trials (colour = order)", zorder=3)
    for i, (x, y) in enumerate(zip(lams, losses)):
        a1.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ib = min(range(len(losses)), key=losses.__getitem__)
    a1.scatter([lams[ib]], [losses[ib]], marker="*", s=250, c="red", label=f"best: lam={lams[ib]:.3f}", zorder=4)
    a1.set_xlabel("lam (weight of the newest checkpoint)")
    a1.set_ylabel(_objective_label(cfg_objective))
    a1.set_title("Objective against lam")
    a1.legend()
    best = []
    for y in losses:
        best.append(min(y, best[-1]) if best else y)
    a2.plot(range(len(best)), best, marker="o", label="best so far")
    a2.plot(range(len(losses)), losses, ls="", marker="x", alpha=0.6, label="trial")
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set_xlabel("trial")
    a2.set_ylabel(_objective_label(cfg_objective))
    a2.set_title("Best so far")
    a2.legend()
    fig.tight_layout()
    path = out / "search.png"
    tmp = out / ".search.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path.name


def write_report(out: Path, results: dict, trials: Sequence[dict], cfg) -> Path:
    """``report.md``: the candidates table, the trials, and the plots."""
    out = Path(out)
    plot = _plot_lam(out, trials, results["candidates"], cfg.search.objective)
    lines = [f"# lightning_merge report: {cfg.experiment} / {cfg.search.name}", "",
             f"Command: `{command_line()}`", "", "## Candidates (held-out report set)", "",
             "| candidate | weights | held-out loss | ppl | " +
             " | ".join(f"{n} loss" for n in cfg.data.ood) + " |",
             "|---|---|---|---|" + "---|" * len(cfg.data.ood)]
    for c in results["candidates"]:
        ood = " | ".join(f"{c.get('ood_loss', {}).get(n, float('nan')):.4f}" for n in cfg.data.ood)
        lines.append(f"| {c['name']} | {_w(c['weights'])} | {c['heldout_loss']:.4f} | "
                     f"{c.get('heldout_ppl', float('nan')):.2f} | {ood} |")
    if "gain_vs_last_percent" in results:
        lines += ["", f"Gain of the best merge over the last checkpoint: "
                      f"**{results['gain_vs_last_percent']:.2f}%**"]
    lines += ["", f"## Trials (objective: {_objective_label(cfg.search.objective)})", "",
              "| trial | origin | weights | objective | seconds |",
              "|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {t['trial']} | {t.get('origin', '')} | {_w(t['weights'])} | "
                     f"{t['objective']:.4f} | {t['seconds']:.2f} |")
    if plot:
        lines += ["", f"![search]({plot})"]
    lines += ["", "## Stage timings", ""] + [f"- {k}: {v:.1f}s" for k, v in results["seconds"].items()]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _w(weights: Sequence[float]) -> str:
    return "[" + ", ".join(f"{w:.3f}" for w in weights) + "]"


def print_summary(results: dict, cfg) -> None:
    """The final table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    cands = results["candidates"]
    ref = [c for c in cands if c.get("kind") == "checkpoint"]
    ref_loss = ref[-1]["heldout_loss"] if ref else None
    table = Table(title=f"lightning_merge: {cfg.experiment} ({cfg.search.name}, "
                        f"{results['trials']} trials)")
    table.add_column("candidate", no_wrap=True)
    table.add_column("weights", no_wrap=True)
    table.add_column("held-out loss", justify="right")
    table.add_column("ppl", justify="right")
    for n in cfg.data.ood:
        table.add_column(f"{n} loss", justify="right")
    has_mc = any("mc_acc" in c for c in cands) or "mc_acc" in results["best"]
    if has_mc:
        table.add_column("MC acc", justify="right")
        table.add_column("acc_norm", justify="right")
    table.add_column("gain vs last", justify="right", no_wrap=True)
    rows = cands if cands else [{"name": "evaluated weights", **results["best"]}]
    for c in rows:
        gain = f"{_gain(c['heldout_loss'], ref_loss):+.2f}%" if ref_loss else ""
        style = "bold green" if c["name"] == "best merge" else None
        table.add_row(c["name"], _w(c["weights"]), f"{c['heldout_loss']:.4f}",
                      f"{c.get('heldout_ppl', float('nan')):.2f}",
                      *[f"{c.get('ood_loss', {}).get(n, float('nan')):.4f}" for n in cfg.data.ood],
                      *([f"{c.get('mc_acc', float('nan')):.4f}", f"{c.get('mc_acc_norm', float('nan')):.4f}"]
                        if has_mc else []),
                      gain, style=style)
    con = Console(width=max(Console().width, 120))
    con.print(table)
    secs = "  ".join(f"{k} {v:.1f}s" for k, v in results["seconds"].items())
    con.print(f"[bold]wall time[/] {secs}")
    if "gain_vs_last_percent" in results:
        con.print(f"[bold]best merge[/] gains {results['gain_vs_last_percent']:+.2f}% over the last checkpoint "
                  f"({results['gain_vs_best_single_percent']:+.2f}% over the best single checkpoint)")
    if results.get("merged_dir"):
        con.print(f"[bold]merged model[/] {results['merged_dir']}")


def model_card(series, best: dict, candidates: list[dict], cfg) -> str:
    """The merged model's README.md: sources, weights, metric, gains, and how to reproduce."""
    rows = "\n".join(f"| {c['name']} | {_w(c['weights'])} | {c['heldout_loss']:.4f} |" for c in candidates)
    src = "\n".join(f"{i}. `{p}` (weight {w:.4f})" for i, (p, w) in
                    enumerate(zip(series.paths, best["weights"])))
    return f"""---
library_name: transformers
tags: [lightning_merge, checkpoint-merging]
---
# Merged checkpoint ({cfg.experiment})

A weighted average of pretraining checkpoints, found by `lightning_merge` with
`search.name={cfg.search.name}` (Bayesian optimisation of the merge weights, after
Liu et al., *Checkpoint Merging via Bayesian Optimization in LLM Pretraining*, arXiv 2403.19390).

## Sources (oldest first) and weights
{src}

## Held-out loss (token-weighted mean NLL, nats/token)
| candidate | weights | held-out loss |
|---|---|---|
{rows}

## Reproduce
```
{command_line()}
```
or re-run the recipe in `merge.yaml` (`python -m lightning_merge mode=merge ...`, see its `command`).
"""


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def advance(self, rec: dict, best: dict | None) -> None:
        if self.progress is None:
            return
        desc = f"trial {rec['trial']}: {rec['objective']:.4f}"
        if best is not None:
            desc += f" | best {best['objective']:.4f} @ {_w(best['weights'])}"
        self.progress.update(self.task, advance=1, description=desc)


@contextlib.contextmanager
def trial_progress(total: int, enabled: bool = True) -> Iterator[_Bar]:
    """A rich progress bar over trials (rank 0 only)."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}")) as progress:
        task = progress.add_task("starting", total=total)
        yield _Bar(progress, task)
