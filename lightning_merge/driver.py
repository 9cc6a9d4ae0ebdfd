"""The run: set up once, then the trial loop, then the best merge and the report.

The trial loop is the same on every rank: rank 0 asks the search for weights,
they are broadcast, every rank merges its resident sources into its own
parameters in place, every rank evaluates its shard, and the exact sums are
reduced. Only rank 0 talks to Ax, writes the ledger and publishes outputs.
Nothing is re-read from disk per trial and the Trainer is built once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import CheckpointError, CheckpointSeries
from .config import ConfigError, RunConfig
from .data import evenly_spaced, load_blocks
from .merge import write_merged
from .slurm import Preemption
from .ledger import OBJECTIVE

__all__ = ["run", "Stages"]

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """Wall time of each stage, logged as it ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            log.info("stage %s done in %.1fs", name, dt)


def launched_rank() -> int:
    """This process's global rank as set by the launcher (0 before any launch)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", 0)) * 1000 + int(os.environ.get("LOCAL_RANK", 0))


def _seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)


def _resolve_inputs(cfg: RunConfig, stages: Stages) -> RunConfig:
    """Fill empty sources / data paths from the embedded demo trajectory (experiment tiny)."""
    need_ckpt = not cfg.checkpoints.sources
    need_data = cfg.mode != "merge" and not cfg.data.heldout.path
    if not (need_ckpt or need_data):
        return cfg
    if not cfg.demo.enabled:
        what = "checkpoints.sources" if need_ckpt else "data.heldout.path"
        raise CheckpointError(f"{what} is empty; give it, or use +experiment=tiny for the embedded demo")
    from .demo import build_trajectory

    t0 = time.perf_counter()
    traj = build_trajectory(cfg.demo, cfg.cache_dir, progress=True)
    if traj.cached:
        stages.seconds["trajectory (cached)"] = time.perf_counter() - t0
    else:
        stages.seconds.update(traj.seconds)
    ckpts = replace(cfg.checkpoints, sources=[str(p) for p in traj.checkpoints]) if need_ckpt \
        else cfg.checkpoints
    data = cfg.data
    if need_data:
        held = replace(cfg.data.heldout, path=str(traj.heldout))
        ood = dict(cfg.data.ood) or {name: replace(held, path=str(p)) for name, p in traj.ood.items()}
        data = replace(cfg.data, heldout=held, ood=ood)
    return replace(cfg, checkpoints=ckpts, data=data)


def _build_model(series: CheckpointSeries, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The model skeleton from ``config.json``, without random init: every trial merges into it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(series.config_dir, trust_remote_code=trust_remote_code)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _apply_recipe(cfg: RunConfig) -> RunConfig:
    """Take sources, weights and merge options from a ``merge.yaml`` written by ``write_merged``."""
    from omegaconf import OmegaConf

    path = Path(cfg.merge.recipe).expanduser()
    if not path.exists():
        raise CheckpointError(f"merge.recipe: {path} does not exist")
    r = OmegaConf.to_container(OmegaConf.load(path))
    for key in ("sources", "weights"):
        if key not in r:
            raise CheckpointError(f"merge.recipe: {path} has no `{key}`")
    ckpts = replace(cfg.checkpoints, sources=list(r["sources"]), last=None, every=None, steps=None,
                    names=None, config_dir=r.get("config_dir"), strip_prefix=r.get("strip_prefix"))
    merge = replace(cfg.merge, weights=list(r["weights"]), normalize=bool(r.get("normalize", False)),
                    nonfloat=r.get("nonfloat", "equal"), dtype=r.get("dtype", cfg.merge.dtype))
    return replace(cfg, checkpoints=ckpts, merge=merge)


_SHARD_KIND = {"single": "whole", "ddp": "whole", "deepspeed_stage_3": "zero3", "fsdp": "fsdp"}


def _merger_factory(cfg: RunConfig, series: CheckpointSeries):
    """Builds, on the first evaluation, this rank's resident sources bound to its (shards of the) model."""
    from .sharding import ShardMerger

    kind = _SHARD_KIND[cfg.strategy.name]

    def build(model: torch.nn.Module, prefix: str = "") -> ShardMerger:
        t0 = time.perf_counter()
        merger = ShardMerger(model, kind, series, prefix=prefix, nonfloat=cfg.merge.nonfloat,
                             normalize=cfg.merge.normalize)
        log.info("resident sources: %d checkpoints x %.1fM of %.1fM elements on this rank (%s), %.1fs",
                 len(series), merger.local_numel / 1e6, merger.full_numel / 1e6, kind, time.perf_counter() - t0)
        return merger

    return build


