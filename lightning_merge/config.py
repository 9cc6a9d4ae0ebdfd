"""Typed configuration schemas behind ``conf/``.

The YAML in ``conf/`` is validated against these dataclasses (registered in
Hydra's ConfigStore by :func:`register_configs`), so a misspelt key fails at
compose time. Values are checked in ``__post_init__``, which runs when the
composed config is turned into objects with :func:`to_run_config`; every error
names the option at fault and what is allowed instead.

This module knows Hydra/OmegaConf only at its two edges (registration and
conversion); the dataclasses themselves are plain and are what the rest of the
package consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .naming import _lm_experiment, _lm_run, experiment_name, run_dirname  # re-exported: the names runs get

__all__ = [
    "DemoConf",
    "CheckpointsConf",
    "TextSetConf",
    "DataConf",
    "ModelConf",
    "SearchConf",
    "StrategyConf",
    "MergeConf",
    "WatchConf",
    "LMEvalConf",
    "RunConfig",
    "register_configs",
    "to_run_config",
    "experiment_name",
    "run_dirname",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


def _require(cond: bool, option: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config option `{option}`: {msg}")


@dataclass
class DemoConf:
    """The embedded tiny pretraining trajectory (experiment ``tiny``).

    The corpus is the running Python's standard library; the tokenizer and the
    model are trained here, offline, and cached under ``cache_dir``.
    """

    enabled: bool = False
    steps: int = 800
    num_checkpoints: int = 10
    lr: float = 3e-3
    warmup_frac: float = 0.05
    lr_schedule: str = "constant"  # constant (stable phase of WSD) | cosine | wsd (constant, then a linear decay)
    decay_frac: float = 0.2  # wsd: the share of the steps in the final linear decay to 0
    batch_size: int = 4
    seq_len: int = 256
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    heldout_frac: float = 0.05
    seed: int = 0
    max_train_bytes: Optional[int] = None  # cap on training text (tests use a smaller corpus)
    save_pause_s: float = 0.0  # mode=watch's live demo: a pause mid-way through writing each weights file

    def __post_init__(self) -> None:
        _require(self.lr_schedule in ("constant", "cosine", "wsd"), "demo.lr_schedule",
                 f"got {self.lr_schedule!r}; use 'constant', 'cosine' or 'wsd'")
        _require(0.0 < self.decay_frac < 1.0 - self.warmup_frac, "demo.decay_frac",
                 f"must be in (0, 1 - demo.warmup_frac), got {self.decay_frac}")
        _require(self.steps > 0, "demo.steps", f"must be positive, got {self.steps}")
        _require(2 <= self.num_checkpoints <= self.steps, "demo.num_checkpoints",
                 f"must be in [2, demo.steps], got {self.num_checkpoints}")
        _require(0.0 <= self.warmup_frac < 1.0, "demo.warmup_frac", "must be in [0, 1)")
        _require(0.0 < self.heldout_frac < 0.5, "demo.heldout_frac", "must be in (0, 0.5)")
        _require(self.hidden_size % self.num_heads == 0, "demo.hidden_size",
                 "must be divisible by demo.num_heads")


@dataclass
class CheckpointsConf:
    """Which checkpoints to merge, in training order.

    ``sources``: checkpoint folders or files, folders of checkpoints, or hub
    repos ``org/name@revision`` (see ``lightning_merge/sources.py``). The
    selector keys narrow them: ``names`` (explicit), ``steps`` (``[lo, hi]``),
    ``every`` (every n-th back from the newest), ``last`` (the newest n).
    ``config_dir`` gives ``config.json`` + tokenizer for formats that lack them
    (a Lightning ``.ckpt``); ``tokenizer_dir`` gives the tokenizer alone (a
    tokenizer-only folder, when the checkpoints carry ``config.json`` but no
    tokenizer); ``strip_prefix`` forces the wrapper prefix to strip from
    ``.ckpt``/ZeRO keys (null: detect ``module.``/``model.``/...). ``name_map``
    (``package.module:function``) maps a training framework's tensor names to
    the HF model's when no built-in map knows its layout (``formats/``).
    """

    sources: list[str] = field(default_factory=list)
    last: Optional[int] = 2
    every: Optional[int] = None
    steps: Optional[list[int]] = None
    names: Optional[list[str]] = None
    config_dir: Optional[str] = None
    tokenizer_dir: Optional[str] = None
    strip_prefix: Optional[str] = None
    hub_cache: Optional[str] = None
    name_map: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.last is None or self.last >= 1, "checkpoints.last",
                 f"must be >= 1 or null, got {self.last}")
        _require(self.every is None or self.every >= 1, "checkpoints.every",
                 f"must be >= 1 or null, got {self.every}")
        _require(self.steps is None or (len(self.steps) == 2 and self.steps[0] <= self.steps[1]),
                 "checkpoints.steps", f"must be [lo, hi] with lo <= hi, got {self.steps}")

    def selector(self):
        from .sources import Selector

        return Selector(names=self.names, steps=self.steps, every=self.every, last=self.last)


@dataclass
class TextSetConf:
    """A held-out text set, loaded through ``datasets``.

    Either ``path``, a local json/jsonl/parquet/txt file (filled in by the demo
    for experiment ``tiny``), or ``name`` (+ ``config_name``), a hub dataset
    read from the ``datasets`` cache (offline once cached); ``split`` picks the
    split. The size knobs (the paper's held-out-size ablation): ``max_documents``
    (a seeded subset of documents) and ``max_tokens`` (a seeded subset of
    documents up to that token budget); then ``num_blocks`` evenly spaced
    windows of ``block_size`` tokens are kept from the packed stream.

    ``txt_documents``: how a ``.txt`` file is cut into documents: ``file`` (the
    whole file is one document, the default), ``blank_lines`` (documents are
    separated by one or more blank lines, and keep their own line breaks) or
    ``lines`` (one document per line, blank lines dropped; the old reading).
    Other file types ignore it.
    """

    path: str = ""
    name: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    block_size: int = 256
    num_blocks: Optional[int] = 256
    max_tokens: Optional[int] = None
    max_documents: Optional[int] = None
    seed: int = 0
    txt_documents: str = "file"

    def __post_init__(self) -> None:
        _require(self.txt_documents in ("file", "blank_lines", "lines"), "data.*.txt_documents",
                 f"got {self.txt_documents!r}; use file (one document per .txt file), blank_lines or lines")
        _require(self.block_size >= 2, "data.*.block_size", f"must be >= 2, got {self.block_size}")
        _require(self.num_blocks is None or self.num_blocks >= 1, "data.*.num_blocks",
                 f"must be >= 1 or null, got {self.num_blocks}")
        _require(self.max_tokens is None or self.max_tokens >= self.block_size, "data.*.max_tokens",
                 f"must be >= block_size ({self.block_size}) or null, got {self.max_tokens}")
        _require(self.max_documents is None or self.max_documents >= 1, "data.*.max_documents",
                 f"must be >= 1 or null, got {self.max_documents}")
        _require(not (self.path and self.name), "data.*.path",
                 "give either a local `path` or a hub dataset `name`, not both")


_MC_MOVED = ("the built-in multiple-choice scorer was replaced by lm-evaluation-harness, whose prompts are "
             "lm-eval's own (subject descriptions, C-Eval/CMMLU's 答案：): use search.objective=lmeval "
             "lmeval.task=mmlu_local lmeval.data.mmlu_local=PATH lmeval.metric=acc (ceval_local, cmmlu_local for "
             "C-Eval/CMMLU folders; lmeval.num_fewshot=5; a cached hub dataset: lmeval.task=mmlu / ceval-valid / "
             "cmmlu), or report.lmeval.tasks=[mmlu_local] to report it (README: lm-evaluation-harness tasks)")


@dataclass
class MCSetConf:
    """Retired: ``data.mc`` (the old multiple-choice scorer). Kept as a key only so that a command that sets it
    is refused with the lm-eval options that replace it, not with an unknown-key error."""

    path: str = ""
    name: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "test"
    dev_split: Optional[str] = "dev"
    schema: str = "auto"
    num_fewshot: int = 0
    max_items: Optional[int] = None
    continuation: str = "text"

    def __post_init__(self) -> None:
        _require(not (self.path or self.name), "data.mc", _MC_MOVED)


@dataclass
class DataConf:
    """Held-out data: the report set, the search subset and out-of-domain sets.

    The search objective is computed on ``search_blocks`` evenly spaced blocks
    of the held-out set (the paper's small held-out set); every candidate is
    then reported on the whole ``heldout`` set and on each ``ood`` set.
    """

    heldout: TextSetConf = field(default_factory=TextSetConf)
    search_blocks: Optional[int] = 64
    ood: dict[str, TextSetConf] = field(default_factory=dict)
    mc: MCSetConf = field(default_factory=MCSetConf)
    batch_size: int = 8

    def __post_init__(self) -> None:
        _require(self.search_blocks is None or self.search_blocks >= 1, "data.search_blocks",
                 f"must be >= 1 or null (use the whole held-out set), got {self.search_blocks}")
        _require(self.batch_size >= 1, "data.batch_size", "must be >= 1")


@dataclass
class LMEvalConf:
    """lm-evaluation-harness on the resident merge (``lightning_merge/lmeval/``).

    ``task``, ``metric`` and ``filter`` (lm-eval's results key is ``metric,filter``: ``acc`` + ``none``,
    ``exact_match`` + ``strict-match``; on Hydra's command line a comma needs quotes, hence two keys) are
    the search objective with ``search.objective=lmeval``: minimised as ``1 - metric`` when lm-eval
    says higher is better, as the metric itself otherwise. ``limit`` (items per task; < 1: a
    fraction), ``num_fewshot`` (null: the task's own default) and ``seed`` (the few-shot sampler's,
    reset before every evaluation so every trial sees the same prompts) apply to the objective and
    the report tasks alike. ``data``: the files of the shipped offline tasks (``mmlu_local``,
    ``ceval_local``, ``cmmlu_local``, ``gsm8k_local``, ``text_local``, ``cloze_local``; each listed in
    ``conf/config.yaml``, so ``lmeval.data.gsm8k_local=/data/gsm8k`` needs no ``+``), task name -> file or
    folder (null: not given); ``include_path``: more folders of task YAMLs. Searching on a task that is
    also reported on the same split is refused unless ``allow_same_split``; the held-out text is
    checked for documents sharing ``ngram``-word n-grams with the reported tasks (a warning).
    """

    task: Optional[str] = None
    metric: str = "acc"
    filter: str = "none"
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    seed: int = 1234
    batch_size: int = 8
    max_gen_toks: int = 256
    add_bos_token: Optional[bool] = None
    data: dict[str, Optional[str]] = field(default_factory=dict)
    include_path: list[str] = field(default_factory=list)
    allow_same_split: bool = False
    ngram: int = 13

    def __post_init__(self) -> None:
        _require(self.limit is None or self.limit > 0, "lmeval.limit", f"must be > 0 or null, got {self.limit}")
        _require(self.num_fewshot is None or self.num_fewshot >= 0, "lmeval.num_fewshot",
                 f"must be >= 0 or null (the task's default), got {self.num_fewshot}")
        _require(self.batch_size >= 1, "lmeval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_gen_toks >= 1, "lmeval.max_gen_toks", f"must be >= 1, got {self.max_gen_toks}")
        _require(self.ngram >= 1, "lmeval.ngram", f"must be >= 1, got {self.ngram}")
        _require(bool(self.metric) and self.metric.count(",") <= 1, "lmeval.metric",
                 f"got {self.metric!r}; name the metric (acc, acc_norm, exact_match, word_perplexity) and its "
                 "filter in lmeval.filter (none, strict-match, flexible-extract)")
        _require(bool(self.filter) and "," not in self.filter, "lmeval.filter",
                 f"got {self.filter!r}; one lm-eval filter name, e.g. none or strict-match")

    @property
    def metric_key(self) -> str:
        """``metric,filter`` as lm-eval's results spell it (a quoted ``metric,filter`` in ``metric`` wins)."""
        return self.metric if "," in self.metric else f"{self.metric},{self.filter}"


@dataclass
class ModelConf:
    """How the model skeleton is built from the first checkpoint's config."""

    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
                 f"got {self.dtype!r}; use float32, bfloat16 or float16")


@dataclass
class SearchConf:
    """The merge-weight search.

    ``name``: ``paper`` (Algorithm 1 of arXiv 2403.19390: start at the space's
    initial points, then a GP with ``acquisition`` ei, pi, ucb or gp_hedge
    proposes), ``ax`` (the Ax Client default: Sobol, then its GP), ``random`` or
    ``grid``. ``space``: ``pairwise`` (``lam`` in ``[alpha, 1]`` on the newer
    of the two checkpoints ``pair``, indices into the loaded ones, negative from
    the newest) or ``simplex`` (weights over all loaded checkpoints summing to 1,
    each at least ``min_weight``; ``parameterization`` constrained or normalized,
    see ``lightning_merge/spaces.py``).

    Stopping: ``trials`` search trials (baselines not counted), or earlier when
    ``max_seconds`` of search have passed in this process, or when the best
    objective improved by less than ``plateau_tol`` (relative) over the last
    ``plateau_trials`` trials. ``restart=true`` moves an earlier search in the
    same output_dir aside instead of resuming it. ``background_bookkeeping``:
    run Ax's record keeping and snapshot (per trial for ``ax`` and ``random``;
    in batches on the snapshot's time budget for ``paper`` and ``grid``) on a
    thread beside the next evaluation; false runs them in line. On the
    Python-bound CPU default the two measured within noise of each other (the
    thread slows the evaluation about as much as it hides; see
    ``benchmarks/trial_overhead.py``); where evaluation is kernel-bound (GPUs,
    large models) the thread hides the bookkeeping.

    ``snapshot_every_s``: the Ax snapshot (``ax_snapshot.json``, whose write
    grows with the experiment: ~1.8 s at 200 trials) is written at most this
    often, and never more than 5% of the time; always at the end of the search,
    at a stop and at a preemption. The ledger is the source of truth: a resume
    after a crash re-attaches what the snapshot lacks (``search.py``).

    ``repeat_tol`` and ``min_gain``: a proposal within ``repeat_tol`` of an
    evaluated point (in every coordinate of the unit cube) is a repeat, never
    evaluated; ``paper`` then evaluates its best other point, or ends the search
    as converged when that point's expected improvement is below ``min_gain``
    times the best objective (0: never; the search then ends only at its budget
    or when every candidate point is a repeat). See ``search.py``.

    ``warm_start``: weights to evaluate as the search's first trials, one list
    per point, one weight per loaded checkpoint (oldest first), each a point of
    the space (``mode=watch`` starts each round from the previous round's best
    and the best schedule so far this way).
    """

    name: str = "paper"
    space: str = "pairwise"
    alpha: float = 0.3
    pair: list[int] = field(default_factory=lambda: [-2, -1])
    min_weight: float = 0.0
    parameterization: str = "constrained"
    trials: int = 10
    acquisition: str = "gp_hedge"
    objective: str = "heldout_loss"
    seed: int = 0
    max_seconds: Optional[float] = None
    plateau_trials: Optional[int] = None
    plateau_tol: float = 1e-4
    max_failures: int = 3
    restart: bool = False
    background_bookkeeping: bool = True
    snapshot_every_s: float = 60.0
    repeat_tol: float = 5e-3
    min_gain: float = 1e-9
    warm_start: Optional[list[list[float]]] = None

    def __post_init__(self) -> None:
        _require(self.name in ("paper", "ax", "random", "grid"), "search.name",
                 f"got {self.name!r}; use paper, ax, random or grid")
        _require(self.space in ("pairwise", "simplex"), "search.space",
                 f"got {self.space!r}; use pairwise or simplex")
        _require(0.0 <= self.alpha < 1.0, "search.alpha",
                 f"must be in [0, 1), got {self.alpha}")
        _require(len(self.pair) == 2 and self.pair[0] != self.pair[1], "search.pair",
                 f"must be two different checkpoint indices [older, newer], got {self.pair}")
        _require(-1.0 < self.min_weight <= 0.25, "search.min_weight",
                 f"must be in (-1, 0.25] (0: no negative weights), got {self.min_weight}")
        _require(self.parameterization in ("constrained", "normalized"), "search.parameterization",
                 f"got {self.parameterization!r}; use constrained (K-1 weights, sum <= 1) or normalized")
        _require(self.min_weight >= 0 or self.parameterization == "constrained", "search.min_weight",
                 "negative weights need search.parameterization=constrained")
        _require(self.trials >= 2, "search.trials",
                 f"must be >= 2 (the two initial points), got {self.trials}")
        _require(not self.objective.startswith("mc_acc"), "search.objective", _MC_MOVED)
        _require(self.objective in ("heldout_loss", "lmeval"), "search.objective",
                 f"got {self.objective!r}; use heldout_loss or lmeval (with lmeval.task and lmeval.metric)")
        _require(self.acquisition in ("ei", "pi", "ucb", "gp_hedge"), "search.acquisition",
                 f"got {self.acquisition!r}; use ei, pi, ucb or gp_hedge")
        _require(self.max_seconds is None or self.max_seconds > 0, "search.max_seconds",
                 f"must be > 0 or null, got {self.max_seconds}")
        _require(self.plateau_trials is None or self.plateau_trials >= 1, "search.plateau_trials",
                 f"must be >= 1 or null (off), got {self.plateau_trials}")
        _require(self.plateau_tol >= 0, "search.plateau_tol", f"must be >= 0, got {self.plateau_tol}")
        _require(self.max_failures >= 1, "search.max_failures", f"must be >= 1, got {self.max_failures}")
        _require(0 < self.repeat_tol < 0.5, "search.repeat_tol",
                 f"must be in (0, 0.5) (a fraction of each parameter's range), got {self.repeat_tol}")
        _require(self.min_gain >= 0, "search.min_gain", f"must be >= 0 (0: never converge), got {self.min_gain}")
        _require(self.snapshot_every_s >= 0, "search.snapshot_every_s",
                 f"must be >= 0 (0: after every trial), got {self.snapshot_every_s}")
        _require(self.warm_start is None or all(len(w) >= 2 for w in self.warm_start), "search.warm_start",
                 f"must be a list of weight lists (one weight per checkpoint), got {self.warm_start}")


@dataclass
class BaselinesConf:
    """The baselines evaluated in every search run, on the same blocks as the search.

    Each single checkpoint, the uniform average of all loaded checkpoints, LAWA
    (uniform over the newest ``lawa_k``), EMA (``ema_alpha`` on the newest,
    ``alpha (1 - alpha)^i`` on the i-th older, the remainder on the oldest) and
    WMA (linearly rising weights, PMA's schemes), and greedy soup (add
    checkpoints best-first while the uniform soup's search objective improves).
    Baselines that lie in the search space are recorded as trials, so the GP
    learns from them too (``as_trials``).
    """

    enabled: bool = True
    lawa_k: int = 4
    ema_alpha: float = 0.2
    greedy_soup: bool = True
    as_trials: bool = True

    def __post_init__(self) -> None:
        _require(self.lawa_k >= 2, "baselines.lawa_k", f"must be >= 2, got {self.lawa_k}")
        _require(0.0 < self.ema_alpha < 1.0, "baselines.ema_alpha", f"must be in (0, 1), got {self.ema_alpha}")


@dataclass
class ReportLMEvalConf:
    """``report.lmeval.tasks``: lm-eval tasks the final candidates (each checkpoint, the best baseline and
    the best merge) are scored on after the search, with ``lmeval``'s settings: the paper's results table."""

    tasks: list[str] = field(default_factory=list)


@dataclass
class ReportConf:
    """The report in the run directory: ``report.md`` kept current during the search, and its plots.

    During the search report.md is rewritten at most every ``refresh_s`` and
    the plots at most every ``plot_every_s``, neither more than 5% of the time
    (``report.LiveReport``); both are written at the end and at a preemption.

    ``loggers``: experiment trackers to log to as well, any of ``csv``, ``tensorboard``, ``wandb``,
    ``mlflow`` (Lightning's loggers, on rank 0, under ``<run>/trackers/``; ``trackers.py``): per trial
    the objective, the weights, the gain and the origin; per run (or watch round) the losses, the
    out-of-domain losses, the stage times, the plots and the trials table.
    """

    plot_every_s: float = 30.0
    refresh_s: float = 5.0
    progress: bool = True
    loggers: list[str] = field(default_factory=list)
    lmeval: "ReportLMEvalConf" = field(default_factory=lambda: ReportLMEvalConf())

    def __post_init__(self) -> None:
        _require(self.plot_every_s >= 0, "report.plot_every_s", f"must be >= 0, got {self.plot_every_s}")
        _require(self.refresh_s >= 0, "report.refresh_s", f"must be >= 0 (0: after every trial), got {self.refresh_s}")
        from .trackers import _parse_names

        try:  # an unknown name, or a tracker whose package is missing, is refused before any work
            _parse_names(self.loggers)
        except ValueError as e:
            raise ConfigError(f"config option {e}") from None


@dataclass
class StrategyConf:
    """How evaluation is distributed (Lightning strategy).

    ``single``: one process (CPU or one GPU). ``ddp``: ``devices`` x
    ``num_nodes`` processes, each holding a whole model and evaluating its own
    blocks (gloo on CPU, NCCL on GPU). ``deepspeed_stage_3`` (GPUs only; Lightning
    refuses both on CPU) and ``fsdp``: each rank holds a shard of the
    model and of every source, and merges only its shard. ``timeout_s`` bounds
    collectives so a lost rank fails the job instead of hanging it.
    """

    name: str = "single"
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        _require(self.name in ("single", "ddp", "deepspeed_stage_3", "fsdp"), "strategy.name",
                 f"got {self.name!r}; use single, ddp, deepspeed_stage_3 or fsdp")
        _require(not (self.name in ("deepspeed_stage_3", "fsdp") and self.accelerator == "cpu"),
                 "strategy.accelerator", f"Lightning runs strategy={self.name} only on GPUs; use "
                 "strategy.accelerator=gpu, or strategy=ddp on CPU")
        _require(self.devices >= 1, "strategy.devices", "must be >= 1")
        _require(self.num_nodes >= 1, "strategy.num_nodes", "must be >= 1")
        _require(self.name != "single" or (self.devices == 1 and self.num_nodes == 1), "strategy.devices",
                 "strategy=single runs one process; use strategy=ddp for several devices or nodes")
        _require(self.accelerator in ("cpu", "gpu", "cuda", "auto"), "strategy.accelerator",
                 f"got {self.accelerator!r}; use cpu, gpu or auto")


@dataclass
class MergeConf:
    """Given weights (``mode=evaluate`` / ``mode=merge``) and the written model.

    ``recipe``: a ``merge.yaml`` written with an earlier merge; its sources and
    weights are used (``mode=merge merge.recipe=out/merged/merge.yaml``).
    ``nonfloat``: ``equal`` (integer buffers must agree) or ``newest``.
    ``normalize``: divide the weights by their sum (true), or use them as given
    (false). Left unset (null), weights are used as given, and weights that do
    not sum to 1 are warned about with the factor they scale the model by.
    ``format``: ``hf`` (an HF folder in ``out``, the default), ``source`` (the
    sources' own framework format, in ``<run>/merged_<format>``, e.g.
    ``merged_torchtitan``: training resumes or anneals from it) or ``both``.
    ``optimizer`` (own format only): ``none`` (model only), ``newest`` (the
    newest source's optimizer state) or ``average`` (averaged with the merge
    weights); see ``lightning_merge/write_source.py``.
    ``kernel``: how the resident re-merge runs each trial (``lightning_merge/kernels.py``):
    ``auto`` (a fused compiled kernel for merges of 67M+ elements, where a C++ compiler
    or Triton is present), ``compiled`` (always) or ``eager`` (PyTorch ops only). All
    three give bitwise the same merge; the compiled code is cached in
    ``cache_dir/inductor``.
    """

    weights: Optional[list[float]] = None
    recipe: Optional[str] = None
    normalize: Optional[bool] = None
    nonfloat: str = "equal"
    write: bool = True
    out: str = "merged"
    dtype: Optional[str] = None
    max_shard_bytes: int = 5 * 1024**3
    format: str = "hf"
    optimizer: str = "none"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        _require(self.kernel in ("auto", "eager", "compiled"), "merge.kernel",
                 f"got {self.kernel!r}; use auto, eager or compiled")
        _require(self.nonfloat in ("equal", "newest"), "merge.nonfloat",
                 f"got {self.nonfloat!r}; use equal or newest")
        _require(self.format in ("hf", "source", "both"), "merge.format",
                 f"got {self.format!r}; use hf, source or both")
        _require(self.optimizer in ("none", "newest", "average"), "merge.optimizer",
                 f"got {self.optimizer!r}; use none, newest or average")
        _require(self.dtype in (None, "float32", "bfloat16", "float16"), "merge.dtype",
                 f"got {self.dtype!r}; use null (keep), float32, bfloat16 or float16")
        _require(self.max_shard_bytes >= 1 << 20, "merge.max_shard_bytes", "must be at least 1 MiB")


@dataclass
class WatchConf:
    """``mode=watch``: a round of search for each new checkpoint of a run in flight (``watch.py``).

    A round starts once ``every`` checkpoints newer than the last round's have been completely written
    (each format's completion rule), on the newest of them, over it and the checkpoints before it that
    ``checkpoints.*`` select (``checkpoints.last=K``: the newest K). ``until_step``: stop after the round
    of a checkpoint at or past this step (null: run until stopped). ``poll_s`` / ``max_poll_s``: the
    first and the longest wait between looks at the folder while nothing is new (the wait doubles).
    ``stop_file``: stop when this file appears (relative to the run directory), after the round in
    flight; SIGTERM/SIGUSR2 stop at the next trial boundary (and requeue under SLURM). ``keep_merged``:
    ``latest`` (``merged/`` is the newest round's best merge; older rounds' merges are removed) or
    ``all`` (every round keeps its own). ``max_idle_s``: stop after this long with nothing new (null:
    never).
    """

    every: int = 1
    until_step: Optional[int] = None
    poll_s: float = 5.0
    max_poll_s: float = 120.0
    stop_file: str = "STOP"
    keep_merged: str = "latest"
    max_idle_s: Optional[float] = None

    def __post_init__(self) -> None:
        _require(self.every >= 1, "watch.every", f"must be >= 1, got {self.every}")
        _require(self.poll_s > 0 and self.max_poll_s >= self.poll_s, "watch.poll_s",
                 f"need 0 < watch.poll_s <= watch.max_poll_s, got {self.poll_s} and {self.max_poll_s}")
        _require(self.keep_merged in ("latest", "all"), "watch.keep_merged",
                 f"got {self.keep_merged!r}; use latest or all")
        _require(self.max_idle_s is None or self.max_idle_s > 0, "watch.max_idle_s",
                 f"must be > 0 or null, got {self.max_idle_s}")
        _require(bool(self.stop_file), "watch.stop_file", "must name a file (relative to the run directory)")


@dataclass
class RunConfig:
    """The whole run. ``mode``: search | evaluate | merge | watch."""

    experiment: str = "tiny"
    mode: str = "search"
    seed: int = 0
    output_dir: str = "outputs/tiny/paper"
    cache_dir: str = "~/.cache/lightning_merge"
    threads: int = 1
    demo: DemoConf = field(default_factory=DemoConf)
    checkpoints: CheckpointsConf = field(default_factory=CheckpointsConf)
    data: DataConf = field(default_factory=DataConf)
    model: ModelConf = field(default_factory=ModelConf)
    search: SearchConf = field(default_factory=SearchConf)
    baselines: BaselinesConf = field(default_factory=BaselinesConf)
    report: ReportConf = field(default_factory=ReportConf)
    strategy: StrategyConf = field(default_factory=StrategyConf)
    merge: MergeConf = field(default_factory=MergeConf)
    watch: WatchConf = field(default_factory=WatchConf)
    lmeval: LMEvalConf = field(default_factory=LMEvalConf)

    def __post_init__(self) -> None:
        _require(self.mode in ("search", "evaluate", "merge", "watch"), "mode",
                 f"got {self.mode!r}; use search, evaluate, merge or watch")
        if self.mode == "watch":
            _require(not self.checkpoints.names, "checkpoints.names",
                     "mode=watch follows new checkpoints; select with checkpoints.last (or steps/every), not names")
            _require(self.checkpoints.last is not None and self.checkpoints.last >= 2, "checkpoints.last",
                     f"mode=watch merges the newest K checkpoints each round; set checkpoints.last=K >= 2, "
                     f"got {self.checkpoints.last}")
            _require(not self.search.restart, "search.restart",
                     "mode=watch resumes its rounds; to start over, give a new output_dir")
        _require(self.threads >= 0, "threads", "must be >= 0 (0 keeps torch's default)")
        if self.search.objective == "lmeval":
            _require(bool(self.lmeval.task), "lmeval.task",
                     "search.objective=lmeval needs a task, e.g. lmeval.task=gsm8k_local lmeval.metric=exact_match,strict-match")
            _require(self.lmeval.allow_same_split or self.lmeval.task not in self.report.lmeval.tasks,
                     "report.lmeval.tasks", f"the search's task {self.lmeval.task!r} is also reported: a merge chosen "
                     "on a split and reported on it overstates the gain. Report another task or split, or set "
                     "lmeval.allow_same_split=true")
        if self.mode in ("evaluate", "merge"):
            _require(self.merge.weights is not None or self.merge.recipe is not None, "merge.weights",
                     f"mode={self.mode} needs weights, e.g. merge.weights=[0.4,0.6] "
                     "(or merge.recipe=PATH/merge.yaml)")


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as ``schema``, and the ``lm_dirname``, ``lm_experiment``,
    ``lm_run`` and ``lm_rank_log`` resolvers."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="schema", node=RunConfig)
    if not OmegaConf.has_resolver("lm_dirname"):
        OmegaConf.register_new_resolver("lm_dirname", run_dirname)
    if not OmegaConf.has_resolver("lm_experiment"):
        OmegaConf.register_new_resolver("lm_experiment", _lm_experiment)
    if not OmegaConf.has_resolver("lm_run"):
        OmegaConf.register_new_resolver("lm_run", _lm_run)
    if not OmegaConf.has_resolver("lm_rank_log"):
        OmegaConf.register_new_resolver("lm_rank_log", _lm_rank_log)


def _lm_rank_log(path: str) -> str:
    """Hydra's job log file on global rank 0, ``os.devnull`` on every other rank (conf/config.yaml).

    A run folder has one writer (runlock.py): Hydra's file handler would otherwise open
    ``<run>/train_ddp_process_1.log`` in each rank Lightning launches, and every srun task would
    append to ``<run>/__main__.log``. The other ranks' warnings still reach their stderr.
    """
    import os

    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return path if int(os.environ[var]) == 0 else os.devnull
    rank = int(os.environ.get("NODE_RANK", 0)) * 1000 + int(os.environ.get("LOCAL_RANK", 0))
    return path if rank == 0 else os.devnull


def to_run_config(cfg: Any) -> RunConfig:
    """Turn a composed DictConfig into a checked :class:`RunConfig` (runs ``__post_init__``)."""
    from omegaconf import OmegaConf

    _check_keys(OmegaConf.to_container(cfg, resolve=False), RunConfig, "")
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):  # pragma: no cover - config.yaml always uses the schema
        raise ConfigError("the composed config is not a RunConfig; does config.yaml list `schema`?")
    return obj


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Refuse keys the schema does not define (``+foo=1`` would otherwise be dropped silently)."""
    import dataclasses
    import typing

    if not isinstance(node, dict) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in names:
            raise ConfigError(f"unknown config key `{prefix}{key}`; the keys of "
                              f"`{prefix.rstrip('.') or '<root>'}` are {sorted(names)}")
        sub = hints[key]
        args = typing.get_args(sub)
        if dataclasses.is_dataclass(sub):
            _check_keys(value, sub, f"{prefix}{key}.")
        elif typing.get_origin(sub) is dict and args and dataclasses.is_dataclass(args[1]) \
                and isinstance(value, dict):
            for k, v in value.items():
                _check_keys(v, args[1], f"{prefix}{key}.{k}.")
