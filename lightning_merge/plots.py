"""The report's figures: objective against ``lam`` with the GP posterior, best-so-far, weights, candidates.

Every function takes the plain records a run already wrote (``trials.jsonl``
records and the ``results.json`` dict) and returns the PNG it published, so a
figure can be redrawn from a finished run directory without the model. The
figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``
on the Agg canvas): no pyplot, so no global backend switch, no window, and no
figure registry to leak; and each PNG is written to a temporary sibling and
renamed into place, like every other output of a run.

Nothing here measures anything. The one model fitted here, the GP drawn over
``lam``, is the optimiser's own surrogate (``bo.GPProposer``) refitted on the
observed trials, so the band shows what the search believed, not a new metric.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["completed_trials", "gp_curve", "plot_objective_vs_lam", "plot_best_so_far", "plot_weights",
           "plot_candidates", "reference_values", "write_plots", "save_figure"]

log = logging.getLogger(__name__)

SEARCH_COLOUR, BASELINE_COLOUR, BEST_COLOUR = "#1f77b4", "#ff7f0e", "#d62728"


# --- plumbing --------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render ``fig`` to a PNG beside ``path`` and rename it into place (whole or absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; publish with normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fig.clear()  # drop the artists now; an object-API Figure has no pyplot registry to close
    return path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def completed_trials(trials: Sequence[dict]) -> list[dict]:
    """Completed trials with a finite objective, last record per trial, in trial order.

    The caller normally passes exactly that already; this also accepts raw
    ``trials.jsonl`` records (running/failed lines, several lines per trial).
    """
    last: dict[int, dict] = {}
    for i, t in enumerate(trials):
        last[int(t.get("trial", i))] = t
    return [t for _, t in sorted(last.items())
            if t.get("status", "completed") == "completed" and _finite(t.get("objective"))]


def _failed_count(trials: Sequence[dict]) -> int:
    last = {int(t.get("trial", i)): t for i, t in enumerate(trials)}
    return sum(1 for t in last.values() if t.get("status") == "failed")


def _count(trials: Sequence[dict], done: Sequence[dict]) -> str:
    """``"9 completed trials"``, or ``"9 completed, 2 failed"``."""
    failed = _failed_count(trials)
    n = len(done)
    return f"{n} completed, {failed} failed" if failed else f"{n} completed trial{'s' if n != 1 else ''}"


def _is_baseline(t: dict) -> bool:
    return str(t.get("origin", "")).startswith("baseline:")


def _lam(t: dict) -> float | None:
    """A trial's ``lam``: its pairwise parameter, or for a 2-way record its newer weight."""
    p = t.get("params") or {}
    if _finite(p.get("lam")):
        return float(p["lam"])
    w = t.get("weights") or []
    if len(w) == 2 and all(_finite(x) for x in w) and abs(sum(w) - 1.0) < 1e-6:
        return float(w[1])
    return None


def _short(name: str, width: int = 22) -> str:
    """A path's last component, cut to ``width`` characters for tick labels."""
    s = str(name).rstrip("/").replace("\\", "/").split("/")[-1] or str(name)
    return s if len(s) <= width else "\u2026" + s[-(width - 1):]


# --- 1. objective against lam with the GP posterior --------------------------------------------

