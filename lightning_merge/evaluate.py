"""Held-out evaluation with Lightning: exact token-weighted loss on every strategy.

Why sums: the held-out loss is ``sum(token NLL) / sum(tokens)`` over the whole
set. Averaging per-batch or per-rank means (``self.log(..., sync_dist=True)``,
``MeanMetric``) is biased whenever batches or ranks hold different numbers of
tokens, and Lightning's default ``DistributedSampler`` repeats samples to even
out ranks. So each rank evaluates a disjoint shard of the blocks (padded with
masked blocks that count zero tokens, so every rank runs the same number of
steps), accumulates a float64 NLL sum and an int64 token count in a
torchmetrics metric with ``sum`` states, and the states are all-reduced once
per evaluation. The result is the same number whatever the world size or the
batch size.

The ``Trainer`` is built once and reused for every trial; only ``validate`` is
called per trial. The trial's merge runs inside it, in ``on_validation_start``
(a callback), after the strategy has set the model up: under DDP every rank
merges whole tensors, under ZeRO-3 or FSDP each rank merges only the shard it
holds (``sharding.py``), which exists only once the strategy has sharded the
model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from .config import StrategyConf
from .sampling import ShardSampler, StagedBatches

__all__ = ["EvalResult", "TokenNLL", "ShardSampler", "CausalLMEval", "Evaluator"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """The exact held-out figures of one evaluation."""

    loss: float      # sum of token NLL / number of predicted tokens
    nll_sum: float
    tokens: int
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


class TokenNLL(Metric):
    """Sum of token NLL (float64) and count of predicted tokens (int64), reduced by sum."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _apply(self, fn, exclude_state=()):
        # ``module.to(dtype)`` (Lightning's "-true" precisions, DeepSpeed) would cast the float64 sum
        # to bf16/fp32; torchmetrics guards only .half()/.bfloat16(). Move states, never cast them.
        this = super()._apply(fn, exclude_state=("nll", "tokens"))
        for key in ("nll", "tokens"):
            this._defaults[key] = this._defaults[key].to(this.device)
            setattr(this, key, getattr(this, key).to(this.device))
        return this

    def update(self, nll: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll += nll.to(torch.float64)
        self.tokens += tokens.to(torch.int64)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"nll": self.nll, "tokens": self.tokens}


class CausalLMEval(L.LightningModule):
    """Wraps a causal LM and accumulates exact NLL sums over validation batches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.metric = TokenNLL()
        self.result: dict[str, Any] | None = None
        # Request mode (lm-eval): each batch is ``(index, item)``; ``requests_fn(model, item)``'s output is kept.
        # The same module, so the strategy's wrapping (DDP, FSDP, ZeRO-3) is the one the merges work on.
        self.requests_fn: Callable[[torch.nn.Module, Any], Any] | None = None
        self.request_outputs: list[tuple[int, Any]] = []

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.requests_fn is not None:
            index, item = batch
            out = self.requests_fn(self.model, item)
            if index >= 0:  # -1: a dummy that keeps this rank's forwards in step with the others'
                self.request_outputs.append((int(index), out))
            return
        ids, valid = batch
        logits = self.model(input_ids=ids).logits
        # Shift the labels, not the logits: slicing logits[:, :-1] would copy them (non-contiguous).
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                              reduction="none").view(ids.shape[0], -1)
        per_block = nll.to(torch.float64).sum(dim=1)
        self.metric.update((per_block * valid).sum(), valid.sum() * (ids.shape[1] - 1))

    def on_validation_epoch_end(self) -> None:
        if self.requests_fn is not None:
            return
        out = self.metric.compute()  # all-reduce (sum) across ranks, once
        self.result = {"nll": float(out["nll"]), "tokens": int(out["tokens"])}
        self.metric.reset()


class _Dealt(Dataset):
    """This rank's ``(index, item)`` pairs of a request run (index -1: a dummy run of item 0)."""

    def __init__(self, items: Sequence[Any], indices: list[int]) -> None:
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return i, self.items[max(i, 0)]


