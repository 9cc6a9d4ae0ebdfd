"""MergeSearch: a Lightning callback that searches merges of the run's last K checkpoints during ``fit``.

At every checkpoint save (``on_save_checkpoint``, which Lightning calls on
every rank while ModelCheckpoint dumps a checkpoint) the callback takes a CPU
copy of the tensors this rank holds (see ``callback_eval.py``) and keeps the
newest ``k``. Every ``every_n_checkpoints``-th save, once ``k`` are held, it
runs a small search inside that same hook, before the checkpoint is written:

- rank 0 asks :class:`~lightning_merge.search.AxSearch` (the paper's GP-BO,
  arXiv 2403.19390, or Ax/random/grid); the weights are broadcast;
- every rank merges its copies into its live tensors in place (fp32);
- every rank evaluates the trainer's validation set, each sample once, and the
  exact ``sum(loss x count)`` and ``sum(count)`` are reduced over ranks, so the
  objective is what one process would compute;
- the last checkpoint alone and the uniform average are evaluated first, in
  every search, and reported beside the best.

Why wait for ``k`` copies (not 2): the space (simplex over ``k``, or the
paper's pair) is then the same in every search of a run, so their results
compare, and early training, where checkpoints change fastest and merges say
least, costs no evaluations.

Afterwards the live weights and buffers, the train/eval mode of every
submodule and every RNG state are put back exactly, so training continues bit
for bit as without the callback (the checkpoint being written holds the
unmerged weights). Results go to ``trainer.loggers`` (rank 0), ``self.history``
(every rank) and, with ``save_dir``, to ``save_dir/step-<global_step>/``.

Sharded strategies (FSDP, ModelParallel): each rank holds and merges only its
shard; saving is refused (it would need a gather), and that path is untested
on CPU, where Lightning cannot run FSDP. DeepSpeed ZeRO-3 is refused: its
parameters live outside ``p.data``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback

from .callback_eval import LiveState, Objective, copy_to_cpu, local_tensors, merge_live, restore_live, safe_merge
from .config import ConfigError, SearchConf

__all__ = ["MergeSearch"]

log = logging.getLogger(__name__)
_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")


def _key(weights) -> tuple:
    return tuple(round(float(w), 12) for w in weights)


def _fmt(weights) -> str:
    return "[" + ", ".join(f"{w:.3f}" for w in weights) + "]"


class MergeSearch(Callback):
    """Search merges of the last ``k`` checkpoints every ``every_n_checkpoints`` saves (module docstring).

    Args:
        k: checkpoints held (>= 2); memory is ``k`` x this rank's share of the model, on CPU.
        every_n_checkpoints: search at every n-th checkpoint save, once ``k`` are held.
        trials: search trials per search (>= 2; the two baselines are extra).
        space: ``simplex`` (weights over the ``k`` copies, summing to 1) or ``pairwise``
            (the paper's ``lam`` in ``[alpha, 1]`` on the newest of the last two).
        alpha: the pairwise space's lower bound on ``lam``.
        acquisition: ``ei``, ``pi``, ``ucb`` or ``gp_hedge`` (the ``paper`` optimizer's).
        seed: the optimizer's seed (the training RNG is never touched).
        save_dir: rank 0 writes each search's best merge to ``save_dir/step-<global_step>/``.
        loss_fn: ``loss_fn(pl_module, batch) -> (loss_sum, count)``; default: the mean loss
            ``validation_step`` returns (tensor or ``dict['loss']``) x the batch size.
        optimizer: ``paper`` (default), ``ax``, ``random`` or ``grid`` (SearchConf ``name``).
        **search_options: other :class:`~lightning_merge.config.SearchConf` fields
            (``min_weight``, ``parameterization``, ``pair``, ``max_seconds``, ``max_failures``).

    Saves are counted once per ``global_step`` (``save_last`` or a second
    ModelCheckpoint at the same step re-takes the copy, it is not a new
    checkpoint), from the first save of the fit. ``trials`` counts the
    optimizer's proposals; one that repeats an evaluated point (the simplex
    space's first two are the baselines) is answered from the cache, not
    evaluated again. Any checkpoint dump during ``fit`` counts, a SLURM
    requeue save (SIGUSR1) included.

    ``history`` (the same on every rank) holds one dict per search: ``step``,
    ``checkpoint_steps`` (the merged checkpoints' global steps, oldest first),
    ``weights`` (the best, one per checkpoint), ``best_loss``, ``last_loss``,
    ``uniform_loss``, ``gain`` (percent below ``last_loss``), ``trials``,
    ``evaluations``, ``seconds``, ``stop`` (why it ended), ``evaluated`` (every
    point: weights, loss, origin, reused) and ``saved`` (the folder, or None).
    """

    def __init__(self, k: int = 4, every_n_checkpoints: int = 1, trials: int = 8, space: str = "simplex",
                 alpha: float = 0.3, acquisition: str = "gp_hedge", seed: int = 0,
                 save_dir: str | Path | None = None, loss_fn: Callable | None = None, optimizer: str = "paper",
                 **search_options: Any) -> None:
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"MergeSearch(k={k!r}): a merge needs at least 2 checkpoints; give k >= 2")
        if not isinstance(every_n_checkpoints, int) or every_n_checkpoints < 1:
            raise ValueError(f"MergeSearch(every_n_checkpoints={every_n_checkpoints!r}): give an integer >= 1")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("MergeSearch(loss_fn=...): give a callable (pl_module, batch) -> (loss_sum, count)")
        try:
            self.conf = SearchConf(name=optimizer, space=space, alpha=alpha, trials=trials, acquisition=acquisition,
                                   seed=seed, **search_options)
        except TypeError as e:  # an unknown keyword
            raise ValueError(f"MergeSearch: {e}; search options are the fields of lightning_merge.config."
                             "SearchConf") from None
        except ConfigError as e:  # SearchConf names its fields `search.<name>`: the argument of the same name
            raise ValueError(f"MergeSearch: {e} (the MergeSearch argument of that name; `search.name` is "
                             "`optimizer`)") from None
        from .spaces import make_space

        try:
            make_space(self.conf, k)  # checks the pair against k, and min_weight against k
        except ValueError as e:
            raise ValueError(f"MergeSearch(k={k}): {e}") from None
        self.k, self.every_n_checkpoints = k, every_n_checkpoints
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.loss_fn = loss_fn
        self.history: list[dict] = []
        self._held: list[tuple[int, list[torch.Tensor]]] = []  # (global_step, CPU copies), oldest first
        self._saves = 0

    # --- checks before any work --------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse, on every rank before training starts, what a search could not do."""
        if stage != "fit":
            return
        self._held, self._saves = [], 0  # a new fit holds its own checkpoints (history is kept)
        from lightning.pytorch.utilities.model_helpers import is_overridden

        source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
        if (not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0
                or (source is not None and not source.is_defined())):
            raise ValueError("MergeSearch needs a validation dataloader and validation_step to score merges: "
                             "pass val_dataloaders to Trainer.fit (or define val_dataloader()), define "
                             "validation_step, and keep limit_val_batches > 0")
        if getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError("MergeSearch does not support DeepSpeed ZeRO-3 (its parameters live outside "
                             "p.data); use DDP, FSDP, or DeepSpeed stage 1/2")
        if self.save_dir is not None and type(trainer.strategy).__name__ in _SHARDED:
            raise ValueError(f"MergeSearch(save_dir=...): saving a merge under {type(trainer.strategy).__name__} "
                             "would need a gather of every shard, which is not implemented; drop save_dir (the "
                             "weights are in history and the loggers) or train with DDP")
        ckpts = trainer.checkpoint_callbacks
        if not ckpts:
            warnings.warn("MergeSearch: the trainer has no ModelCheckpoint, so it only sees saves made by "
                          "trainer.save_checkpoint", stacklevel=2)
        elif all(getattr(c, "save_weights_only", False) for c in ckpts):
            raise ValueError("MergeSearch sees checkpoints through Callback.on_save_checkpoint, which Lightning "
                             "skips for ModelCheckpoint(save_weights_only=True); set save_weights_only=False")

    # --- at each checkpoint save ------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Every rank: hold a CPU copy of this rank's tensors; search every n-th save once ``k`` are held."""
        if trainer.state.fn != "fit":
            return
        step = int(trainer.global_step)
        with torch.inference_mode(False), torch.no_grad():
            _, live, n_params = local_tensors(pl_module)
            copies = copy_to_cpu(live)
            if trainer.world_size > 1 and not self._sharded(trainer, pl_module) and len(copies) > n_params:
                # DDP: rank 0's buffers are the model (it writes the checkpoint, and DDP broadcasts them
                # before every forward), while another rank's BatchNorm statistics are its own batches'.
                copies[n_params:] = trainer.strategy.broadcast(copies[n_params:], src=0)
            if self._held and self._held[-1][0] == step:  # a second save of this step (save_last, two callbacks)
                self._held[-1] = (step, copies)
                return
            self._held = (self._held + [(step, copies)])[-self.k:]
            self._saves += 1
            if len(self._held) == self.k and self._saves % self.every_n_checkpoints == 0:
                self._run(trainer, pl_module, live)

    def _sharded(self, trainer, pl_module) -> bool:
        if type(trainer.strategy).__name__ in _SHARDED:
            return True
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            return False
        return any(isinstance(p, DTensor) for p in pl_module.parameters())

    def _run(self, trainer, pl_module, live: list[torch.Tensor]) -> None:
        """Every rank: one search, then everything put back as it was."""
        state = LiveState(pl_module)
        held = [c for _, c in self._held]
        t0 = time.perf_counter()
        objective = None
        try:
            objective = Objective(trainer, pl_module, self.loss_fn, self._sharded(trainer, pl_module))
            rec = self._search(trainer, objective, live, held)
            rec["seconds"] = time.perf_counter() - t0
            if self.save_dir is not None and trainer.is_global_zero:
                try:
                    rec["saved"] = self._save(trainer, pl_module, live, held, rec)
                except Exception as e:  # noqa: BLE001 - raising on rank 0 alone would hang the other ranks
                    rec["save_error"] = f"{type(e).__name__}: {e}"
                    log.error("merge search at step %d: could not write %s: %s", rec["step"],
                              self.save_dir / f"step-{rec['step']}", rec["save_error"])
        finally:
            restore_live(live, held[-1])  # the newest copy is the live weights of a moment ago
            state.restore()
            if objective is not None:
                objective.close()
        self.history.append(rec)
        if trainer.is_global_zero:
            self._report(trainer, rec)

    # --- the search, the same collectives on every rank ----------------------------------------
    def _search(self, trainer, objective: Objective, live, held) -> dict:
        from .spaces import make_space

        strategy, zero = trainer.strategy, trainer.is_global_zero
        k, step = len(held), int(trainer.global_step)
        space = make_space(self.conf, k)
        search = None
        if zero:
            from .search import AxSearch

            search = AxSearch(self.conf, space, name=f"merge-step-{step}")
        evaluated: list[dict] = []
        cache: dict[tuple, float] = {}  # identical on every rank: same broadcast weights, reduced losses

        def score(weights: list[float], origin: str, index: int | None) -> float:
            key = _key(weights)
            reused = key in cache
            if not reused:
                cache[key] = objective(failed=not safe_merge(live, held, weights))[0]
            loss = cache[key]
            evaluated.append({"weights": list(weights), "loss": loss, "origin": origin, "reused": reused})
            if search is not None and index is not None:
                if math.isfinite(loss):
                    search.tell(index, loss)
                else:
                    search.fail(index, "non-finite validation loss")
            return loss

        try:
            for origin, w in (("baseline:last", [0.0] * (k - 1) + [1.0]), ("baseline:uniform", [1.0 / k] * k)):
                msg = None
                if zero:
                    params = space.params_for(w)
                    msg = {"index": search.attach(params, origin).index if params is not None else None}
                msg = strategy.broadcast(msg, src=0)
                score(w, origin, msg["index"])
            told, failures, started, stop = 0, 0, time.perf_counter(), None
            while True:
                msg = self._next(search, told, failures, started) if zero else None
                msg = strategy.broadcast(msg, src=0)
                if "error" in msg:
                    raise RuntimeError(f"MergeSearch at step {step}: the optimizer failed on rank 0: {msg['error']}")
                if "stop" in msg:
                    stop = msg["stop"]
                    break
                loss = score(msg["weights"], msg["origin"], msg["index"])
                told += 1
                failures = 0 if math.isfinite(loss) else failures + 1
        finally:
            if search is not None:
                search.close()  # Ax's background bookkeeping ends before the RNG states are put back
        last, uniform = evaluated[0]["loss"], evaluated[1]["loss"]
        finite = [e for e in evaluated if math.isfinite(e["loss"])]
        best = min(finite, key=lambda e: e["loss"]) if finite else evaluated[0]
        gain = 100.0 * (last - best["loss"]) / last if math.isfinite(last) and last != 0 else float("nan")
        return {"step": step, "checkpoint_steps": [s for s, _ in self._held], "weights": best["weights"],
                "origin": best["origin"], "best_loss": best["loss"], "last_loss": last, "uniform_loss": uniform,
                "gain": gain, "trials": told, "evaluations": sum(not e["reused"] for e in evaluated),
                "stop": stop, "evaluated": evaluated, "saved": None}

    def _next(self, search, told: int, failures: int, started: float) -> dict:
        """Rank 0: the next trial to broadcast, or why the search stops."""
        conf = self.conf
        if told >= conf.trials:
            return {"stop": f"trial budget reached ({conf.trials})"}
        if conf.max_seconds is not None and time.perf_counter() - started >= conf.max_seconds:
            return {"stop": f"wall-time budget reached ({conf.max_seconds:g}s)"}
        if failures >= conf.max_failures:
            return {"stop": f"{failures} trials failed in a row (max_failures)"}
        try:
            with torch.enable_grad():  # the GP is fitted by gradient; the search itself runs under no_grad
                prop = search.ask()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or they wait forever
            return {"error": f"{type(e).__name__}: {e}"}
        if prop is None:
            return {"stop": f"converged: {search.converged}"}
        return {"index": prop.index, "weights": [float(w) for w in prop.weights], "origin": prop.origin}

    # --- results --------------------------------------------------------------------------------
    def _report(self, trainer, rec: dict) -> None:
        """Rank 0: one progress line, and the metrics through the trainer's own loggers."""
        log.info("merge search at step %d: best %.6g (last %.6g, uniform %.6g), gain %+.2f%%, weights %s "
                 "(%d trials, %d evaluations, %.1fs; %s)", rec["step"], rec["best_loss"], rec["last_loss"],
                 rec["uniform_loss"], rec["gain"], _fmt(rec["weights"]), rec["trials"], rec["evaluations"],
                 rec["seconds"], rec["stop"])
        metrics = {"merge/best_loss": rec["best_loss"], "merge/last_loss": rec["last_loss"],
                   "merge/uniform_loss": rec["uniform_loss"], "merge/gain": rec["gain"],
                   **{f"merge/weight_{i}": w for i, w in enumerate(rec["weights"])}}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def _save(self, trainer, pl_module, live, held, rec: dict) -> str | None:
        """Rank 0: write the best merge to ``save_dir/step-<global_step>/``, whole or not at all.

        ``lightning_module.safetensors`` holds ``pl_module.state_dict()`` merged;
        an HF model found among the module's children is also written with
        ``save_pretrained`` (into the folder itself, or ``<attribute>/`` when
        there are several), with a ``tokenizer`` attribute beside it;
        ``merge.json`` holds the record.
        """
        from safetensors.torch import save_file

        from .io import atomic_write_json, publishing_dir

        merge_live(live, held, rec["weights"])  # restored from the newest copy by the caller
        final = self.save_dir / f"step-{rec['step']}"
        with publishing_dir(final) as tmp:
            state = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in pl_module.state_dict().items()}
            save_file(state, str(tmp / "lightning_module.safetensors"),
                      metadata={"weights": str(rec["weights"]), "step": str(rec["step"])})
            models = _hf_models(pl_module)
            for name, model in models:
                model.save_pretrained(tmp if name is None else tmp / name)
            tok = getattr(pl_module, "tokenizer", None)
            if models and hasattr(tok, "save_pretrained"):
                tok.save_pretrained(tmp)
            atomic_write_json(tmp / "merge.json", {**rec, "saved": str(final)})
        return str(final)


def _hf_models(pl_module) -> list[tuple[str | None, Any]]:
    """The module's direct children that are transformers models: ``[(None, m)]`` for one, named for several."""
    import sys

    tf = sys.modules.get("transformers")  # never imported here: a module holding an HF model has imported it
    if tf is None:
        return []
    found = [(n, m) for n, m in pl_module.named_children() if isinstance(m, tf.PreTrainedModel)]
    return [(None, found[0][1])] if len(found) == 1 else found
