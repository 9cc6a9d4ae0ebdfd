"""The watch service's report: ``rounds.png``, the rounds table in ``rounds.md``, one terminal line per round.

``mode=watch`` runs one search **round** per new checkpoint of a live
pretraining run and records each in ``rounds.jsonl`` (a round may have several
lines as it goes from ``running`` to ``completed`` or ``failed``; the last line
wins, as in ``trials.jsonl``). This module only presents those records: it
computes no loss, knows nothing of ranks, Lightning or Hydra, and can redraw the
report of a finished (or still running) watch from its ``rounds.jsonl`` alone.

The figure is the one a pretraining team reads each morning: against the
checkpoint step, the last checkpoint's held-out loss, the best baseline's and
the best merge's (top), and the gain of the best merge in percent (bottom).
Failed rounds are marked on the step axis instead of vanishing; running rounds
are not drawn, since they have no result yet.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from .formatting import _gain
from .io import atomic_write_text
from .plots import BASELINE_COLOUR, BEST_COLOUR, _figure, _finite, save_figure

__all__ = ["latest_rounds", "plot_rounds", "rounds_markdown", "round_line", "write_rounds_report"]

log = logging.getLogger(__name__)

LAST_COLOUR, GAIN_COLOUR, LOSS_COLOUR = "#555555", "#2ca02c", "#9a9a9a"
FAILED_COLOUR = "#a50021"  # a deeper red than the best merge's, so a failed round never reads as a result
_MARKERS = ["s", "^", "D", "v", "P", "X", "<", ">"]  # one per best-baseline name, in order of appearance


# --- records -----------------------------------------------------------------------------------

def _step(rec: dict) -> int | None:
    """A round's checkpoint step as an int, or ``None`` when its checkpoint name carries no number."""
    s = rec.get("step")
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s != int(s):
        raise ValueError(f"round {rec.get('round')!r}: 'step' must be an integer or null, got {s!r}")
    return int(s)


def latest_rounds(records: Sequence[dict]) -> list[dict]:
    """The last line of each round (keyed by ``round``), in step order.

    Rounds whose ``step`` is null come after the numbered ones, in the order
    they first appear; equal steps keep first-seen order. A record without a
    ``round`` name is refused with a ``ValueError`` naming its line (1-based).
    """
    last: dict[str, dict] = {}
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        name = rec.get("round") if isinstance(rec, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"rounds.jsonl line {i + 1} has no 'round' name: {rec!r}")
        first_seen.setdefault(name, i)
        last[name] = rec

    def key(name: str):
        s = _step(last[name])
        return (s is None, s if s is not None else 0, first_seen[name])

    return [last[n] for n in sorted(last, key=key)]


def _num(rec: dict, key: str) -> float:
    v = rec.get(key)
    return float(v) if _finite(v) else math.nan


def _gains(rec: dict) -> tuple[float, float]:
    """(gain over the last checkpoint, gain over the best baseline) in percent.

    Derived from the losses when both are there, so a bar always agrees with the
    lines above it; else the recorded ``gain_percent`` / ``gain_vs_baseline_percent``.
    """
    best = _num(rec, "best_loss")
    out = []
    for gain_key, ref_key in (("gain_percent", "last_loss"), ("gain_vs_baseline_percent", "best_baseline_loss")):
        ref = _num(rec, ref_key)
        ok = math.isfinite(best) and math.isfinite(ref) and ref != 0
        out.append(_gain(best, ref) if ok else _num(rec, gain_key))
    return out[0], out[1]


def _duration(seconds) -> str:
    """``41s``, ``12m05s``, ``3h02m``: short enough for one terminal line."""
    if not _finite(seconds):
        return "?s"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _f(v, fmt: str = ".4f") -> str:
    return format(float(v), fmt) if _finite(v) else "n/a"


# --- one terminal line ---------------------------------------------------------------------------