def gp_curve(trials: Sequence[dict], alpha: float, n: int = 101) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GP posterior ``(lam, mean, std)`` of the objective over ``lam`` in ``[alpha, 1]``.

    Fitted, as the paper optimiser fits it, on the completed trials whose
    ``lam`` lies in ``[alpha, 1]`` (mapped to the unit interval). Raises
    ``ValueError`` with fewer than two such trials.
    """
    pts = [(lam, t["objective"]) for t in completed_trials(trials)
           if (lam := _lam(t)) is not None and alpha - 1e-9 <= lam <= 1.0 + 1e-9]
    if len(pts) < 2:
        raise ValueError(f"the GP needs at least 2 completed trials with lam in [{alpha}, 1], got {len(pts)}")
    import torch

    from .bo import GPProposer

    span = 1.0 - alpha
    if span <= 0:
        raise ValueError(f"alpha={alpha}: lam has no range to draw")
    X = torch.tensor([[(lam - alpha) / span] for lam, _ in pts], dtype=torch.float64).clamp(0, 1)
    y = torch.tensor([v for _, v in pts], dtype=torch.float64)
    unit = torch.linspace(0, 1, n, dtype=torch.float64).unsqueeze(-1)
    mean, std = GPProposer(dim=1, acquisition="ei", seed=0).posterior(X, y, unit)
    return alpha + span * unit.squeeze(-1).numpy(), mean.numpy(), std.numpy()


def plot_objective_vs_lam(out_dir, trials: Sequence[dict], alpha: float, objective_label: str) -> Path | None:
    """``objective_vs_lam.png``: trials against ``lam``, the GP mean +- 2 sd, and the best point.

    ``None`` when the trials are not from the pairwise space (no ``lam``).
    Search trials are circles numbered by trial, baselines are squares named
    by baseline; the GP is skipped (with a note) when it cannot be fitted.
    """
    if not any("lam" in (t.get("params") or {}) for t in trials):
        return None
    done = [(t, lam) for t in completed_trials(trials) if (lam := _lam(t)) is not None]
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    note = None
    try:
        lam, mean, std = gp_curve(trials, alpha)
        ax.fill_between(lam, mean - 2 * std, mean + 2 * std, color=SEARCH_COLOUR, alpha=0.15,
                        label="GP mean \u00b1 2 sd")
        ax.plot(lam, mean, color=SEARCH_COLOUR, lw=1.5, label="GP posterior mean")
    except Exception as e:  # a plot must never take the report down; draw the points anyway
        note = f"GP not drawn: {e}" if isinstance(e, ValueError) else f"GP fit failed: {type(e).__name__}"
        (log.debug if isinstance(e, ValueError) else log.warning)("objective_vs_lam: %s", note)
    search = [(t, x) for t, x in done if not _is_baseline(t)]
    base = [(t, x) for t, x in done if _is_baseline(t)]
    if search:
        ax.scatter([x for _, x in search], [t["objective"] for t, _ in search], s=36, color=SEARCH_COLOUR,
                   edgecolor="white", linewidth=0.8, zorder=3, label="search trial (number = trial)")
        for t, x in search:
            ax.annotate(str(t.get("trial", "")), (x, t["objective"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="#333333")
    if base:
        ax.scatter([x for _, x in base], [t["objective"] for t, _ in base], s=48, marker="s",
                   color=BASELINE_COLOUR, edgecolor="black", linewidth=0.6, zorder=3, label="baseline")
        for j, (t, x) in enumerate(base):
            ax.annotate(str(t["origin"]).split(":", 1)[1], (x, t["objective"]), textcoords="offset points",
                        xytext=(5, -10 - 8 * (j % 2)), fontsize=7, color=BASELINE_COLOUR)
    if done:
        bt, bx = min(done, key=lambda p: p[0]["objective"])
        ax.scatter([bx], [bt["objective"]], marker="*", s=260, color=BEST_COLOUR, edgecolor="black",
                   linewidth=0.6, zorder=4,
                   label=f"best: lam={bx:.3f}, {bt['objective']:.4f} (trial {bt.get('trial', '?')})")
    ax.axvline(alpha, color="grey", ls=":", lw=1, label=f"search range starts (alpha={alpha:g})")
    lo = min([alpha] + [x for _, x in done])
    pad = 0.03 * (1.0 - lo or 1.0)
    ax.set_xlim(lo - pad, 1.0 + pad)
    if note or not done:
        ax.text(0.5, 0.97, note or "no completed trials", transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color="grey")
    ax.set_xlabel("lam (weight of the newer checkpoint; the older gets 1 - lam)")
    ax.set_ylabel(objective_label)
    ax.set_title(f"Search objective against lam ({_count(trials, done)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, Path(out_dir) / "objective_vs_lam.png")


# --- 2. best so far ----------------------------------------------------------------------------

def reference_values(trials: Sequence[dict]) -> dict[str, float]:
    """Reference lines on the search objective, taken from the trials themselves.

    ``last checkpoint``: a trial whose weights are one-hot on the newest
    checkpoint (the paper's ``lam = 1`` start); ``best baseline (NAME)``: the
    lowest baseline trial. Both are measured on the same blocks as the search.
    """
    out: dict[str, float] = {}
    done = completed_trials(trials)
    for t in done:
        w = t.get("weights") or []
        if w and abs(w[-1] - 1.0) < 1e-9 and all(abs(x) < 1e-9 for x in w[:-1]):
            out["last checkpoint"] = float(t["objective"])
            break
    base = [t for t in done if _is_baseline(t)]
    if base:
        b = min(base, key=lambda t: t["objective"])
        out[f"best baseline ({str(b['origin']).split(':', 1)[1]})"] = float(b["objective"])
    return out


def plot_best_so_far(out_dir, trials: Sequence[dict], objective_label: str,
                     baselines: Mapping[str, float] | None = None) -> Path:
    """``best_so_far.png``: the running minimum against trial number, every trial, and reference lines."""
    done = completed_trials(trials)
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    if done:
        xs = [int(t.get("trial", i)) for i, t in enumerate(done)]
        ys = [float(t["objective"]) for t in done]
        best = np.minimum.accumulate(ys)
        ax.step(xs, best, where="post", color=BEST_COLOUR, lw=2, label="best so far", zorder=2)
        s = [(x, y) for x, y, t in zip(xs, ys, done) if not _is_baseline(t)]
        b = [(x, y) for x, y, t in zip(xs, ys, done) if _is_baseline(t)]
        if s:
            ax.plot(*zip(*s), ls="", marker="o", ms=5, color=SEARCH_COLOUR, alpha=0.8, label="search trial")
        if b:
            ax.plot(*zip(*b), ls="", marker="s", ms=6, color=BASELINE_COLOUR, mec="black", mew=0.5,
                    label="baseline trial")
        ax.annotate(f"best {best[-1]:.4f}", (xs[-1], best[-1]), textcoords="offset points", xytext=(0, 4),
                    ha="right", fontsize=8, color=BEST_COLOUR)
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    else:
        ax.text(0.5, 0.5, "no completed trials", transform=ax.transAxes, ha="center", va="center",
                color="grey")
    styles = [("#2ca02c", "--"), ("#9467bd", "--"), ("#8c564b", "-."), ("#7f7f7f", "-.")]
    for i, (name, v) in enumerate((baselines or {}).items()):
        if _finite(v):
            c, ls = styles[i % len(styles)]
            ax.axhline(v, color=c, ls=ls, lw=1.2, label=f"{name}: {v:.4f}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_label)
    ax.set_title(f"Best so far ({_count(trials, done)}; lower is better)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return save_figure(fig, Path(out_dir) / "best_so_far.png")


# --- 3. weights --------------------------------------------------------------------------------

def plot_weights(out_dir, best_weights: Sequence[float], source_names: Sequence[str]) -> Path:
    """``weights.png``: the best merge's weight per checkpoint (oldest first), with uniform 1/K."""
    w = [float(x) for x in best_weights]
    k = len(w)
    if k == 0:
        raise ValueError("plot_weights: no weights to draw")
    names = [_short(n) for n in source_names] if len(source_names) == k else [f"ckpt {i}" for i in range(k)]
    fig = _figure(max(6.0, 1.0 + 0.8 * k), 4.5)
    ax = fig.add_subplot()
    colours = [SEARCH_COLOUR if x >= 0 else BEST_COLOUR for x in w]
    ax.bar(range(k), w, color=colours, edgecolor="black", linewidth=0.5)
    for i, x in enumerate(w):
        ax.annotate(f"{x:.3f}", (i, x), textcoords="offset points", xytext=(0, 3 if x >= 0 else -11),
                    ha="center", fontsize=8)
    ax.axhline(1.0 / k, color="grey", ls="--", lw=1.2, label=f"uniform 1/K = {1.0 / k:.3f}")
    ax.axhline(0.0, color="black", lw=0.8)
    lo, hi = min(0.0, min(w)), max(1.0 / k, max(w))
    ax.set_ylim(lo - 0.12 * (hi - lo) if lo < 0 else 0.0, hi + 0.15 * (hi - lo))
    ax.set_xticks(range(k), names, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=8)
    ax.set_xlabel("checkpoint (oldest \u2192 newest)")
    ax.set_ylabel("merge weight")
    ax.set_title(f"Weights of the best merge (K={k}, sum={sum(w):.3f})")
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=SEARCH_COLOUR, edgecolor="black", label="weight ≥ 0")]
    if min(w) < 0:
        handles.append(Patch(facecolor=BEST_COLOUR, edgecolor="black", label="weight < 0"))
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    return save_figure(fig, Path(out_dir) / "weights.png")


