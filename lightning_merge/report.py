"""What a person reads: the summary table, results.json, report.md with plots, the model card.

Nothing here computes a metric; it only presents the figures the driver
measured. ``results.json`` holds the keys fixed in DESIGN.md (``sources``,
``best``, ``candidates``, ``trials``, ``merged_dir``) plus stage timings.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

from .formatting import _gain, _w, command_line, lmeval_table  # noqa: F401  (command_line: this module's API)
from .io import atomic_write_json, atomic_write_text

__all__ = ["results_dict", "write_results", "write_report", "LiveReport", "print_summary", "model_card",
           "trial_progress", "live_logging"]

log = logging.getLogger(__name__)


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


def _objective_label(cfg) -> str:
    objective = cfg.search.objective
    if objective == "lmeval":
        from .lmeval.run import objective_label

        return objective_label(cfg.lmeval) + " (1 - metric where higher is better)"
    return {"heldout_loss": "held-out loss (search set, nats/token)"}.get(objective, objective)


def _lm_column(cfg) -> str | None:
    """The candidates' column for the lm-eval objective's metric (``lmeval_value``), when it is the objective."""
    if cfg.search.objective != "lmeval":
        return None
    from .lmeval.run import objective_label

    return objective_label(cfg.lmeval)


def write_report(out: Path, results: dict, trials: Sequence[dict], cfg, plots: Sequence[str] = ()) -> Path:
    """``report.md``: the candidates table, every trial (failed ones with their reason), and the plots."""
    out = Path(out)
    ood = list(cfg.data.ood)
    lines = [f"# lightning_merge report: {cfg.experiment} / {cfg.search.name} ({cfg.search.space})", "",
             f"Command: `{command_line()}`", ""]
    if results.get("stop_reason"):
        lines += [f"Search stopped: {results['stop_reason']}.", ""]
    lm = _lm_column(cfg)
    lines += ["## Candidates (held-out report set)", "",
              "| candidate | weights | held-out loss | ppl |" + "".join(f" {n} loss |" for n in ood)
              + (f" {lm} |" if lm else ""),
              "|---|---|---|---|" + "---|" * (len(ood) + bool(lm))]
    for c in results.get("candidates", []):
        oods = "".join(f" {c.get('ood_loss', {}).get(n, float('nan')):.4f} |" for n in ood)
        lm_cell = f" {c.get('lmeval_value', float('nan')):.4f} |" if lm else ""
        lines.append(f"| {c['name']} | {_w(c['weights'])} | {c['heldout_loss']:.4f} | "
                     f"{c.get('heldout_ppl', float('nan')):.2f} |{oods}{lm_cell}")
    if "gain_vs_last_percent" in results:
        lines += ["", f"Gain of the best merge over the last checkpoint: "
                      f"**{results['gain_vs_last_percent']:.2f}%**"]
    if results.get("lmeval"):
        lines += ["", "## lm-eval tasks (report.lmeval.tasks)", "", *lmeval_table(results["lmeval"])]
    for name in plots:
        lines += ["", f"![{Path(name).stem}]({name})"]
    lines += ["", f"## Trials (objective: {_objective_label(cfg)})", "",
              "| trial | origin | status | weights | objective | seconds |",
              "|---|---|---|---|---|---|"]
    for t in trials:
        obj = f"{t['objective']:.5f}" if t.get("status") == "completed" else t.get("reason", t.get("status", ""))
        lines.append(f"| {t['trial']} | {t.get('origin', '')} | {t.get('status', '')} | {_w(t['weights'])} | "
                     f"{obj} | {t.get('seconds', float('nan')):.2f} |")
    if results.get("seconds"):
        lines += ["", "## Stage timings", ""] + [f"- {k}: {v:.1f}s" for k, v in results["seconds"].items()]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


class LiveReport:
    """Keeps ``report.md`` current during the search, on a time budget.

    Rewriting report.md costs time that grows with the trials (every trial is a
    row), and the plots cost far more, so neither is redone after every trial
    of a fast search: report.md at most every ``report.refresh_s`` and the plots
    at most every ``report.plot_every_s``, and neither more than 5% of the time
    (the interval is at least 20 times the last refresh's own duration). The
    first trial's refresh is immediate; ``update(force_plots=True)`` (a
    preemption) and :meth:`finish` (the end) always write both. The ledger, not
    the report, is what a resume reads.
    """

    def __init__(self, out: Path, cfg, source_names: Sequence[str], ledger) -> None:
        self.out, self.cfg, self.names, self.ledger = Path(out), cfg, list(source_names), ledger
        self.candidates: list[dict] = []
        self.plots: list[str] = []
        self._plotted = time.monotonic()  # the first plots come after plot_every_s (or at the end)
        self._plot_cost = 0.0
        self._written: float | None = None  # when report.md was last refreshed (None: not yet)
        self._write_cost = 0.0

    def _plots(self, results: dict, force: bool) -> None:
        every = max(self.cfg.report.plot_every_s, 20.0 * self._plot_cost)
        if not force and time.monotonic() - self._plotted < every:
            return
        from .plots import write_plots

        t = time.perf_counter()
        self.plots = write_plots(self.out, self.ledger.ordered(), results, getattr(self.cfg.search, "alpha", 0.0),
                                 _objective_label(self.cfg), self.names)
        self._plot_cost = time.perf_counter() - t
        self._plotted = time.monotonic()

    def update(self, force_plots: bool = False) -> None:
        """After a trial: refresh report.md (and the plots) when due; ``force_plots``: both, now."""
        every = max(self.cfg.report.refresh_s, 20.0 * self._write_cost)
        if not force_plots and self._written is not None and time.monotonic() - self._written < every:
            return
        best = self.ledger.best()
        results = {"candidates": self.candidates, "best": best or {}}
        self._plots(results, force_plots)  # the plots have their own budget
        t = time.perf_counter()
        write_report(self.out, results, self.ledger.ordered(), self.cfg, self.plots)
        self._write_cost = time.perf_counter() - t
        self._written = time.monotonic()

    def finish(self, results: dict, draw: bool = True) -> None:
        """The final report.md; ``draw=False`` leaves the plots to :meth:`draw` (a watch round draws them
        off its critical path, while the next round runs)."""
        if draw:
            self._plots(results, force=True)
        write_report(self.out, results, self.ledger.ordered(), self.cfg, self.plots)

    def draw(self, results: dict) -> None:
        """Draw the plots and rewrite report.md with them."""
        self.finish(results, draw=True)


def print_summary(results: dict, cfg, console=None) -> None:
    """The final table on the terminal (``console``: rich's, default a new one on stdout)."""
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
    lm = _lm_column(cfg)
    if lm:
        table.add_column(lm, justify="right")
    table.add_column("gain vs last", justify="right", no_wrap=True)
    rows = cands if cands else [{"name": "evaluated weights", **results["best"]}]
    for c in rows:
        gain = f"{_gain(c['heldout_loss'], ref_loss):+.2f}%" if ref_loss else ""
        style = "bold green" if c["name"] == "best merge" else None
        table.add_row(c["name"], _w(c["weights"]), f"{c['heldout_loss']:.4f}",
                      f"{c.get('heldout_ppl', float('nan')):.2f}",
                      *[f"{c.get('ood_loss', {}).get(n, float('nan')):.4f}" for n in cfg.data.ood],
                      *([f"{c.get('lmeval_value', float('nan')):.4f}"] if lm else []),
                      gain, style=style)
    con = console or Console(width=max(Console().width, 120))
    con.print(table)
    lm = results.get("lmeval") or {}
    if lm.get("rows"):
        cols = [(t, m) for t, ms in lm["rows"][0]["metrics"].items() for m in ms]
        lt = Table(title="lm-eval (report.lmeval.tasks)")
        lt.add_column("candidate", no_wrap=True)
        for t, m in cols:
            lt.add_column(f"{t}\n{m.removesuffix(',none')}", justify="right")
        for r in lm["rows"]:
            lt.add_row(r["name"], *[f"{r['metrics'].get(t, {}).get(m, float('nan')):.4f}" for t, m in cols],
                       style="bold green" if r.get("kind") == "search" else None)
        con.print(lt)
    secs = "  ".join(f"{k} {v:.1f}s" for k, v in results["seconds"].items())
    con.print(f"[bold]wall time[/] {secs}")
    if "gain_vs_last_percent" in results:
        con.print(f"[bold]best merge[/] gains {results['gain_vs_last_percent']:+.2f}% over the last checkpoint "
                  f"({results['gain_vs_best_single_percent']:+.2f}% over the best single checkpoint)")
    if any(c.get("kind") == "search" for c in cands):
        from rich.markup import escape

        from .card import merging_verdict

        verdict = merging_verdict(results.get("sources") or [], results["best"], cands)
        if verdict:
            head, rest = verdict.split(":", 1)
            con.print(f"[bold yellow]{escape(head)}[/]:{escape(rest)}", highlight=False)
    if results.get("merged_dir"):
        con.print(f"[bold]merged model[/] {results['merged_dir']}")


def model_card(series, best: dict, candidates: list[dict], cfg, command: str | None = None,
               lmeval: dict | None = None) -> str:
    """The merged model's README.md (see ``card.py``): sources, weights, losses or that none were measured,
    whether merging helped, the lm-eval report tasks, and the command that made it (``command``, default
    :func:`command_line`)."""
    from .card import model_card as card

    return card(series, best, candidates, cfg, command=command, lmeval=lmeval)


class _Bar:
    """The rank-0 progress display: trials done of the budget, the current best, and the running evaluation."""

    def __init__(self, progress=None, task=None, eval_task=None) -> None:
        self.progress, self.task, self.eval_task = progress, task, eval_task

    def advance(self, rec: dict, best: dict | None, search: bool = True) -> None:
        if self.progress is None:
            return
        kind = "trial" if search else rec.get("origin", "baseline")
        desc = f"{kind} {rec['trial']}: {rec['objective']:.4f}"
        if best is not None:
            desc += f" | best {best['objective']:.4f} @ {_w(best['weights'])}"
        self.progress.update(self.task, advance=1 if search else 0, description=desc)

    def eval_progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.eval_task, completed=done, total=max(total, 1), visible=done < total)


