"""The run: set up once, then the trial loop, then the best merge and the report.

The trial loop is the same on every rank: rank 0 asks the search for weights,
they are broadcast, every rank merges its resident sources into its own
parameters in place, every rank evaluates its shard, and the exact sums are
reduced. Only rank 0 talks to Ax, writes the ledger and publishes outputs.
Nothing is re-read from disk per trial and the Trainer is built once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoints import CheckpointError
from .errors import DiskFullError, disk_full
from .io import sweep_leftovers
from .rankwatch import guard
from .series import CheckpointSeries
from .config import ConfigError, RunConfig
from .data import evenly_spaced_index, load_blocks
from .merge import weight_sum_warning
from .writer import write_merged
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


def _kernel_setup(cfg: RunConfig) -> None:
    """``merge.kernel`` for this process; the compiled merge kernel's code is cached in ``cache_dir/inductor``.

    Inductor's own default cache (``/tmp/torchinductor_<user>``) is often wiped between SLURM jobs;
    a user's own ``TORCHINDUCTOR_CACHE_DIR`` wins.
    """
    from . import kernels

    kernels.set_mode(cfg.merge.kernel)
    if cfg.merge.kernel != "eager":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.cache_dir).expanduser() / "inductor"))


def _resolve_inputs(cfg: RunConfig, stages: Stages) -> RunConfig:
    """Fill empty sources and data from the embedded demo trajectory (experiment tiny).

    The demo's held-out text is only for the demo's own checkpoints: a user's
    checkpoints scored on it would give a number about the wrong data, so
    sources without held-out data are refused (before the demo is trained).
    """
    need_ckpt = not cfg.checkpoints.sources
    need_data = cfg.mode != "merge" and not (cfg.data.heldout.path or cfg.data.heldout.name)
    if not (need_ckpt or need_data):
        return cfg
    if need_data and not need_ckpt:
        raise ConfigError(
            "config option `data.heldout.path`: empty, but checkpoints.sources names your own checkpoints; "
            "the embedded demo's held-out text (Python's standard library) only fits the demo's checkpoints. "
            "Give held-out text from your run's distribution: data.heldout.path=/data/heldout.jsonl "
            "(json/jsonl/parquet/csv/txt) or a cached hub dataset with data.heldout.name=...")
    if not cfg.demo.enabled:
        raise CheckpointError("checkpoints.sources is empty; give it, or use +experiment=tiny for the embedded demo")
    if cfg.mode == "watch":
        return _live_demo(cfg, need_ckpt, need_data)
    from .demo import build_trajectory

    t0 = time.perf_counter()
    traj = build_trajectory(cfg.demo, cfg.cache_dir, progress=True)
    if traj.cached:
        stages.seconds["trajectory (cached)"] = time.perf_counter() - t0
    else:
        stages.seconds.update(traj.seconds)
    ckpts = replace(cfg.checkpoints, sources=[str(p) for p in traj.checkpoints]) if need_ckpt \
        else cfg.checkpoints
    data, lmeval = cfg.data, cfg.lmeval
    if need_data:
        held = replace(cfg.data.heldout, path=str(traj.heldout))
        ood = dict(cfg.data.ood) or {name: replace(held, path=str(p)) for name, p in traj.ood.items()}
        data = replace(cfg.data, heldout=held, ood=ood)
        lmeval = _demo_lmeval_data(cfg, traj)
    return replace(cfg, checkpoints=ckpts, data=data, lmeval=lmeval)


def _demo_lmeval_data(cfg: RunConfig, traj):
    """The demo's own files for the shipped offline lm-eval tasks the run names but gives no files for:
    ``cloze_local`` built from the held-out text (written once beside the trajectory), ``text_local`` the
    out-of-domain prose."""
    data = dict(cfg.lmeval.data)
    named = {cfg.lmeval.task, *cfg.report.lmeval.tasks} - {k for k, v in data.items() if v}
    if "cloze_local" in named:
        from .data import load_texts
        from .lmeval.tasks import build_cloze_items

        path = Path(traj.heldout).parent / "lmeval" / "cloze_heldout.jsonl"
        if not path.is_file():
            build_cloze_items(load_texts(traj.heldout), path, n_items=400, seed=0)
        data["cloze_local"] = str(path)
    if "text_local" in named and traj.ood:
        data["text_local"] = str(traj.ood.get("pydoc", next(iter(traj.ood.values()))))
    return replace(cfg.lmeval, data=data)


def _live_demo(cfg: RunConfig, need_ckpt: bool, need_data: bool) -> RunConfig:
    """``mode=watch`` on the embedded demo (``+experiment=tiny_watch``): its training runs in the background.

    Rank 0 starts the demo's training job (``demo_live.py``), which writes checkpoints into
    ``<output_dir>/training_run/checkpoints`` while the service follows them, unless a previous run
    already wrote them all; the job is stopped when the service ends. The service stops after the
    last checkpoint's round unless ``watch.until_step`` says otherwise.
    """
    import atexit

    from .completion import incomplete
    from .demo import checkpoint_steps
    from .demo_live import prepare, start

    data = prepare(cfg.demo, cfg.cache_dir)
    ckdir = Path(cfg.output_dir) / "training_run" / "checkpoints"
    steps = checkpoint_steps(cfg.demo)
    whole = all((ckdir / f"step{s}").is_dir() and incomplete(ckdir / f"step{s}") is None for s in steps)
    if launched_rank() == 0 and need_ckpt and not whole:
        proc = start(cfg.demo, data, ckdir, slow_save_s=cfg.demo.save_pause_s)

        def stop_training() -> None:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

        atexit.register(stop_training)
    ckpts = replace(cfg.checkpoints, sources=[str(ckdir)]) if need_ckpt else cfg.checkpoints
    watch = cfg.watch if cfg.watch.until_step is not None or not need_ckpt else \
        replace(cfg.watch, until_step=steps[-1])
    data_conf = cfg.data
    if need_data:
        held = replace(cfg.data.heldout, path=str(data.heldout))
        ood = dict(cfg.data.ood) or {name: replace(held, path=str(p)) for name, p in data.ood.items()}
        data_conf = replace(cfg.data, heldout=held, ood=ood)
    return replace(cfg, checkpoints=ckpts, data=data_conf, watch=watch)


def _open_series(cfg: RunConfig) -> CheckpointSeries:
    """Resolve the sources, check the weight count against the selection (before any file is read), open them."""
    from .sources import resolve_sources

    c = cfg.checkpoints
    paths = resolve_sources(c.sources, None, hub_cache=c.hub_cache)
    kept = c.selector().apply(paths)
    if not kept:
        raise CheckpointError("checkpoints.sources: no checkpoints left after selection")
    weights = cfg.merge.weights if cfg.mode in ("evaluate", "merge") else None
    if weights is not None and len(weights) != len(kept):
        picked = _selection_words(c, len(paths))
        raise ConfigError(
            f"config option `merge.weights`: got {len(weights)} weights for {len(kept)} checkpoints: "
            f"{picked} kept {[p.name for p in kept]} of the {len(paths)} resolved "
            f"({[p.name for p in paths][:8]}{' ...' if len(paths) > 8 else ''}). Give one weight per kept "
            f"checkpoint, oldest first, or change the selection"
            + (f" (e.g. checkpoints.last={len(weights)})" if len(weights) <= len(paths) and c.last else ""))
    series = CheckpointSeries.from_paths(kept, strip_prefix=c.strip_prefix, config_dir=c.config_dir,
                                         name_map=c.name_map)
    if c.tokenizer_dir:
        from .model import tokenizer_dir

        series.tokenizer_dir = tokenizer_dir(series, c.tokenizer_dir)  # checked; write_merged copies it
    return series


def _selection_words(c, resolved: int) -> str:
    """The selector options in force, as a user would type them (``checkpoints.last=2 (the default)``)."""
    parts = [f"checkpoints.{k}={getattr(c, k)}" for k in ("names", "steps", "every") if getattr(c, k)]
    if c.last:
        parts.append(f"checkpoints.last={c.last}" + (" (the default)" if c.last == 2 else ""))
    return ", ".join(parts) or f"no selector (all {resolved})"


def _check_model(cfg: RunConfig, series: CheckpointSeries) -> None:
    """Before heavy work: the checkpoints hold the model's tensors, and blocks fit its positions."""
    from .model import build_model, check_block_size, check_covers

    if series.config_dir is None:
        return
    trust = cfg.model.trust_remote_code
    try:
        meta = build_model(series.config_dir, trust_remote_code=trust, meta=True)
    except CheckpointError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError, ImportError, AttributeError) as e:
        # Some remote modeling code cannot be built on the meta device; the merger's own check
        # (sharding.load_local_sources) still compares names and shapes once the real model exists.
        log.warning("could not build %s on the meta device to check the checkpoints against it before loading "
                    "(%s: %s); %s", series.config_dir / "config.json", type(e).__name__, e,
                    "mode=merge writes the checkpoints' tensors unchecked" if cfg.mode == "merge"
                    else "they are checked when the model is built")
    else:
        check_covers(series, meta)
    if cfg.mode != "merge":
        sizes = {"data.heldout.block_size": cfg.data.heldout.block_size}
        sizes.update({f"data.ood.{n}.block_size": o.block_size for n, o in cfg.data.ood.items()})
        check_block_size(series.config_dir, sizes, trust_remote_code=trust)


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
                    names=None, config_dir=r.get("config_dir"), tokenizer_dir=r.get("tokenizer_dir"),
                    strip_prefix=r.get("strip_prefix"))
    norm = r.get("normalize")  # write_merged records true/false; a hand-written recipe may leave it out
    merge = replace(cfg.merge, weights=list(r["weights"]), normalize=None if norm is None else bool(norm),
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


def run(cfg: RunConfig, on_accepted: Callable[[], None] | None = None) -> dict:
    """Run ``cfg.mode`` (search | evaluate | merge | watch) and return the results dict.

    ``on_accepted`` is called once the run's checks have passed (the CLI writes Hydra's record then,
    see record.py), never for a refused run.
    Global rank 0 holds the run folder's lock for the run's life (runlock.py): a second run is refused at once.
    """
    from .runlock import RunLock

    with RunLock(cfg.output_dir) if launched_rank() == 0 else contextlib.nullcontext():  # other ranks: never
        return _run(cfg, on_accepted)


def _run(cfg: RunConfig, on_accepted: Callable[[], None] | None) -> dict:
    from . import report

    if launched_rank() != 0:  # one voice: only rank 0 logs progress
        logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    stages = Stages()
    t_start = time.perf_counter()
    _seed_everything(cfg.seed, cfg.threads)
    _kernel_setup(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    locked = launched_rank() == 0 and os.environ.get("LIGHTNING_MERGE_NO_LOCK") != "1"  # runlock.NO_LOCK_ENV
    if locked and (gone := sweep_leftovers(out)):  # under the lock only: nobody else writes here
        log.warning("removed %d leftover(s) of an interrupted write in %s: %s", len(gone), out,
                    ", ".join(str(p.relative_to(out)) for p in gone[:5]) + (" ..." if len(gone) > 5 else ""))
    if cfg.merge.recipe:  # first: a recipe names its sources, so the embedded demo is not needed
        cfg = _apply_recipe(cfg)
    if cfg.mode in ("merge", "evaluate") and (note := weight_sum_warning(cfg.merge.weights, cfg.merge.normalize)):
        log.warning("%s", note)  # once, before any heavy work (the merger applies weights every trial)
    cfg = _resolve_inputs(cfg, stages)
    if cfg.mode == "watch":  # a round of search per new checkpoint, over this module's pieces
        from .watch import watch

        return watch(cfg, out, stages, on_accepted)
    with stages("open checkpoints"):
        series = _open_series(cfg)
        _check_model(cfg, series)
        if cfg.merge.format != "hf" and series.source_format is None:  # source_format refuses mixed formats
            raise ConfigError("config option `merge.format`: `source` writes the sources' own training-framework "
                              "format, but these sources are Hugging Face-family checkpoints; use merge.format=hf")
    log.info("sources (oldest first): %s", ", ".join(str(p) for p in series.paths))

    if cfg.mode == "merge":
        if on_accepted is not None:
            on_accepted()
        with stages("write merged model"):
            card = report.model_card(series, {"weights": list(cfg.merge.weights)}, [], cfg)
            merged, own = _write(cfg, series, cfg.merge.weights, out, metric={}, card=card)
        results = report.results_dict(series, best={"weights": list(cfg.merge.weights)},
                                      candidates=[], trials=0, merged_dir=merged or own, stages=stages.seconds)
        results["merged_source_dir"] = str(own.resolve()) if own else None
        report.write_results(out, results)
        log.info("merged model written to %s", merged or own)
        return results

    def check(search_blocks: torch.Tensor):  # the resume check: before the model is built
        return _prepare_search(cfg, series, search_blocks, out) if cfg.mode == "search" else None

    session, space = _session(cfg, series, stages, check, on_accepted)
    with guard(lambda: session.evaluator.watch, cfg.strategy.timeout_s):  # a lost rank: RankLostError
        return _run_session(cfg, series, space, session, out, stages, t_start)


def _run_session(cfg: RunConfig, series: CheckpointSeries, space, session: "Session", out: Path, stages: Stages,
                 t_start: float) -> dict:
    """``mode=evaluate`` or ``mode=search`` on a session that is set up."""
    from . import report

    evaluator, full_eval, objective, preempt = session.evaluator, session.full_eval, session.objective, \
        session.preempt
    search_blocks = session.search_blocks

    if cfg.mode == "evaluate":
        with stages("evaluate"):
            best = {"weights": list(cfg.merge.weights), **full_eval(list(cfg.merge.weights))}
        lm_report = None
        if session.lmeval is not None and cfg.report.lmeval.tasks:
            with stages("lm-eval report"):
                given = [{"name": "given weights", "kind": "search", "weights": list(cfg.merge.weights)}]
                lm_report = session.lmeval.report(given, cfg.search.objective, out)
        results = report.results_dict(series, best=best, candidates=[], trials=0, merged_dir=None,
                                      stages=stages.seconds)
        if lm_report is not None:
            results["lmeval"] = lm_report
        if evaluator.is_global_zero:
            report.write_results(out, results)
            report.print_summary(results, cfg)
        return results

    try:
        return _search(cfg, series, space, evaluator, full_eval, objective, out, stages, t_start, preempt,
                       search_blocks, lmeval=session.lmeval)
    finally:
        preempt.restore()


@dataclass
class Session:
    """What a search (or a watch service's every round) shares: the data, the model, the one Trainer."""

    evaluator: object  # evaluate.Evaluator
    full_eval: Callable[[list[float]], dict]
    objective: Callable[[list[float]], tuple[float, dict]]
    search_blocks: torch.Tensor
    preempt: Preemption | None
    lmeval: object | None = None  # lmeval.run.Scorer: the lm-eval objective and report tasks, when used


def _session(cfg: RunConfig, series: CheckpointSeries, stages: Stages, check: Callable[[torch.Tensor], object],
             on_accepted: Callable[[], None] | None, preempt: Preemption | None = None) -> tuple[Session, object]:
    """Tokenizer, held-out blocks, model skeleton and Evaluator, set up once for ``series``'s model.

    ``check(search_blocks)`` runs once the blocks exist and before the model is built (the resume
    check: a refused run costs no model); its result is returned beside the session. The Evaluator's
    merger is bound to ``series``; ``Evaluator.rebind`` binds it to another series of the same model.
    """
    with stages("data and model"):
        from transformers.utils import logging as hf_logging

        from .evaluate import Evaluator
        from .model import build_model, load_tokenizer, tokenizer_dir

        hf_logging.disable_progress_bar()
        if series.config_dir is None:
            raise CheckpointError(f"{series.newest.path}: no config.json beside the checkpoints; "
                                  "set checkpoints.config_dir to a folder with config.json and tokenizer")
        trust = cfg.model.trust_remote_code
        if trust:
            log.warning("model.trust_remote_code=true: running the modeling code shipped in %s",
                        series.config_dir)
        tok = load_tokenizer(tokenizer_dir(series, cfg.checkpoints.tokenizer_dir), trust_remote_code=trust)
        report_blocks = load_blocks(cfg.data.heldout, tok, "heldout", cache_dir=cfg.cache_dir)
        # The search blocks are a subset of the report set: a candidate's report loss adds the rest's sums
        # to its search-set sums (the ones its trial computed), so no block is scored twice.
        idx = evenly_spaced_index(report_blocks.shape[0], cfg.data.search_blocks)
        search_blocks = report_blocks if idx is None else report_blocks[idx]
        rest = torch.ones(report_blocks.shape[0], dtype=torch.bool)
        if idx is not None:
            rest[idx] = False
        rest_blocks = report_blocks[rest]
        ood_blocks = {name: load_blocks(c, tok, f"ood.{name}", cache_dir=cfg.cache_dir)
                      for name, c in cfg.data.ood.items()}
        lm_plan = None
        if cfg.search.objective == "lmeval" or cfg.report.lmeval.tasks:
            from .lmeval.run import prepare

            lm_plan = prepare(cfg, tok.batch_decode(report_blocks))  # tasks, files and splits checked: no model yet
        checked = check(search_blocks)
        if on_accepted is not None:  # the resume check (search) and the inputs (evaluate) have passed
            on_accepted()
        model = build_model(series.config_dir, getattr(torch, cfg.model.dtype), trust)
        # SIGUSR2 / SIGTERM only set a flag from here on; the search saves and requeues at a trial boundary.
        if preempt is None and cfg.mode == "search":
            preempt = Preemption().install()
        evaluator = Evaluator(model, cfg.strategy, batch_size=cfg.data.batch_size,
                              merger_factory=_merger_factory(cfg, series),
                              callbacks=[preempt.lightning_callback()] if preempt else ())
        scorer = None
        if lm_plan is not None:
            from .lmeval.run import Scorer

            scorer = Scorer(lm_plan, cfg, evaluator, tok, model.config)
    lm_cache: dict[tuple, tuple[float, dict]] = {}

    def lm_objective(weights: list[float]) -> tuple[float, dict]:
        key = (evaluator.binding, *(float(w) for w in weights))  # a watch round rebinds to other sources
        if key not in lm_cache:  # a baseline's full evaluation reuses its trial's score
            evaluator.set_weights(weights)
            lm_cache[key] = scorer.objective()
        return lm_cache[key]

    # (binding, weights) -> the search set's NLL sum and tokens, from the trial that scored them. Weights are keyed
    # to 12 decimals, as the loop keys trials (a baseline's weights and its trial's, rebuilt from the search
    # space's parameters, can differ in the last bit: 1/3 against 1 - 2/3).
    search_sums: dict[tuple, tuple[float, int]] = {}

    def sums_key(weights: list[float]) -> tuple:
        return (evaluator.binding, *(round(float(w), 12) for w in weights))

    def full_eval(weights: list[float]) -> dict:
        """The report set (search blocks + the rest, token-weighted: exact), out-of-domain sets, lm-eval."""
        evaluator.set_weights(weights)
        key = sums_key(weights)
        if key not in search_sums:  # not a trial of this process (a resumed run): the same evaluation again
            r = evaluator.evaluate(search_blocks)
            search_sums[key] = (r.nll_sum, r.tokens)
        nll, tokens = search_sums[key]
        if rest_blocks.shape[0]:
            r = evaluator.evaluate(rest_blocks)
            nll, tokens = nll + r.nll_sum, tokens + r.tokens
        res = {"heldout_loss": nll / tokens}
        res["heldout_ppl"] = math.exp(res["heldout_loss"])
        res["ood_loss"] = {n: evaluator.evaluate(b).loss for n, b in ood_blocks.items()}
        if cfg.search.objective == "lmeval":
            res.update(lm_objective(weights)[1])
        return res

    def objective(weights: list[float]) -> tuple[float, dict]:
        """The minimised value of one trial, and the metrics it came from."""
        evaluator.set_weights(weights)
        if cfg.search.objective == "heldout_loss":
            r = evaluator.evaluate(search_blocks)
            search_sums[sums_key(weights)] = (r.nll_sum, r.tokens)
            return r.loss, {"heldout_loss": r.loss, "tokens": r.tokens}
        return lm_objective(weights)  # search.objective=lmeval

    return Session(evaluator, full_eval, objective, search_blocks, preempt, scorer), checked


def _fingerprint(cfg: RunConfig, series: CheckpointSeries, space, search_blocks: torch.Tensor) -> dict:
    """What makes trials comparable: resuming with any of these changed is refused (see ledger.py)."""
    import hashlib

    blocks = hashlib.sha256(search_blocks.contiguous().numpy().tobytes()).hexdigest()[:16]
    fp = {"checkpoints.sources": [str(p) for p in series.paths],
          "data.heldout (the search blocks)": f"{tuple(search_blocks.shape)} sha256:{blocks}",
          "search.space": space.fingerprint(), "search.name": cfg.search.name,
          "search.objective": cfg.search.objective, "model.dtype": cfg.model.dtype,
          "strategy.precision": cfg.strategy.precision}
    if cfg.search.warm_start:
        fp["search.warm_start"] = [list(map(float, w)) for w in cfg.search.warm_start]
    if cfg.search.objective == "lmeval":
        from dataclasses import asdict

        lm = asdict(cfg.lmeval)
        fp["lmeval"] = {k: lm[k] for k in ("task", "metric", "filter", "limit", "num_fewshot", "seed", "data",
                                           "include_path", "add_bos_token", "max_gen_toks")}
    return fp


def _prepare_search(cfg: RunConfig, series: CheckpointSeries, search_blocks: torch.Tensor, out: Path):
    """Rank 0, before any process group exists: the space, and a refusal if the old trials cannot be resumed."""
    from .ledger import Ledger, archive_previous, check_fingerprint
    from .spaces import make_space

    from .search import AxSearch

    try:
        space = make_space(cfg.search, len(series))
        AxSearch._warm_points(cfg.search, space)  # a warm-start point outside the space: refused now
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if launched_rank() == 0:
        if cfg.search.restart:
            archive_previous(out)
        n = len(Ledger.open(out / "trials.jsonl").records)
        check_fingerprint(out, _fingerprint(cfg, series, space, search_blocks), n)
    return space


def _search(cfg: RunConfig, series: CheckpointSeries, space, evaluator, full_eval, objective, out: Path,
            stages: Stages, t_start: float, preempt, search_blocks: torch.Tensor, quiet: bool = False,
            deferred: list | None = None, trackers=None, step0: int = 0, lmeval=None) -> dict:
    """Baselines, the trial loop (resumed from the ledger if there is one), the best merge, the report.

    ``quiet`` (a watch round): the progress bar goes when the search ends, and no summary table is printed.
    ``deferred``: given, the plots are not drawn here; a callable that draws them is appended to it.
    ``trackers`` (rank 0): the experiment trackers to log to (default: ``report.loggers``' own, opened,
    given the hyperparameters and finalized here), at steps ``step0 + trial index``.
    ``lmeval`` (an ``lmeval.run.Scorer``): with ``report.lmeval.tasks``, the final candidates are scored
    on them after the best merge is evaluated (results.json ``lmeval``, report.md, the model card).
    """
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
    own_trackers = zero and trackers is None and bool(cfg.report.loggers)
    if own_trackers:
        trackers = _open_trackers(cfg, out, f"{cfg.experiment}/{out.name}")
    on_trial = _trial_hook(reporter, trackers if zero else None, ledger, names, step0) if zero else None
    with report.trial_progress(cfg.search.trials, enabled=zero and cfg.report.progress, transient=quiet) \
            as bar:
        loop = SearchLoop(cfg, evaluator, objective, full_eval, out, space, search=search, ledger=ledger,
                          on_trial=on_trial, bar=bar, preempt=preempt)
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
        if reason.startswith("preempted"):  # otherwise finish() below draws them, once, with the best merge
            reporter.update(force_plots=True)
    if reason.startswith("preempted"):
        if zero:
            log.warning("%s: state saved in %s after %d trials; a re-run of the same command resumes it",
                        reason, out, len(ledger.completed()))
            requeue()
        if own_trackers:
            trackers.finalize("preempted")
        return {"status": "preempted", "reason": reason, "output_dir": str(out)}

    best_rec = evaluator.broadcast(ledger.best() if ledger is not None else None)
    if best_rec is None:
        raise RuntimeError("every trial failed; see trials.jsonl for the reasons")
    with stages("evaluate best"):
        best = {"weights": best_rec["weights"], "params": best_rec.get("params", {}), "trial": best_rec["trial"],
                "origin": best_rec.get("origin"), "search_objective": best_rec[OBJECTIVE],
                **full_eval(best_rec["weights"])}
    candidates.append({"name": "best merge", "kind": "search", **best})
    lm_report = None
    if lmeval is not None and cfg.report.lmeval.tasks:
        with stages("lm-eval report"):
            lm_report = lmeval.report(candidates, cfg.search.objective, out)

    merged = own = None
    last = [c for c in candidates if c["kind"] == "checkpoint"][-1]
    if zero and cfg.merge.write:
        with stages("write merged model"):
            metric = {"heldout_loss": best["heldout_loss"], "last_checkpoint_loss": last["heldout_loss"]}
            card = report.model_card(series, best, candidates, cfg, lmeval=lm_report)
            merged, own = _write(cfg, series, best["weights"], out, metric=metric, card=card)
    stages.seconds["total"] = time.perf_counter() - t_start
    results = report.results_dict(series, best=best, candidates=candidates,
                                  trials=len(ledger.search_trials()) if ledger else 0,
                                  merged_dir=merged or own, stages=stages.seconds)
    results["merged_source_dir"] = str(own.resolve()) if own else None
    results["stop_reason"] = reason
    if lm_report is not None:
        results["lmeval"] = lm_report
    if zero:
        results["per_trial"] = _per_trial(ledger, loop.report_seconds / max(loop.trials_run, 1))
    if zero:
        report.write_results(out, results)
        reporter.finish(results, draw=deferred is None)
        if deferred is not None:
            deferred.append(lambda: reporter.draw(results))
        if trackers is not None:
            if not quiet:  # a watch round's figures are logged by the service, once the round is recorded
                _log_run(trackers, results, ledger, out, step0, images=deferred is None, prefix="run")
            if own_trackers:
                trackers.finalize("success")
        if not quiet:
            report.print_summary(results, cfg)
    return results


def _open_trackers(cfg: RunConfig, out: Path, run_name: str):
    """Rank 0: ``report.loggers``' trackers under ``<out>/trackers``, with the run's options as hyperparameters."""
    from dataclasses import asdict

    from .trackers import Trackers

    t = Trackers(cfg.report.loggers, Path(out) / "trackers", run_name=run_name, experiment=cfg.experiment)
    conf = asdict(cfg)
    t.log_hparams({k: conf[k] for k in ("mode", "seed", "checkpoints", "data", "model", "search", "baselines",
                                        "strategy", "merge", "watch") if k in conf})
    return t


def _trial_hook(reporter, trackers, ledger, names: list[str], step0: int):
    """After each recorded trial (rank 0): report.md, and the trial on the trackers."""
    def hook() -> None:
        reporter.update()
        if trackers is not None and trackers.enabled:
            recs = ledger.ordered()
            last = next((r for r in recs if r.get("origin") == f"baseline:{names[-1]}"
                         and r.get("status") == "completed"), None)
            rec = max(recs, key=lambda r: r["trial"])
            trackers.log_trial(rec, step=step0 + int(rec["trial"]),
                               last_loss=last.get("heldout_loss") if last else None, source_names=names)

    return hook


def _log_run(trackers, results: dict, ledger, out: Path, step0: int, images: bool, prefix: str) -> None:
    """The run's (or a watch round's) figures on the trackers: summary, trials table, plots."""
    if not trackers.enabled:
        return
    step = step0 + max((int(r["trial"]) for r in ledger.ordered()), default=-1) + 1
    trackers.log_summary(results, step=step, prefix=prefix)
    cols = ("trial", "origin", "status", "weights", "objective", "heldout_loss", "seconds")
    trackers.log_table(f"{prefix}_trials", [{c: r.get(c) for c in cols} for r in ledger.ordered()], step=step)
    if images:
        trackers.log_images(sorted(Path(out).glob("*.png")), step=step)


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
           card: str | None = None) -> tuple[Path | None, Path | None]:
    """Write the merge as ``merge.format`` says: the HF folder and/or the sources' own format."""
    hf = own = None
    if cfg.merge.format in ("source", "both"):
        from .write_source import write_source

        fmt = series.source_format  # checked when the series was opened (run)
        dest = out / f"merged_{fmt.name}"
        try:
            own = write_source(series, list(weights), dest, optimizer=cfg.merge.optimizer,
                               normalize=cfg.merge.normalize, nonfloat=cfg.merge.nonfloat, metadata=metric)
        except OSError as e:
            if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
                raise disk_full(dest, None, f"the merged {fmt.name} checkpoint") from e
            raise
        log.info("merged %s checkpoint written to %s", fmt.name, own)
    if cfg.merge.format in ("hf", "both"):
        dtype = getattr(torch, cfg.merge.dtype) if cfg.merge.dtype else None
        target = Path(cfg.merge.out)
        target = target if target.is_absolute() else out / target
        extra = {"README.md": card} if card else None
        hf = write_merged(series, list(weights), target, dtype=dtype, max_shard_bytes=cfg.merge.max_shard_bytes,
                          normalize=cfg.merge.normalize, nonfloat=cfg.merge.nonfloat, metadata=metric,
                          extra_files=extra)
    return hf, own