# --- 4. candidates -----------------------------------------------------------------------------

def _metric(c: dict, name: str) -> float:
    v = c.get("heldout_loss") if name == "held-out" else (c.get("ood_loss") or {}).get(name)
    return float(v) if _finite(v) else math.nan


def plot_candidates(out_dir, results: dict) -> Path:
    """``candidates.png``: every candidate's loss change vs the last checkpoint, held-out and each OOD set.

    Grouped horizontal bars, one group per candidate (in ``results`` order:
    checkpoints, baselines, best merge), one bar per evaluation set; negative
    is better. Without a checkpoint candidate the bars show absolute losses.
    Missing or non-finite values are marked ``n/a``.
    """
    cands = list(results.get("candidates") or [])
    if not cands:
        raise ValueError("plot_candidates: results has no candidates (mode=evaluate/merge)")
    sets = ["held-out"]
    for c in cands:
        sets += [n for n in (c.get("ood_loss") or {}) if n not in sets]
    singles = [c for c in cands if c.get("kind") == "checkpoint"]
    ref = singles[-1] if singles else None
    vals = np.full((len(cands), len(sets)), math.nan)
    for i, c in enumerate(cands):
        for j, s in enumerate(sets):
            v = _metric(c, s)
            if ref is None:
                vals[i, j] = v
            else:
                r = _metric(ref, s)
                vals[i, j] = 100.0 * (v - r) / r if r and math.isfinite(r) else math.nan
    m = len(sets)
    h = 0.8 / m
    fig = _figure(9, 1.2 + 0.22 * len(cands) * max(m, 2) + 0.3)
    ax = fig.add_subplot()
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    highlighted = [i for i, c in enumerate(cands) if c.get("kind") == "search"]
    for n, i in enumerate(highlighted):
        ax.axhspan(i - 0.48, i + 0.48, color="#ffe98a", alpha=0.6, zorder=0,
                   label="best merge (search)" if n == 0 else None)
    span = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
    span = span if span > 0 else 1.0
    for j, s in enumerate(sets):
        y = np.arange(len(cands)) - 0.4 + h * (j + 0.5)
        r = _metric(ref, s) if ref is not None else math.nan
        lab = f"{s} (last ckpt {r:.4f})" if ref is not None and math.isfinite(r) else s
        ax.barh(y, np.nan_to_num(vals[:, j]), height=h * 0.9, color=colours[j % len(colours)],
                edgecolor="black", linewidth=0.4, label=lab, zorder=2)
        for c, yi, v in zip(cands, y, vals[:, j]):
            txt = "n/a" if not math.isfinite(v) else (f"{v:+.2f}%" if ref is not None else f"{v:.4f}")
            txt = "reference" if c is ref else txt
            x = v if math.isfinite(v) else 0.0
            ax.annotate(txt, (x, yi), textcoords="offset points", xytext=(3 if x >= 0 else -3, 0),
                        ha="left" if x >= 0 else "right", va="center", fontsize=6.5,
                        color="grey" if txt in ("n/a", "reference") else "black")
    if ref is not None:
        ax.axvline(0, color="black", lw=0.8)
        lo, hi = np.nanmin(np.append(vals, 0)), np.nanmax(np.append(vals, 0))
        ax.set_xlim(lo - 0.25 * span, hi + 0.25 * span)
    labels = [("\u2605 " if c.get("kind") == "search" else "") + _short(c.get("name", "?"), 28) for c in cands]
    ax.set_yticks(range(len(cands)), labels, fontsize=8)
    for tick, c in zip(ax.get_yticklabels(), cands):
        if c.get("kind") == "search":
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    for i in range(1, len(cands)):  # a rule between checkpoints, baselines and the search
        if cands[i].get("kind") != cands[i - 1].get("kind"):
            ax.axhline(i - 0.5, color="grey", lw=0.6, ls=":")
    if ref is not None:
        ax.set_xlabel("loss change vs the last checkpoint (%)  \u2190 better (lower loss) | worse \u2192")
        ax.set_title(f"Candidates against the last checkpoint ({_short(ref.get('name', '?'), 40)})")
    else:
        ax.set_xlabel("loss (nats/token; lower is better)")
        ax.set_title("Candidates: loss per evaluation set")
    ax.set_ylabel("candidate")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="evaluation set", title_fontsize=8)
    return save_figure(fig, Path(out_dir) / "candidates.png")