def run(cfg: RunConfig) -> dict:
    """Run ``cfg.mode`` (search | evaluate | merge) and return the results dict."""
    from . import report

    if launched_rank() != 0:  # one voice: only rank 0 logs progress
        logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    stages = Stages()
    t_start = time.perf_counter()
    _seed_everything(cfg.seed, cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.merge.recipe:  # first: a recipe names its sources, so the embedded demo is not needed
        cfg = _apply_recipe(cfg)
    cfg = _resolve_inputs(cfg, stages)
    with stages("open checkpoints"):
        c = cfg.checkpoints
        series = CheckpointSeries.from_sources(c.sources, selector=c.selector(), strip_prefix=c.strip_prefix,
                                               config_dir=c.config_dir, hub_cache=c.hub_cache)
    log.info("sources (oldest first): %s", ", ".join(str(p) for p in series.paths))

    if cfg.mode == "merge":
        with stages("write merged model"):
            merged = _write(cfg, series, cfg.merge.weights, out, metric={})
        results = report.results_dict(series, best={"weights": list(cfg.merge.weights)},
                                      candidates=[], trials=0, merged_dir=merged, stages=stages.seconds)
        report.write_results(out, results)
        log.info("merged model written to %s", merged)
        return results


    with stages("data and model"):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        from .evaluate import Evaluator

        if series.config_dir is None:
            raise CheckpointError(f"{series.newest.path}: no config.json beside the checkpoints; "
                                  "set checkpoints.config_dir to a folder with config.json and tokenizer")
        trust = cfg.model.trust_remote_code
        if trust:
            log.warning("model.trust_remote_code=true: running the modeling code shipped in %s",
                        series.config_dir)
        tok = AutoTokenizer.from_pretrained(series.config_dir, trust_remote_code=trust)
        report_blocks = load_blocks(cfg.data.heldout, tok, "heldout", cache_dir=cfg.cache_dir)
        search_blocks = evenly_spaced(report_blocks, cfg.data.search_blocks)
        ood_blocks = {name: load_blocks(c, tok, f"ood.{name}", cache_dir=cfg.cache_dir)
                      for name, c in cfg.data.ood.items()}
        mc_data = None
        if cfg.data.mc.path or cfg.data.mc.name:
            from .multiple_choice import load_mc

            mc_data = load_mc(cfg.data.mc, tok)
            log.info("multiple choice: %d items", mc_data.num_items)
        space = _prepare_search(cfg, series, search_blocks, out) if cfg.mode == "search" else None
        model = _build_model(series, getattr(torch, cfg.model.dtype), trust)
        # SIGUSR2 / SIGTERM only set a flag from here on; the search saves and requeues at a trial boundary.
        preempt = Preemption().install() if cfg.mode == "search" else None
        evaluator = Evaluator(model, cfg.strategy, batch_size=cfg.data.batch_size,
                              merger_factory=_merger_factory(cfg, series),
                              callbacks=[preempt.lightning_callback()] if preempt else ())

    def full_eval(weights: list[float]) -> dict:
        evaluator.set_weights(weights)
        res = {"heldout_loss": evaluator.evaluate(report_blocks).loss}
        res["heldout_ppl"] = math.exp(res["heldout_loss"])
        res["ood_loss"] = {n: evaluator.evaluate(b).loss for n, b in ood_blocks.items()}
        if mc_data is not None:
            res.update({f"mc_{k}": v for k, v in evaluator.evaluate_mc(mc_data).items()})
        return res

    def objective(weights: list[float]) -> tuple[float, dict]:
        """The minimised value of one trial, and the metrics it came from."""
        evaluator.set_weights(weights)
        if cfg.search.objective == "heldout_loss":
            r = evaluator.evaluate(search_blocks)
            return r.loss, {"heldout_loss": r.loss, "tokens": r.tokens}
        m = evaluator.evaluate_mc(mc_data)
        key = cfg.search.objective[3:]  # acc | acc_norm
        return 1.0 - m[key], {f"mc_{k}": v for k, v in m.items()}

    if cfg.mode == "evaluate":
        with stages("evaluate"):
            best = {"weights": list(cfg.merge.weights), **full_eval(list(cfg.merge.weights))}
        results = report.results_dict(series, best=best, candidates=[], trials=0, merged_dir=None,
                                      stages=stages.seconds)
        if evaluator.is_global_zero:
            report.write_results(out, results)
            report.print_summary(results, cfg)
        return results

    try:
        return _search(cfg, series, space, evaluator, full_eval, objective, out, stages, t_start, preempt,
                       search_blocks)
    finally:
        preempt.restore()


def _fingerprint(cfg: RunConfig, series: CheckpointSeries, space, search_blocks: torch.Tensor) -> dict:
    """What makes trials comparable: resuming with any of these changed is refused (see ledger.py)."""
    import hashlib

    blocks = hashlib.sha256(search_blocks.contiguous().numpy().tobytes()).hexdigest()[:16]
    fp = {"checkpoints.sources": [str(p) for p in series.paths],
          "data.heldout (the search blocks)": f"{tuple(search_blocks.shape)} sha256:{blocks}",
          "search.space": space.fingerprint(), "search.name": cfg.search.name,
          "search.objective": cfg.search.objective, "model.dtype": cfg.model.dtype,
          "strategy.precision": cfg.strategy.precision}
    if cfg.search.objective != "heldout_loss":
        from dataclasses import asdict

        fp["data.mc"] = asdict(cfg.data.mc)
    return fp


def _prepare_search(cfg: RunConfig, series: CheckpointSeries, search_blocks: torch.Tensor, out: Path):
    """Rank 0, before any process group exists: the space, and a refusal if the old trials cannot be resumed."""
    from .ledger import Ledger, archive_previous, check_fingerprint
    from .spaces import make_space

    try:
        space = make_space(cfg.search, len(series))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if launched_rank() == 0:
        if cfg.search.restart:
            archive_previous(out)
        n = len(Ledger.open(out / "trials.jsonl").records)
        check_fingerprint(out, _fingerprint(cfg, series, space, search_blocks), n)
    return space


def _search(cfg: RunConfig, series: CheckpointSeries, space, evaluator, full_eval, objective, out: Path,
            stages: Stages, t_start: float, preempt, search_blocks: torch.Tensor) -> dict:
    """Baselines, the trial loop (resumed from the ledger if there is one), the best merge, the report."""
    from . import report
    from .ledger import Ledger
    from .loop import SearchLoop
    from .search import AxSearch
    from .slurm import requeue

    zero = evaluator.is_global_zero
    search = ledger = None
    with stages("search setup"):
        if zero:
            ledger = Ledger.open(out / "trials.jsonl")
            name = f"{cfg.experiment}-{cfg.search.name}"
            search = AxSearch.restore(cfg.search, space, name, ledger, out / "ax_snapshot.json") \
                if ledger.records else AxSearch(cfg.search, space, name=name)
            search.warm_up()
    names = [p.name for p in series.paths]
    reporter = report.LiveReport(out, cfg, names, ledger) if zero else None
    with report.trial_progress(cfg.search.trials, enabled=zero and cfg.report.progress) \
            as bar:
        loop = SearchLoop(cfg, evaluator, objective, full_eval, out, space, search=search, ledger=ledger,
                          on_trial=reporter.update if reporter else None, bar=bar, preempt=preempt)
        if zero:
            evaluator.on_batch = bar.eval_progress
        evaluator.connect(search_blocks, [0.0] * (len(series) - 1) + [1.0])  # before the first broadcast
        with stages("baselines"):
            candidates = loop.baselines(names)
        if reporter:
            reporter.candidates = candidates
        with stages("search"):
            reason = loop.run()
        evaluator.on_batch = evaluator.on_merged = None
    if search is not None:
        search.flush()  # Ax has every result; the snapshot is on disk
        search.close()
        reporter.update(force_plots=True)
    if reason.startswith("preempted"):
        if zero:
            log.warning("%s: state saved in %s after %d trials; a re-run of the same command resumes it",
                        reason, out, len(ledger.completed()))
            requeue()
        return {"status": "preempted", "reason": reason, "output_dir": str(out)}

    best_rec = evaluator.broadcast(ledger.best() if ledger is not None else None)
    if best_rec is None:
        raise RuntimeError("every trial failed; see trials.jsonl for the reasons")
    with stages("evaluate best"):
        best = {"weights": best_rec["weights"], "params": best_rec.get("params", {}), "trial": best_rec["trial"],
                "origin": best_rec.get("origin"), "search_objective": best_rec[OBJECTIVE],
                **full_eval(best_rec["weights"])}
    candidates.append({"name": "best merge", "kind": "search", **best})

    merged = None
    last = [c for c in candidates if c["kind"] == "checkpoint"][-1]
    if zero and cfg.merge.write:
        with stages("write merged model"):
            metric = {"heldout_loss": best["heldout_loss"], "last_checkpoint_loss": last["heldout_loss"]}
            card = report.model_card(series, best, candidates, cfg)
            merged = _write(cfg, series, best["weights"], out, metric=metric, card=card)
    stages.seconds["total"] = time.perf_counter() - t_start
    results = report.results_dict(series, best=best, candidates=candidates,
                                  trials=len(ledger.search_trials()) if ledger else 0,
                                  merged_dir=merged, stages=stages.seconds)
    results["stop_reason"] = reason
    if zero:
        results["per_trial"] = _per_trial(ledger, loop.report_seconds / max(loop.trials_run, 1))
    if zero:
        report.write_results(out, results)
        reporter.finish(results)
        report.print_summary(results, cfg)
    return results


def _per_trial(ledger, report_s: float) -> dict:
    """Mean seconds per evaluated search trial, by part: what the search costs on top of evaluation."""
    done = [r for r in ledger.search_trials() if not r.get("reused") and "eval_s" in r]
    if not done:
        return {}
    keys = ("ask_s", "broadcast_s", "merge_s", "book_s", "eval_s")
    out = {k: sum(r.get(k, 0.0) for r in done) / len(done) for k in keys}
    out["report_s"] = report_s
    out["evaluated_trials"] = len(done)
    out["overhead_fraction"] = (out["ask_s"] + out["broadcast_s"] + out["merge_s"]) / out["eval_s"]
    return out


def _write(cfg: RunConfig, series: CheckpointSeries, weights, out: Path, metric: dict,
           card: str | None = None) -> Path:
    dtype = getattr(torch, cfg.merge.dtype) if cfg.merge.dtype else None
    target = Path(cfg.merge.out)
    target = target if target.is_absolute() else out / target
    extra = {"README.md": card} if card else None
    return write_merged(series, list(weights), target, dtype=dtype, max_shard_bytes=cfg.merge.max_shard_bytes,
                        normalize=cfg.merge.normalize, nonfloat=cfg.merge.nonfloat, metadata=metric,
                        extra_files=extra)