def _keep_on_device(cls: type) -> type:
    """A strategy subclass that leaves the model on its device when ``validate`` ends.

    Hack, said plainly: Lightning's ``Strategy.teardown`` moves the module to
    CPU after every ``validate``, which for a search costs a full host<->device
    copy of the model per trial and, under ZeRO-3, strands gathered copies and
    metric states on the CPU (the engine does not move an already partitioned
    model back). We run ``teardown`` with ``module.cpu`` made a no-op.
    """

    def teardown(self) -> None:
        module = self.lightning_module
        if module is None:
            return cls.teardown(self)
        module.cpu = lambda: module  # instance attribute shadows the method for this call only
        try:
            cls.teardown(self)
        finally:
            del module.cpu

    return type(f"KeepOnDevice{cls.__name__}", (cls,), {"teardown": teardown})


def _layer_classes(model: torch.nn.Module | None) -> set[type]:
    """The decoder-layer classes an HF model names in ``_no_split_modules`` (FSDP wraps each)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in (model.modules() if model is not None else []) if type(m).__name__ in names}


def lightning_strategy(conf: StrategyConf, model: torch.nn.Module | None = None):
    """The Lightning strategy object for ``strategy.name``."""
    from datetime import timedelta

    if conf.name == "single":
        if conf.accelerator == "cpu":
            return "auto"
        from lightning.pytorch.strategies import SingleDeviceStrategy

        return _keep_on_device(SingleDeviceStrategy)(device=torch.device("cuda", 0))
    backend = "gloo" if conf.accelerator == "cpu" else None  # None: NCCL on GPUs
    timeout = timedelta(seconds=conf.timeout_s)
    if conf.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return _keep_on_device(DDPStrategy)(process_group_backend=backend, timeout=timeout)
    if conf.name == "deepspeed_stage_3":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # Inference only: no optimizer state; parameters are partitioned across ranks.
        return _keep_on_device(DeepSpeedStrategy)(stage=3, process_group_backend=backend, timeout=timeout)
    if conf.name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        layers = _layer_classes(model)
        return _keep_on_device(FSDPStrategy)(sharding_strategy="FULL_SHARD", use_orig_params=True,
                                             auto_wrap_policy=layers or None,
                                             process_group_backend=backend, timeout=timeout)
    raise ValueError(f"strategy.name={conf.name!r}")


_srun_hint_shown = False


def _quiet_srun_hint() -> None:
    """Lightning's "`srun` ... is available ... but is not used" hint: once in a SLURM job, never outside one.

    Lightning checks for ``srun`` on PATH each time it asks whether it runs under SLURM (several
    times per ``validate``), and each change to the warning filters (every ``catch_warnings``
    block in the search) resets Python's memory of warnings already shown, "once" included; so
    on a machine with SLURM installed the hint came 14-27 times a run. Its own warning is
    therefore always ignored, and the hint is given here, in one log line, only where it is
    right: inside a SLURM job (``SLURM_JOB_ID``) whose python was started without ``srun``
    (Lightning's test: no ``SLURM_NTASKS``, or an interactive job), where a multi-GPU run would
    see one process. Outside a job (a login node, a workstation with the client tools) it is noise.
    """
    global _srun_hint_shown
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    job = os.environ.get("SLURM_JOB_ID")
    srun_used = "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    if _srun_hint_shown or not job or srun_used or shutil.which("srun") is None \
            or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _srun_hint_shown = True
    log.warning("The `srun` command is available on your system but is not used: SLURM job %s runs python "
                "directly, so Lightning sees one process. For several GPUs or nodes, start it with "
                "`srun python -m lightning_merge ...` (slurm/merge.sbatch does).", job)


def _slurm_plugins() -> list:
    """Under SLURM, Lightning's environment without its own requeue: our driver saves and requeues itself."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class _MergeBeforeEval(L.Callback):
    """Applies the pending trial weights once the strategy has set the model up."""

    def __init__(self, evaluator: "Evaluator") -> None:
        self.evaluator = evaluator

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluator._merge_pending()


class _BatchProgress(L.Callback):
    """Reports ``(batches done, batches total)`` of the running evaluation to ``Evaluator.on_batch``."""

    def __init__(self, evaluator: "Evaluator") -> None:
        self.evaluator = evaluator

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        hook = self.evaluator.on_batch
        if hook is not None and trainer.is_global_zero:
            total = trainer.num_val_batches[dataloader_idx] if trainer.num_val_batches else 0
            hook(batch_idx + 1, int(total))


class Evaluator:
    """One ``Trainer`` for the whole run; ``evaluate(blocks)`` is one exact evaluation.

    ``merger_factory(model, prefix)`` builds the object whose ``apply(weights)``
    merges this rank's resident sources into ``model`` in place (``prefix``:
    what the model's names carry before the checkpoint's); it is called once, on
    the first evaluation, after the strategy has placed (and sharded) the model.
    ``set_weights`` makes the next evaluation merge first; evaluations with
    unchanged weights do not merge again.
    """

    def __init__(self, model: torch.nn.Module, conf: StrategyConf, batch_size: int = 8,
                 merger_factory: Callable[[torch.nn.Module, str], Any] | None = None,
                 callbacks: Sequence[L.Callback] = ()) -> None:
        self.module = CausalLMEval(model)
        self.batch_size = batch_size
        self.merger_factory = merger_factory
        self.merger = None
        self.conf = conf
        self.watch = None  # rankwatch.RankWatch, once the ranks are connected
        self.binding = 0  # counts rebind()s: results cached by weights are only valid within one binding
        self._pending: list[float] | None = None
        self._applied: list[float] | None = None
        self.merge_seconds = 0.0
        self.hook_seconds = 0.0  # time in on_merged (Ax bookkeeping when it runs in line)
        self.eval_seconds = 0.0  # all evaluations so far, their merges and hooks left out (mode=watch's cost figure)
        self.on_batch: Callable[[int, int], None] | None = None  # progress within an evaluation (rank 0)
        self._staged: dict[tuple, StagedBatches] = {}  # held-out sets' batches, on the device once per run
        self.on_merged: Callable[[], None] | None = None  # called when a trial's parameters are ready
        # Lightning's banner (GPU/TPU available, tips) would repeat on every rank; keep warnings.
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")
        _quiet_srun_hint()  # before _slurm_plugins() below, Lightning's first check
        self.trainer = L.Trainer(
            accelerator=conf.accelerator, devices=conf.devices, num_nodes=conf.num_nodes,
            strategy=lightning_strategy(conf, model), precision=conf.precision, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False,
            num_sanity_val_steps=0, inference_mode=True, plugins=_slurm_plugins(),
            # The given callbacks first: Preemption's takes SIGTERM back from Lightning before the trial's
            # merge (seconds, in on_validation_start), so a signal during the merge only sets the flag.
            callbacks=[*callbacks, _MergeBeforeEval(self), _BatchProgress(self)],
        )

        if any(getattr(c, "owns_signals", False) for c in callbacks):
            self._leave_signals_alone()

    def _leave_signals_alone(self) -> None:
        """Keep Lightning from installing its SIGTERM (and SLURM requeue) handlers in every ``validate``.

        The driver owns SIGTERM and SIGUSR2 (``slurm.Preemption``: a flag, then a save at the trial
        boundary). Lightning registers its own handlers at the start of each ``validate``, before any
        callback runs; a SIGTERM in that window (the run-stage barrier, the loader's set-up) reached
        Lightning's handler, which aborts the evaluation after one batch (``SIGTERMException``) with
        nothing saved: seen on a real SLURM under an outside ``scontrol requeue``. With registration
        off, our handler, installed before the Trainer, stays in place throughout. Lightning 2.6's
        ``_SignalConnector.register_signal_handlers`` is private; without it the callback's take-back in
        ``on_validation_start`` still narrows the window to those few steps.
        """
        connector = getattr(self.trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "register_signal_handlers"):
            connector.register_signal_handlers = lambda: None

    def set_weights(self, weights: list[float]) -> None:
        """Merge these weights (all ranks must pass the same) before the next evaluation."""
        self._pending = [float(w) for w in weights]
        self.merge_seconds = 0.0

    def _merge_pending(self) -> None:
        attempted = self._pending is not None and self._pending != self._applied  # the same on every rank
        error: Exception | None = None
        try:
            self._merge_now()
        except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised on every rank
            error = e
        finally:
            t0 = time.perf_counter()
            if self.on_merged is not None:
                self.on_merged()
            self.hook_seconds = time.perf_counter() - t0
        if attempted and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            self._agree_on_merge(error)
        elif error is not None:
            raise error

    def _agree_on_merge(self, error: Exception | None) -> None:
        """Every rank raises the same error if any rank's merge failed (one small vote per merge).

        Without it a rank whose source slice failed to read would leave the merge while the others
        went on to evaluate: their next collectives would not match, and the job would hang until
        the timeout, or pair the wrong tensors. A source read error (``SourceReadError``) stays one on
        every rank, so the search stops on all of them; anything else fails the trial on all.
        """
        from .errors import SourceReadError

        flag = torch.tensor([int(error is not None)], device=self.trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one collective, no barrier
        if not flag.item():
            return
        mine = None if error is None else (type(error).__name__, isinstance(error, SourceReadError), str(error))
        every: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(every, mine)
        rank, (kind, is_read, msg) = next((r, e) for r, e in enumerate(every) if e is not None)
        if error is not None and self.trainer.global_rank == rank:
            raise error  # the first failing rank keeps its own exception (and traceback)
        if is_read:
            raise SourceReadError(msg)
        raise RuntimeError(f"the merge failed on rank {rank}: {kind}: {msg}")

    def _merge_now(self) -> None:
        if self._pending is None or self._pending == self._applied:
            return
        if self.merger_factory is None:
            raise RuntimeError("set_weights was called but the Evaluator has no merger_factory")
        t0 = time.perf_counter()
        if self.merger is None:
            # FSDP wraps the whole LightningModule: its root (strategy.model) holds the shards,
            # under names prefixed by the module's attribute ("model.").
            root = self.trainer.strategy.model
            wrapped = root is not None and root is not self.module and type(root).__name__.startswith(
                ("FullyShardedDataParallel",))
            self.merger = self.merger_factory(root, "model.") if wrapped else \
                self.merger_factory(self.module.model, "")
            t0 = time.perf_counter()
        with torch.no_grad():
            self.merger.apply(self._pending)
        self._applied = self._pending
        self.merge_seconds = time.perf_counter() - t0

    def rebind(self, merger_factory: Callable[[torch.nn.Module, str], Any]) -> None:
        """Merge from another series of the same model from now on (a watch round's checkpoints).

        The previous resident sources are released here; the new ones are made resident at the next
        merge (``set_weights`` then an evaluation), exactly as on the first.
        """
        self.merger = None
        self.merger_factory = merger_factory
        self._applied = None
        self.binding += 1
        import gc

        gc.collect()

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    def connect(self, blocks: torch.Tensor, weights: list[float]) -> None:
        """Start every rank and the process group with one small evaluation (one block per rank).

        Lightning launches the other ranks and joins the process group inside
        the first ``validate``; until then ``broadcast`` is the identity on
        every process, so the driver calls this before the first decision that
        rank 0 broadcasts.
        """
        self.set_weights(weights)
        self.evaluate(blocks[: max(1, self.trainer.world_size)])
        if self.watch is None:
            self.watch = self.rank_watch()

    def rank_watch(self):
        """Every rank's host and pid (one gather), and the ranks this process launched (rankwatch.py)."""
        import os
        import socket

        from .rankwatch import RankWatch

        world, rank = self.trainer.world_size, self.trainer.global_rank
        me = (socket.gethostname(), os.getpid())
        roster = [me]
        if world > 1 and torch.distributed.is_initialized():
            roster = [None] * world
            torch.distributed.all_gather_object(roster, me)
        procs = list(getattr(getattr(self.trainer.strategy, "launcher", None), "procs", None) or [])
        per_node = len(procs) + 1
        children = {self.trainer.node_rank * per_node + i + 1: p for i, p in enumerate(procs)}
        return RankWatch(rank, [tuple(r) for r in roster], children, timeout_s=self.conf.timeout_s).start()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (e.g. a preemption signal that reached one node)."""
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

    def broadcast(self, obj: Any) -> Any:
        """Send ``obj`` from rank 0 to every rank (identity on one process).

        Before the first evaluation Lightning has not started the other ranks,
        and its broadcast would silently return each rank's own ``obj``; that is
        refused here (call :meth:`connect` first).
        """
        if self.trainer.world_size > 1 and not torch.distributed.is_initialized():
            raise RuntimeError("Evaluator.broadcast before the ranks are connected: call connect() first")
        return self.trainer.strategy.broadcast(obj, src=0)

    @property
    def sharded(self) -> bool:
        """Parameters are split across ranks (FSDP, ZeRO-3): every forward is collective."""
        return self.trainer.world_size > 1 and type(self.trainer.strategy).__name__.endswith(
            ("FSDPStrategy", "DeepSpeedStrategy"))

    def map(self, fn: Callable[[torch.nn.Module, Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(model, item) for item in items]`` on the current parameters, split over the ranks; on every rank.

        The runner of ``lmeval.model.ResidentLM``: items are dealt round-robin, a rank with fewer runs a
        dummy item so that all run the same number of forwards (FSDP and ZeRO-3 gather parameters in
        every forward), each inside ``validate`` on the strategy's own wrapped model, after the pending
        merge; the outputs are gathered (``all_gather_object``) and returned in item order.
        """
        from .lmeval.model import collect, deal

        t0 = time.perf_counter()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if not items:
            return []
        loader = DataLoader(_Dealt(items, deal(len(items), rank, world)), batch_size=None, num_workers=0)
        module = self.module
        module.requests_fn, module.request_outputs = fn, []
        self.merge_seconds = self.hook_seconds = 0.0
        try:
            self.trainer.validate(module, dataloaders=loader, verbose=False)
            mine = module.request_outputs
        finally:
            module.requests_fn, module.request_outputs = None, []
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        self.eval_seconds += time.perf_counter() - t0 - self.merge_seconds - self.hook_seconds
        return collect(gathered, len(items))

    def evaluate(self, blocks: torch.Tensor) -> EvalResult:
        """Exact held-out loss of the model's current parameters on ``blocks``."""
        t0 = time.perf_counter()
        key = (blocks.data_ptr(), tuple(blocks.shape), blocks.dtype, self.batch_size)
        if key not in self._staged:  # the same held-out set every trial: batched and on the device once
            if len(self._staged) >= 8:  # a few sets per run (search, report, out-of-domain); watch rounds add more
                self._staged.pop(next(iter(self._staged)))
            # The entry holds ``blocks``, so no other tensor can take its address while it is cached.
            self._staged[key] = StagedBatches(blocks, self.batch_size, lambda: self.trainer.strategy.root_device)
        loader = DataLoader(self._staged[key], batch_size=None, num_workers=0)
        self.module.result = None
        self.merge_seconds = self.hook_seconds = 0.0
        self.trainer.validate(self.module, dataloaders=loader, verbose=False)
        self.eval_seconds += time.perf_counter() - t0 - self.merge_seconds - self.hook_seconds
        res = self.module.result
        if res is None or res["tokens"] == 0:
            raise RuntimeError("evaluation produced no tokens; is the held-out set empty?")
        loss = res["nll"] / res["tokens"]
        return EvalResult(loss=loss, nll_sum=res["nll"], tokens=res["tokens"],
                          seconds=time.perf_counter() - t0)