# --- all of them -------------------------------------------------------------------------------

def write_plots(out_dir, trials: Sequence[dict], results: dict, alpha: float, objective_label: str,
                source_names: Sequence[str], baselines: Mapping[str, float] | None = None) -> list[str]:
    """Draw every figure that applies; return their file names (for links in report.md).

    ``objective_vs_lam`` for the pairwise space, ``weights`` otherwise,
    ``best_so_far`` when there are trials, ``candidates`` when there are
    candidates. ``baselines`` are the reference lines of the best-so-far plot
    (default: :func:`reference_values` of the trials). A figure that fails is
    logged and left out: plotting never loses the run's report.
    """
    out_dir = Path(out_dir)
    refs = reference_values(trials) if baselines is None else baselines
    best_w = (results.get("best") or {}).get("weights")
    jobs = [lambda: plot_objective_vs_lam(out_dir, trials, alpha, objective_label)]
    if trials:
        jobs.append(lambda: plot_best_so_far(out_dir, trials, objective_label, refs))
    pairwise = any("lam" in (t.get("params") or {}) for t in trials)
    if best_w and not pairwise:
        jobs.append(lambda: plot_weights(out_dir, best_w, source_names))
    if results.get("candidates"):
        jobs.append(lambda: plot_candidates(out_dir, results))
    names = []
    for job in jobs:
        try:
            path = job()
        except Exception:
            log.warning("a report plot failed; the report goes on without it", exc_info=True)
            continue
        if path is not None:
            names.append(path.name)
    return names