class _LiveStream:
    """A logging handler's stream while the progress display is live: whole lines go through the
    display's console, so they are printed above the bar instead of after it on the bar's line.

    Hydra's console handler holds the real ``sys.stdout`` (resolved when logging was configured), so
    rich's own redirection of ``sys.stdout`` never sees its lines. Lines are printed as plain text
    (no markup, no highlighting) and unwrapped (``soft_wrap``), so long paths stay whole.
    """

    def __init__(self, console, stream) -> None:
        self.console, self.stream, self._partial = console, stream, ""

    def write(self, text: str) -> int:
        from rich.text import Text

        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self.console.print(Text.from_ansi("\n".join(lines)), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")

    def __getattr__(self, name: str):  # isatty, encoding, fileno...: the stream it stands in for
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)


def _writes_where_the_bar_is(stream, console) -> bool:
    """Whether a handler writing to ``stream`` would land on the live display's lines."""
    if stream is console.file:
        return True
    try:  # stdout and stderr on one terminal: the bar is drawn on the same screen
        return console.is_terminal and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def live_logging(progress) -> Iterator[None]:
    """While the rich ``progress`` is live, print every console log line through it, above the bar.

    Every stream handler (file handlers are left alone) that writes where the bar is drawn gets a
    ``_LiveStream`` on the progress's console for the duration, and its own stream back after.
    Only on a terminal: where stdout is a file (a SLURM log) nothing is live, and lines stay as written.
    """
    console = progress.console
    if not (progress.live.is_started and console.is_terminal):
        yield
        return
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    swapped = []
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and _writes_where_the_bar_is(handler.stream, console):
            try:
                swapped.append((handler, handler.setStream(_LiveStream(console, handler.stream))))
            except AttributeError:  # logging.lastResort: writes to sys.stderr as it is now (rich's proxy)
                pass
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)  # flushes the live stream first


@contextlib.contextmanager
def trial_progress(total: int, enabled: bool = True, console=None, transient: bool = False) -> Iterator[_Bar]:
    """A rich progress display over trials, with the current evaluation's batches (rank 0 only).

    While it is live, log lines are printed through its console, above the bar (``live_logging``).
    ``console``: where to draw it (default: rich's console on stdout). ``transient``: the bar goes
    when the block ends (a watch round's).
    """
    if not enabled:
        yield _Bar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[label]}[/]"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                  transient=transient) as progress, \
            live_logging(progress):
        task = progress.add_task("baselines first", total=total, label="search")
        eval_task = progress.add_task("batches", total=1, label="evaluating", visible=False)
        yield _Bar(progress, task, eval_task)
