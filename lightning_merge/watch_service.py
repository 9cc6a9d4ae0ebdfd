"""The watch service's loop and its rounds, on every rank (the decisions are ``watch.py``'s).

Set up once (``driver._session``): the tokenizer, the held-out blocks, the
model skeleton, the Trainer. Then, until told to stop: rank 0 decides (a round,
a wait, a stop) and broadcasts it; a round binds the Evaluator to its
checkpoints (``Evaluator.rebind``) and runs ``driver._search`` in
``rounds/<round>/``; rank 0 records it in ``rounds.jsonl``, publishes its
best merge as ``merged`` and rewrites ``rounds.md`` / ``rounds.png``.

Order of writes for a round (rank 0): the ``running`` line (fsync'd), the
round's own search (its ledger: resumable), the ``merged`` link, the
``completed`` or ``failed`` line (fsync'd), then the report. A kill anywhere
leaves either a ``running`` round, which the next start resumes, or an ended
one, which it never runs again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, RunConfig
from .errors import CheckpointError, DiskFullError
from .formatting import _gain
from .loop import _fault_point
from .rankwatch import guard, is_comm_failure
from .slurm import Preemption, requeue
from .watch import Watcher, _cleanup_merged, _missing, _now, check_service, publish_link, round_config

__all__ = ["Service"]

log = logging.getLogger(__name__)
_SLICE_S = 0.25
_KEEP_HINT = ("; the training job deletes old checkpoints (torchtitan keep_latest_k, HF Trainer save_total_limit): "
              "keep more of them than checkpoints.last, or rounds will keep losing theirs")


class Service:
    def __init__(self, cfg: RunConfig, out: Path, stages, on_accepted=None) -> None:
        self.cfg, self.out, self.stages, self.on_accepted = cfg, Path(out), stages, on_accepted
        self.watcher = Watcher(cfg, self.out)
        self.rounds = self.watcher.log
        self.preempt = Preemption().install()
        from concurrent.futures import ThreadPoolExecutor

        # Plots and the rounds report are drawn here, one job at a time, while the next round runs.
        self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="watch-report")
        self._drawing: list = []

    # --- before the ranks are connected: every process on its own --------------------------------
    def _first_window(self) -> list[Path] | str:
        """Checkpoints to build the model from (an interrupted round's, or the first K complete), or why it stops."""
        from .watch import _complete

        flight = self.rounds.in_flight()
        if flight is not None and all(Path(p).exists() for p in flight["sources"]):
            return [Path(p) for p in flight["sources"]]
        k, said = self.cfg.checkpoints.last, False
        while True:
            if self.preempt.requested:
                return f"preempted ({self.preempt.signal_name})"
            done = _complete(self.cfg)
            if len(done) >= k:
                return done[-k:]
            reason = self.watcher._stop_reason(done)
            if reason:
                return reason
            self.watcher._say_unfinished()
            if not said:
                log.info("watch: waiting for %d complete checkpoints in %s (%d so far)", k,
                         ", ".join(map(str, self.cfg.checkpoints.sources)), len(done))
                said = True
            self._sleep(self.watcher.next_wait())

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.preempt.requested \
                and not (self.out / self.cfg.watch.stop_file).exists():
            time.sleep(min(_SLICE_S, max(0.0, end - time.monotonic())))

    # --- the service ---------------------------------------------------------------------------
    def run(self) -> dict:
        from . import driver

        try:
            if driver.launched_rank() == 0:
                check_service(self.cfg, self.out, self.rounds)
            first = self._first_window()
            if isinstance(first, str):
                log.info("watch stops before its first round: %s", first)
                return self._end("stopped", first)
            fcfg = replace(self.cfg, mode="search", checkpoints=replace(
                self.cfg.checkpoints, sources=[str(p) for p in first], last=None, every=None, steps=None))
            with self.stages("open checkpoints"):
                series = driver._open_series(fcfg)
                driver._check_model(fcfg, series)
            self.session, _ = driver._session(self.cfg, series, self.stages, lambda blocks: None,
                                              self.on_accepted, preempt=self.preempt)
            ev = self.session.evaluator
            # Start every rank and the process group without merging (the rounds bind their checkpoints).
            ev.evaluate(self.session.search_blocks[: max(1, ev.trainer.world_size)])
            ev.watch = ev.watch or ev.rank_watch()
            if ev.is_global_zero:
                with self.stages("search warm-up"):  # Ax and BoTorch's one-off imports and first fit: not a round's
                    _warm_up_search(self.cfg)
            with guard(lambda: ev.watch, self.cfg.strategy.timeout_s):  # a lost rank: RankLostError
                return self._loop(ev)
        finally:
            self.preempt.restore()
            self._drawer.shutdown(wait=True)
            for f in self._drawing:
                if f.exception() is not None:
                    log.warning("watch: a report job failed: %s", f.exception())
            t = getattr(self, "trackers", None)
            if t is not None:
                if (self.out / "rounds.png").is_file():
                    t.log_images([self.out / "rounds.png"], step=self.step0)
                t.finalize("preempted" if self.preempt.requested else "success")

    def _loop(self, ev) -> dict:
        from . import driver

        zero = ev.is_global_zero
        self.trackers = driver._open_trackers(self.cfg, self.out, f"{self.cfg.experiment}/watch") \
            if zero and self.cfg.report.loggers else None
        self.step0 = _steps_done(self.out, self.rounds)
        while True:
            d = None
            if zero:
                d = self.watcher.decide()
                if "round" in d and not d["resumed"]:
                    self.rounds.write({k: v for k, v in d.items() if k != "resumed"})
            d = ev.broadcast(d)
            if ev.any_rank(self.preempt.requested):
                return self._preempted(ev)
            if "stop" in d:
                log.info("watch stops: %s", d["stop"])
                return self._end("stopped", d["stop"])
            if "wait" in d:
                self._sleep(d["wait"])
                continue
            outcome = self._round(ev, d)
            if outcome == "preempted":
                return self._end("preempted", f"preempted ({self.preempt.signal_name or 'another rank'})")

    def _preempted(self, ev) -> dict:
        reason = f"preempted ({self.preempt.signal_name or 'signal on another rank'})"
        if ev.is_global_zero:
            log.warning("watch: %s between rounds; state is in %s, a re-run of the same command resumes it",
                        reason, self.out)
            requeue()
        return self._end("preempted", reason)

    def _end(self, status: str, reason: str) -> dict:
        return {"status": status, "reason": reason, "output_dir": str(self.out),
                "rounds": list(self.rounds.latest().values())}

    # --- one round -----------------------------------------------------------------------------
    def _round(self, ev, d: dict) -> str:
        from . import driver
        from .driver import Stages
        from .merge import MergeError

        rcfg = round_config(self.cfg, d, self.out)
        rdir = Path(rcfg.output_dir)
        t0, e0 = time.perf_counter(), ev.eval_seconds
        s = self.session
        results, failed = None, None
        log.info("round %s: %s%s", d["round"], ", ".join(Path(p).name for p in d["sources"]),
                 f"; warm start: {', '.join(d['warm_origins'])}" if d.get("warm_origins") else "")
        try:
            series = driver._open_series(rcfg)
            ev.rebind(driver._merger_factory(rcfg, series))
            space = driver._prepare_search(rcfg, series, s.search_blocks, rdir)
            draw: list = []
            results = driver._search(rcfg, series, space, ev, s.full_eval, s.objective, rdir, Stages(), t0,
                                     s.preempt, s.search_blocks, quiet=True, deferred=draw,
                                     trackers=self.trackers, step0=self.step0, lmeval=s.lmeval)
            self._drawing += [self._drawer.submit(job) for job in draw]
        except ConfigError:
            raise  # the round's own state belongs to other settings: the service refuses (said with the option)
        except (CheckpointError, MergeError, OSError, RuntimeError, ValueError, KeyError) as e:
            if is_comm_failure(e) or isinstance(e, DiskFullError):  # not this round's fault: the service stops
                raise
            failed = f"{type(e).__name__}: {e}"
        if results is not None and results.get("status") == "preempted":
            return "preempted"
        if ev.is_global_zero and failed is None:
            gone = _missing(d["sources"])
            if gone:
                failed = gone + _KEEP_HINT
        if ev.any_rank(failed is not None) and failed is None:
            failed = "failed on another rank (see its log)"
        if ev.is_global_zero:
            self._record(d, results, failed, t0, ev.eval_seconds - e0)
            if self.trackers is not None and failed is None:
                from .ledger import Ledger

                driver._log_run(self.trackers, results, Ledger.open(rdir / "trials.jsonl"), rdir, self.step0,
                                images=False, prefix="round")
                last = self.rounds.records[-1]
                self.trackers.log_metrics({"round/checkpoint_step": d.get("step"),
                                           "round/gain_vs_baseline_percent": last.get("gain_vs_baseline_percent"),
                                           "round/outside_eval_fraction": last.get("outside_eval_fraction")},
                                          step=self.step0 + _ledger_len(rdir))
        self.step0 += _ledger_len(rdir)
        return "failed" if failed else "completed"

    def _record(self, d: dict, results: dict | None, failed: str | None, t0: float, eval_s: float) -> None:
        """Rank 0: publish the merge, then the round's line; the rounds report is drawn in the background.

        ``seconds`` is the round's whole critical path, up to its line (the publish included), so
        ``outside_eval_fraction`` is everything but evaluation that the round waited for.
        """
        from .rounds_report import round_line, write_rounds_report

        base = {"round": d["round"], "step": d.get("step"), "sources": d["sources"]}
        prev = self.rounds.last_completed()
        if failed is not None:
            seconds = time.perf_counter() - t0
            rec = {**base, "status": "failed", "reason": failed, "seconds": round(seconds, 3), "finished": _now()}
            log.warning("round %s failed: %s", d["round"], failed)
        else:
            self._publish(results)
            _fault_point("round_published")
            seconds = time.perf_counter() - t0
            rec = {**base, "status": "completed", **_summary(results), "warm_start": d["warm_start"],
                   "warm_origins": d.get("warm_origins", []), "seconds": round(seconds, 3),
                   "eval_seconds": round(eval_s, 3),
                   "outside_eval_fraction": round(1.0 - eval_s / seconds, 4) if seconds > 0 else None,
                   "finished": _now()}
        self.rounds.write(rec)
        _fault_point("round_recorded")
        log.info("%s", round_line(rec))
        if failed is None and self.cfg.watch.keep_merged == "latest":
            _cleanup_merged(self.out, {d["round"], prev["round"] if prev else ""})
        records = list(self.rounds.records)
        self._drawing.append(self._drawer.submit(write_rounds_report, self.out, records,
                                                 experiment=self.cfg.experiment))

    def _publish(self, results: dict) -> None:
        """``merged`` (and ``merged_<format>``) point at this round's best merge, swapped atomically."""
        if results.get("merged_dir"):
            publish_link(self.out / _link_name(self.cfg), Path(results["merged_dir"]))
        if results.get("merged_source_dir"):
            own = Path(results["merged_source_dir"])
            publish_link(self.out / own.name, own)


def _warm_up_search(cfg: RunConfig) -> None:
    from .search import AxSearch
    from .spaces import make_space

    s = AxSearch(cfg.search, make_space(cfg.search, cfg.checkpoints.last), name="warm-up")
    s.warm_up()
    s.close()


def _ledger_len(rdir: Path) -> int:
    """The trial indices a round used (its trackers' steps)."""
    from .io import read_jsonl

    return max((int(r["trial"]) for r in read_jsonl(rdir / "trials.jsonl")), default=-1) + 1


def _steps_done(out: Path, rounds) -> int:
    """The trackers' step after the rounds that ended (a restarted service continues from it)."""
    return sum(_ledger_len(out / "rounds" / r["round"]) for r in rounds.finished())


def _link_name(cfg: RunConfig) -> str:
    return Path(cfg.merge.out).name if not Path(cfg.merge.out).is_absolute() else "merged"


def _summary(results: dict) -> dict:
    """A completed round's figures for its ``rounds.jsonl`` line."""
    cands = results["candidates"]
    best = results["best"]
    last = [c for c in cands if c.get("kind") == "checkpoint"][-1]
    bases = [c for c in cands if c.get("kind") == "baseline" and math.isfinite(c.get("heldout_loss", math.inf))]
    bb = min(bases, key=lambda c: c["heldout_loss"]) if bases else None
    out = {"best_weights": best["weights"], "best_loss": best["heldout_loss"], "last_loss": last["heldout_loss"],
           "gain_percent": _gain(best["heldout_loss"], last["heldout_loss"]),
           "ood_loss": best.get("ood_loss", {}), "last_ood_loss": last.get("ood_loss", {}),
           "trials": results["trials"], "stop_reason": results.get("stop_reason"),
           "merged_dir": results.get("merged_dir"), "merged_source_dir": results.get("merged_source_dir"),
           "stages": results.get("seconds", {})}
    if bb is not None:
        out.update({"best_baseline": bb["name"], "best_baseline_loss": bb["heldout_loss"],
                    "best_baseline_weights": bb["weights"],
                    "gain_vs_baseline_percent": _gain(best["heldout_loss"], bb["heldout_loss"])})
    return out

