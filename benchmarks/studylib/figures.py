"""The study's plots, one PNG per experiment, drawn from the saved results only.

Sized for ``docs/study.md``, where GitHub shows an image at most ~900 px wide: 9-10 inches at 100 dpi,
fonts of 10-11 pt, every axis labelled, a legend wherever more than one line is drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "figure.dpi": 100, "savefig.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
LABELS = {"tiny": "demo (seed 0)", "tiny_s1": "demo (seed 1)", "large": "larger, constant LR",
          "large_wsd": "larger, WSD", "large_cosine": "larger, cosine", "tiny_wsd_q": "demo-size WSD (quick)",
          "tiny_cosine_q": "demo-size cosine (quick)", "large_cosine_last": "larger, cosine (last 3)",
          "large_wsd_decay": "larger, WSD decay (last 3)", "tiny_wsd_decay": "demo-size WSD decay (last 3)",
          "tiny_cosine_last": "demo-size cosine (last 3)", "tiny+early": "demo (seed 0), one earlier checkpoint",
          "tiny_s1+early": "demo (seed 1), one earlier checkpoint", "large+early": "larger, one earlier checkpoint"}


def _save(fig, path: Path, layout: str = "tight") -> Path:
    """Write ``path`` whole (temp, then rename). ``layout``: ``tight`` (tight_layout), ``bbox`` (a tight bounding
    box at save: room for a colorbar beside several panels) or ``fixed`` (the figure's own subplots_adjust)."""
    if layout == "tight":
        fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight" if layout == "bbox" else None)
    plt.close(fig)
    tmp.replace(path)
    return path


def pilot_heatmaps(pilots: dict[str, dict], path: Path) -> Path:
    """Experiment 1: the best merge's gain (%) over the better parent, for every pair (older i, newer j)."""
    n = len(pilots)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 0.8, 4.4), squeeze=False, gridspec_kw={"wspace": 0.4})
    vmax = max(abs(g) for r in pilots.values() for row in r["gain_pct"] for g in row if g is not None)
    vmax = max(vmax, 1e-6)
    im = None
    for ax, (name, r) in zip(axes[0], pilots.items()):
        k = len(r["steps"])
        grid = [[(r["gain_pct"][i][j] if r["gain_pct"][i][j] is not None else float("nan")) for i in range(k)]
                for j in range(k)]  # rows: newer j, columns: older i
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, origin="lower")
        ticks = range(k)
        ax.set_xticks(ticks, [str(s) for s in r["steps"]], rotation=90)
        ax.set_yticks(ticks, [str(s) for s in r["steps"]])
        ax.set_xlabel("older checkpoint (step)")
        ax.set_ylabel("newer checkpoint (step)")
        lams = r["lams"]
        shown = ", ".join(f"{x:g}" for x in lams) if len(lams) <= 4 else f"{lams[0]:g}, {lams[1]:g}, ..., {lams[-1]:g}"
        ax.set_title(f"{LABELS.get(name, name)}\nbest of lam in {{{shown}}}")
        ax.grid(False)
        if k <= 10:
            for j in range(k):
                for i in range(j):
                    g = r["gain_pct"][i][j]
                    ax.text(i, j, f"{g:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(g) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85, label="gain over the better parent (%)")
    fig.suptitle("Which pairs gain from merging (blue: the merge beats both parents)")
    return _save(fig, path, layout="bbox")


def lam_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Experiment 2: held-out loss relative to the newer parent along ``lam``, with the winning band."""
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(max(3.4 * n + 0.6, 7.5), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        for r in rows:
            rel = [100 * (v - r["newer"]) / r["newer"] for v in r["losses"]]
            line, = ax.plot(r["lams"], rel, marker=".", ms=3, label=f"{r['step_i']} -> {r['step_j']}")
            if r["band"]:
                ax.axvspan(r["band"][0], r["band"][1], color=line.get_color(), alpha=0.08)
            ax.plot([r["best_lam"]], [100 * (r["best_loss"] - r["newer"]) / r["newer"]], "v", color=line.get_color())
        ax.axhline(0, color="black", lw=0.8)
        lo = min(100 * (r["best_loss"] - r["newer"]) / r["newer"] for r in rows)
        ax.set_ylim(lo * 1.6 if lo < 0 else -0.1, max(abs(lo) * 2.5, 0.2))
        ax.set_xlabel("lam (weight on the newer checkpoint)")
        ax.set_ylabel("loss vs newer checkpoint (%)")
        ax.set_title(LABELS.get(name, name))
        ax.legend(title="pair (steps)", loc="upper left")
    fig.suptitle("The lam curve of late adjacent pairs\n(shaded: where the merge beats both parents; v: the best lam)")
    return _save(fig, path)


def efficiency(effs: dict[str, dict], summaries: dict[str, dict], path: Path) -> Path:
    """Experiment 3: evaluations to within 0.1% / 0.01% of the dense grid's best, per optimizer (median, range)."""
    n = len(effs)
    fig, axes = plt.subplots(1, n, figsize=(max(4.6 * n, 7.5), 4.0), squeeze=False)
    for ax, (name, e) in zip(axes[0], effs.items()):
        labels = [row["label"] for row in e["rows"]]
        for off, tol, color in ((-0.2, "0.001", "tab:blue"), (0.2, "0.0001", "tab:orange")):
            s = summaries[name][tol]
            ys = [s[lab]["median"] for lab in labels]
            lo = [s[lab]["median"] - min(n_ if n_ is not None else e["trials"] + 1 for n_ in s[lab]["per_seed"])
                  for lab in labels]
            hi = [max(n_ if n_ is not None else e["trials"] + 1 for n_ in s[lab]["per_seed"]) - s[lab]["median"]
                  for lab in labels]
            ax.bar([i + off for i in range(len(labels))], ys, width=0.4, yerr=[lo, hi], capsize=2, color=color,
                   label=f"within {float(tol) * 100:g}%")
        ax.axhline(e["trials"] + 1, color="gray", ls=":", lw=1)
        ax.text(len(labels) - 0.5, e["trials"] + 1.1, f"not reached in {e['trials']}", ha="right", fontsize=8,
                color="gray")
        ax.set_xticks(range(len(labels)), [lab.replace("paper ", "paper\n") for lab in labels], fontsize=8)
        ax.set_ylabel("evaluations (median; bars: seed range)")
        ax.set_ylim(0, e["trials"] + 2.5)
        ax.set_title(f"{LABELS.get(name, name)}: lam in [{e['alpha']:g}, 1]")
        ax.legend(loc="upper left")
    fig.suptitle("Search efficiency: evaluations until the best so far is\nwithin 0.1% / 0.01% of the dense grid's best")
    return _save(fig, path)


def alpha_and_size(alphas: dict[str, list], sizes: dict[str, dict], path: Path) -> Path:
    """Experiments 4 and 5: the pick's gain against ``alpha``, and its gap to the best against held-out size."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.2, 3.6))
    for name, rows in alphas.items():
        xs = [r["alpha"] for r in rows]
        ys = [sum(x["gain_pct"] for x in r["runs"]) / len(r["runs"]) for r in rows]
        lams = [sum(x["best_lam"] for x in r["runs"]) / len(r["runs"]) for r in rows]
        line, = a1.plot(xs, ys, marker="o", label=LABELS.get(name, name))
        for x, y, lam in zip(xs, ys, lams):
            a1.annotate(f"lam {lam:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7,
                        ha="center", color=line.get_color())
    a1.set_xlabel("alpha (lam searched in [alpha, 1])")
    a1.set_ylabel("pick's gain over the newer (%)")
    a1.set_title("Search space: alpha (mean over seeds)")
    a1.margins(x=0.08, y=0.2)
    a1.legend()
    for name, r in sizes.items():
        xs = [row["blocks"] for row in r["rows"]]
        ys = [sum(x["gap_pct"] for x in row["runs"]) / len(row["runs"]) for row in r["rows"]]
        a2.plot(xs, ys, marker="o", label=LABELS.get(name, name))
    a2.set_xscale("log", base=2)
    ticks = sorted({row["blocks"] for r in sizes.values() for row in r["rows"]})
    a2.set_xticks(ticks, [str(t) for t in ticks])
    a2.minorticks_off()
    a2.set_xlabel("held-out blocks the search saw (256 tokens each)")
    a2.set_ylabel("pick's loss above the best known (%)")
    a2.set_title("Held-out size (mean over seeds)")
    a2.axhline(0, color="black", lw=0.8)
    a2.legend()
    return _save(fig, path)


def schedules(scored: dict[str, list[dict]], path: Path) -> Path:
    """Experiments 6 and 8: every method's gain over the newest checkpoint, on each set, per trajectory."""
    n = len(scored)
    fig, axes = plt.subplots(n, 1, figsize=(9.2, 2.5 * n + 0.6), squeeze=False)
    for ax, (name, cands) in zip(axes[:, 0], scored.items()):
        cands = [c for c in cands if c["name"] != "newest"]
        sets = [s for s in cands[0]["gain_pct"] if s != "search"]
        width = 0.8 / len(sets)
        for k, s in enumerate(sets):
            ax.bar([i + (k - (len(sets) - 1) / 2) * width for i in range(len(cands))],
                   [c["gain_pct"][s] for c in cands], width=width, label=s.replace("ood:", "out-of-domain: "))
        ax.set_xticks(range(len(cands)), [f"{c['name']}\n({c['evals']} evals)" for c in cands], fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("gain over newest (%)")
        ax.set_title(LABELS.get(name, name), fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("Search against free schedules: gain over the newest checkpoint\n(evals: search-set evaluations "
                 "spent choosing the weights)")
    height = fig.get_figheight()  # inches: a two-line title, then the legend, then the panels
    fig.subplots_adjust(left=0.08, right=0.99, top=1 - 1.35 / height, bottom=0.65 / height, hspace=0.6)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1 - 0.75 / height),
               fontsize=8, frameon=False)
    return _save(fig, path, layout="fixed")


def annealing(ann: dict, path: Path) -> Path:
    """Experiment 7: report loss along the WSD and cosine runs, with the merges of each phase marked."""
    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    w = {int(k): v for k, v in ann["wsd_report"].items()}
    c = {int(k): v for k, v in ann["cosine_report"].items()}
    start = ann["decay_start"]
    ax.plot(sorted(w), [w[s] for s in sorted(w)], marker="o", ms=3, label="WSD run (constant LR, then decay)")
    ax.plot(sorted(c), [c[s] for s in sorted(c)], marker="s", ms=3, label="cosine run")
    late = [v for s_, v in (*w.items(), *c.items()) if s_ >= 0.4 * max(w)]
    lo, hi = min(late), max(late)
    ax.set_ylim(lo - 0.08 * (hi - lo), hi + 0.12 * (hi - lo))
    ax.axvline(start, color="gray", ls=":", lw=1)
    ax.text(start, hi + 0.1 * (hi - lo), " last stable-phase save", va="top", fontsize=8, color="gray")
    for key, step, marker, label in (("stable", start, "*", "best merge of stable checkpoints"),
                                     ("wsd_decay", ann["decay_end"], "P", "best merge after the WSD decay"),
                                     ("cosine", max(c), "X", "best merge after the cosine decay")):
        best = min((x for x in ann[key] if x["name"] != "newest"), key=lambda x: x["loss"]["search"])
        ax.plot([step], [best["loss"]["report"]], marker, ms=11, label=f"{label} ({best['name']})")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (report set)")
    ax.set_title("Annealing: merging in the stable phase against decaying the learning rate")
    ax.set_xlim(0.35 * max(w), max(w) * 1.03)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def objective(accs: dict[str, dict], path: Path) -> Path:
    """Experiment 9: held-out loss and cloze accuracy along ``lam``, with the accuracy's standard error."""
    n = len(accs)
    fig, axes = plt.subplots(1, n, figsize=(max(4.8 * n, 7.5), 4.0), squeeze=False)
    for a1, (name, acc) in zip(axes[0], accs.items()):
        g = acc["grid"]
        a1.plot(g, acc["loss"], marker="o", ms=3, color="tab:blue", label="held-out loss (search set)")
        a1.set_xlabel("lam (weight on the newer checkpoint)")
        a1.set_ylabel("held-out loss", color="tab:blue")
        a2 = a1.twinx()
        a2.grid(False)
        ys, se = [100 * a for a in acc["acc"]], [100 * s for s in acc["stderr"]]
        a2.plot(g, ys, marker="s", ms=3, color="tab:red", label=f"cloze accuracy ({acc['items']} items)")
        a2.fill_between(g, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)], color="tab:red",
                        alpha=0.15, label="accuracy +- 1 standard error")
        a2.axhline(25, color="tab:red", ls=":", lw=1, label="chance (4 choices)")
        a2.set_ylabel("cloze accuracy (%)", color="tab:red")
        h1, l1 = a1.get_legend_handles_labels()
        h2, l2 = a2.get_legend_handles_labels()
        a1.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
        a1.set_title(LABELS.get(name, name))
        lo, hi = min(acc["loss"]), max(acc["loss"])
        a1.set_ylim(lo - 0.05 * (hi - lo), hi + 0.9 * (hi - lo))  # room for the legend above the curves
    fig.suptitle("Objective: the lam that held-out loss picks against the one accuracy picks")
    return _save(fig, path)