def round_line(rec: dict) -> str:
    """The line the service prints when a round changes state.

    ``round step-800: best 2.9012 (last 2.9533, EMA 2.9120) gain +1.76% | 10 trials, 41s | weights 0.10 0.20``;
    a failed round: ``round step-900: FAILED after 3s: <reason>``; a running one says what it merges.
    """
    name, status = rec.get("round", "?"), rec.get("status", "?")
    if status == "failed":
        reason = " ".join(str(rec.get("reason") or "no reason recorded").split())
        return f"round {name}: FAILED after {_duration(rec.get('seconds'))}: {reason}"
    if status == "running":
        k, warm = len(rec.get("sources") or []), len(rec.get("warm_start") or [])
        return (f"round {name}: running over {k} checkpoint{'s' if k != 1 else ''}"
                + (f" (warm start from {warm} point{'s' if warm != 1 else ''})" if warm else ""))
    if status != "completed":
        return f"round {name}: {status}"
    refs = [f"last {_f(rec.get('last_loss'))}"]
    if rec.get("best_baseline"):
        refs.append(f"{rec['best_baseline']} {_f(rec.get('best_baseline_loss'))}")
    gain = _gains(rec)[0]
    line = f"round {name}: best {_f(rec.get('best_loss'))} ({', '.join(refs)})"
    line += f" gain {gain:+.2f}%" if math.isfinite(gain) else " gain n/a"
    trials = rec.get("trials")
    line += f" | {trials if trials is not None else '?'} trials, {_duration(rec.get('seconds'))}"
    w = rec.get("best_weights") or []
    if w:
        line += " | weights " + " ".join(_f(x, ".2f") for x in w)
    return line


# --- the table -----------------------------------------------------------------------------------

def _cell(text) -> str:
    """Markdown-table safe: one line, no bare ``|``."""
    return " ".join(str(text).split()).replace("|", "\\|")


def rounds_markdown(rounds: Sequence[dict]) -> str:
    """A markdown table, one row per round (as given: pass :func:`latest_rounds`' output).

    Columns: round, step, status, best loss, last loss, best baseline (name and
    loss), gain over the last checkpoint and over the best baseline (%), trials,
    seconds, and the reason of a failed round. Missing values read ``n/a``.
    """
    lines = ["| round | step | status | best loss | last loss | best baseline | gain vs last | gain vs baseline "
             "| trials | seconds | reason |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rounds:
        status = r.get("status", "?")
        step = "" if r.get("step") is None else str(r["step"])
        secs = _f(r.get("seconds"), ".1f") if "seconds" in r else ""
        if status == "completed":
            g, gb = _gains(r)
            base = f"{r['best_baseline']} {_f(r.get('best_baseline_loss'))}" if r.get("best_baseline") else "n/a"
            cells = [_f(r.get("best_loss")), _f(r.get("last_loss")), base,
                     f"{g:+.2f}%" if math.isfinite(g) else "n/a", f"{gb:+.2f}%" if math.isfinite(gb) else "n/a",
                     str(r.get("trials", "n/a")), secs, ""]
        else:
            reason = r.get("reason", "") if status == "failed" else ""
            cells = ["", "", "", "", "", "", secs, reason]
        lines.append("| " + " | ".join(_cell(c) for c in [r.get("round", "?"), step, status, *cells]) + " |")
    return "\n".join(lines) + "\n"


# --- the figure ----------------------------------------------------------------------------------

def _xs(drawn: Sequence[dict]) -> tuple[list[float], str]:
    """x per round: its step when every drawn round has one, else its position in file order."""
    steps = [_step(r) for r in drawn]
    if all(s is not None for s in steps):
        return [float(s) for s in steps], "checkpoint step"
    return [float(i + 1) for i in range(len(drawn))], "round (in order; some checkpoint names carry no step)"


def _latest_note(rec: dict, gain: float, by_step: bool) -> str:
    """The top panel's subtitle: the newest completed round in numbers, so nobody has to read them off."""
    where = f"step {rec.get('step')}" if by_step else str(rec.get("round"))
    note = (f"latest completed ({where}): best merge {_f(rec.get('best_loss'))} "
            f"vs last checkpoint {_f(rec.get('last_loss'))}")
    if math.isfinite(gain):
        note += f" ({gain:+.2f}%)"
    if rec.get("best_baseline"):
        note += f", best baseline {rec['best_baseline']} {_f(rec.get('best_baseline_loss'))}"
    return note


def _step_axis(ax, xs: Sequence[float], spacing: float) -> None:
    """Integer step ticks that never crowd: the steps themselves when there are a few evenly spread ones,
    else at most 10 round ticks; ``25k`` for large steps."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    lo, hi = min(xs), max(xs)
    span = hi - lo
    margin = max(0.6 * spacing, 0.02 * span) if span else 2.5 * spacing  # one round: a slim bar, centred
    ax.set_xlim(lo - margin, hi + margin)
    uniq = sorted(set(xs))
    if len(uniq) == 1 or (len(uniq) <= 8 and spacing >= span / 10):
        ax.xaxis.set_major_locator(FixedLocator(uniq))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    big = max(abs(lo), abs(hi)) >= 10000

    def label(v, _pos):
        v = int(round(v))
        return f"{v / 1000:g}k" if big and abs(v) >= 1000 and v % 100 == 0 else str(v)

    ax.xaxis.set_major_formatter(FuncFormatter(label))


def plot_rounds(out_dir, rounds: Sequence[dict], *, experiment: str = "") -> Path | None:
    """``out_dir/rounds.png``: held-out losses per round (top) and the best merge's gain in percent (bottom).

    Top: the last checkpoint, the best baseline (its schedule by marker) and the
    best merge, against the checkpoint step. Bottom, sharing the step axis: the
    gain of the best merge over the last checkpoint as bars, and over the best
    baseline as a line. Failed rounds are red crosses on the step axis of both
    panels; running rounds are left out. ``None`` when no round has completed.
    """
    rounds = latest_rounds(rounds)  # idempotent on its own output; accepts raw rounds.jsonl records too
    drawn = [r for r in rounds if r.get("status") in ("completed", "failed")]
    done_idx = [i for i, r in enumerate(drawn) if r.get("status") == "completed"]
    if not done_idx:
        return None
    from matplotlib.lines import Line2D

    xs, xlabel = _xs(drawn)
    done = [drawn[i] for i in done_idx]
    x = [xs[i] for i in done_idx]
    xf = [xs[i] for i, r in enumerate(drawn) if r.get("status") == "failed"]
    n = len(drawn)
    gaps = [b - a for a, b in zip(sorted(set(xs)), sorted(set(xs))[1:])]
    spacing = min(gaps) if gaps else 1.0
    ms = 6 if n <= 20 else (4 if n <= 60 else 2.5)
    lw = 1.6 if n <= 60 else 1.1

    fig = _figure(10, 7)
    top, bot = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1.0])
    last = [_num(r, "last_loss") for r in done]
    best = [_num(r, "best_loss") for r in done]
    base = [_num(r, "best_baseline_loss") for r in done]
    top.plot(x, last, color=LAST_COLOUR, marker="o", ms=ms, lw=lw, label="last checkpoint", zorder=2)
    top.plot(x, base, color=BASELINE_COLOUR, lw=lw, ls="--", zorder=2)
    # The best baseline's schedule changes from round to round: one marker per schedule, counted in the legend.
    names = [str(r.get("best_baseline") or "") for r in done]
    schedules = Counter(nm for nm, b in zip(names, base) if nm and math.isfinite(b))
    handles = [Line2D([], [], color=LAST_COLOUR, marker="o", ms=6, lw=1.6, label="last checkpoint")]
    for j, name in enumerate(schedules):
        pts = [(xi, b) for xi, b, nm in zip(x, base, names) if nm == name and math.isfinite(b)]
        mk = _MARKERS[j % len(_MARKERS)]
        top.plot(*zip(*pts), ls="", marker=mk, ms=ms, color=BASELINE_COLOUR, mec="black", mew=0.4, zorder=3)
        k = schedules[name]
        handles.append(Line2D([], [], color=BASELINE_COLOUR, ls="--", marker=mk, ms=6, mec="black", mew=0.4,
                              label=f"best baseline: {name} ({k} round{'s' if k != 1 else ''})"))
    top.plot(x, best, color=BEST_COLOUR, marker="*", ms=ms * 1.6, lw=lw + 0.4, zorder=4)
    handles.append(Line2D([], [], color=BEST_COLOUR, marker="*", ms=10, lw=2.0, label="best merge (search)"))
    g_last, g_base = zip(*(_gains(r) for r in done))
    top.set_title(_latest_note(done[-1], g_last[-1], xlabel == "checkpoint step"), fontsize=9, color="#333333")
    top.set_ylabel("held-out loss (nats/token)")
    top.grid(alpha=0.3)

    colours = [GAIN_COLOUR if (math.isfinite(g) and g >= 0) else LOSS_COLOUR for g in g_last]
    width = 0.7 * spacing
    bot.bar(x, [g if math.isfinite(g) else 0.0 for g in g_last], width=width, color=colours,
            edgecolor="black" if n <= 60 else "none", linewidth=0.4, zorder=2)
    bot.plot(x, g_base, color=BASELINE_COLOUR, marker="D" if n <= 60 else "", ms=max(2.0, ms * 0.6),
             lw=1.0 if n <= 60 else 0.8, alpha=1.0 if n <= 60 else 0.8, zorder=3)
    if n <= 15:
        for xi, g in zip(x, g_last):
            if math.isfinite(g):
                bot.annotate(f"{g:+.2f}%", (xi, g), textcoords="offset points", xytext=(0, 3 if g >= 0 else -10),
                             ha="center", fontsize=7)
    bot.axhline(0.0, color="black", lw=0.8)
    finite = [v for v in (*g_last, *g_base, 0.0) if math.isfinite(v)]
    lo, hi = min(finite), max(finite)
    pad = 0.18 * (hi - lo) if hi > lo else 0.5
    bot.set_ylim(lo - pad, hi + pad)
    bot.set_ylabel("gain (%)")
    bot.set_xlabel(xlabel)
    bot.grid(axis="y", alpha=0.3)
    gain_handles = [
        Line2D([], [], ls="", marker="s", ms=8, color=GAIN_COLOUR, mec="black", mew=0.4,
               label="gain over the last checkpoint (bars; grey: the merge was worse)"),
        Line2D([], [], color=BASELINE_COLOUR, marker="D", ms=4, lw=1.0, label="gain over the best baseline")]
    if not any(math.isfinite(g) for g in g_base):
        gain_handles.pop()

    if xf:
        for ax in (top, bot):
            ax.plot(xf, [0.0] * len(xf), ls="", marker="x", ms=8 if n <= 60 else 5, mew=2, color=FAILED_COLOUR,
                    transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
        for xi in xf:
            top.axvline(xi, color=FAILED_COLOUR, lw=0.6, ls=":", alpha=0.6, zorder=1)
        fail = Line2D([], [], ls="", marker="x", ms=8, mew=2, color=FAILED_COLOUR,
                      label=f"failed round ({len(xf)}; see rounds.md)")
        gain_handles.append(fail)
    # One legend under both panels: it never hides a point, however the curves run.
    fig.legend(handles=handles + gain_handles, fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    _step_axis(bot, xs, spacing)
    counts = f"{len(done)} completed round{'s' if len(done) != 1 else ''}" + (f", {len(xf)} failed" if xf else "")
    fig.suptitle(f"lightning_merge watch{': ' + experiment if experiment else ''} ({counts}; lower loss is better)")
    return save_figure(fig, Path(out_dir) / "rounds.png")


# --- the live report -----------------------------------------------------------------------------

def _summary(rounds: Sequence[dict]) -> list[str]:
    c = Counter(r.get("status", "?") for r in rounds)
    parts = [f"{c[s]} {s}" for s in ("completed", "failed", "running") if c[s]]
    lines = [f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}" + (f": {', '.join(parts)}." if parts else ".")]
    done = [r for r in rounds if r.get("status") == "completed"]
    if done:
        lines.append(f"Latest completed: {round_line(done[-1])[len('round '):]}")
    return lines


def write_rounds_report(out_dir, records: Sequence[dict], experiment: str = "") -> list[Path]:
    """Publish ``rounds.png`` (when a round has completed) and ``rounds.md`` in ``out_dir``; return their paths.

    ``records`` are the raw ``rounds.jsonl`` lines. A figure that fails to draw
    is logged and left out (its last version stays on disk): the table is
    always written.
    """
    out_dir = Path(out_dir)
    rounds = latest_rounds(records)
    written: list[Path] = []
    try:
        png = plot_rounds(out_dir, rounds, experiment=experiment)
    except Exception:
        log.warning("rounds.png failed to draw; rounds.md goes on without it", exc_info=True)
        png = None
    if png is not None:
        written.append(png)
    lines = [f"# lightning_merge watch{': ' + experiment if experiment else ''}", "", *_summary(rounds), ""]
    if png is not None:
        lines += [f"![rounds]({png.name})", ""]
    lines += ["## Rounds (held-out loss, nats/token; gains in % of the reference's loss)", "",
              rounds_markdown(rounds)]
    written.append(atomic_write_text(out_dir / "rounds.md", "\n".join(lines)))
    return written
