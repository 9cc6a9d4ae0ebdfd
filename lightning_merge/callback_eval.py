"""What :class:`~lightning_merge.callbacks.MergeSearch` does to the live module on every rank.

Three things, each exact:

- **Held copies** (:func:`local_tensors`, :func:`copy_to_cpu`): the tensors
  this rank holds of the module's parameters and persistent buffers (what
  ``state_dict`` saves), copied to CPU at a checkpoint save. Under DDP a rank
  holds whole tensors; under FSDP2 a parameter is a DTensor and its
  ``to_local()`` shard is held; under FSDP1 ``named_parameters`` already
  yields this rank's flat-parameter views. The merge is elementwise, so
  merging local shards in place is the merge of the whole model.
- **Put back** (:class:`LiveState`): every buffer object, the train/eval mode
  of every submodule, and the RNG states a search could consume (torch CPU,
  CUDA, python ``random``, numpy; the Ax import and a DataLoader iterator's
  base seed both draw from them; a loader's own generator is put back by
  :meth:`Objective.close`). The weights themselves come back from the
  newest held copy, taken from the live tensors a moment before, so training
  continues bit for bit.
- **The objective** (:class:`Objective`): ``sum(loss x count) / sum(count)``
  over the trainer's validation set, each sample once at any world size: a
  loader Lightning gave a padding ``DistributedSampler`` is rebuilt over the
  same dataset with an unrepeated, strided shard of the same index order, and
  the two sums (plus a failure flag) are reduced with ``SUM`` over ranks.

The merge itself is :func:`lightning_merge.merge.merge_into` (fp32 accumulation).
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .merge import MergeError, merge_into

__all__ = ["local_tensors", "copy_to_cpu", "merge_live", "safe_merge", "restore_live", "LiveState", "Objective",
           "val_loaders"]


def _to_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (FSDP2), else ``t`` itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return t
    return t.to_local() if isinstance(t, DTensor) else t


def local_tensors(module: torch.nn.Module) -> tuple[list[str], list[torch.Tensor], int]:
    """Names and this rank's live tensors of every parameter, then every persistent buffer (tied ones once).

    The third value is the number of parameters: the buffers follow them.
    """
    names, out, seen = [], [], set()
    for name, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            names.append(name)
            out.append(_to_local(p.detach()))
    n_params = len(out)
    for mname, mod in module.named_modules():
        for bname, b in mod._buffers.items():
            if b is None or id(b) in seen or bname in mod._non_persistent_buffers_set:
                continue
            seen.add(id(b))
            names.append(f"{mname}.{bname}" if mname else bname)
            out.append(_to_local(b.detach()))
    return names, out, n_params


def copy_to_cpu(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A CPU copy of each tensor (never a view: the live tensors keep training)."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


@torch.no_grad()
def merge_live(live: Sequence[torch.Tensor], held: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> None:
    """``live[i] <- sum_k weights[k] * held[k][i]`` in place, fp32 accumulation (``merge_into``).

    Tensor by tensor, so a GPU module needs only one tensor's K sources on the
    device at a time. Integer buffers (``num_batches_tracked``) take the newest
    copy's value. Empty local shards are skipped.
    """
    w = [float(x) for x in weights]
    for i, out in enumerate(live):
        if out.numel() == 0:
            continue
        group = [h[i] if h[i].device == out.device else h[i].to(out.device, non_blocking=True) for h in held]
        target = out if out.is_contiguous() else out.contiguous()
        merge_into([target], [[g] for g in group], w, nonfloat="newest")
        if target is not out:
            out.copy_(target)


@torch.no_grad()
def restore_live(live: Sequence[torch.Tensor], newest: Sequence[torch.Tensor]) -> None:
    """Copy the newest held copy back into the live tensors (bit for bit: a copy of a copy)."""
    for out, src in zip(live, newest):
        out.copy_(src)


def _rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "threads": torch.get_num_threads()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's wheels
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if torch.get_num_threads() != state["threads"]:
        torch.set_num_threads(state["threads"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class LiveState:
    """What a search may change besides the weights, recorded so that :meth:`restore` puts it all back.

    Buffers are kept as objects plus a clone: a forward that re-registers a
    buffer (a rotary cache, say) gets its original object back, holding its
    original values. Parameters are restored from the held copy by the caller.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.rng = _rng_states()
        self.modes = [(m, m.training) for m in module.modules()]
        self.buffers = [(m, dict(m._buffers), {n: b.clone() for n, b in m._buffers.items() if b is not None})
                        for m in module.modules()]

    @torch.no_grad()
    def restore(self) -> None:
        for mod, objects, values in self.buffers:
            for name in [n for n in mod._buffers if n not in objects]:
                del mod._buffers[name]
            mod._buffers.update(objects)
            for name, value in values.items():
                objects[name].copy_(value)
        for mod, training in self.modes:
            mod.training = training
        _set_rng_states(self.rng)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _muted_self_log(pl_module):
    """``self.log`` is turned off while the search runs ``validation_step`` from inside a checkpoint save.

    Hack, said plainly: Lightning refuses ``self.log`` inside ``on_save_checkpoint``
    (and a value logged there would land in the training loop's metrics), so
    the instance's ``log``/``log_dict`` are shadowed by no-ops and removed after.
    """
    saved = {n: pl_module.__dict__[n] for n in ("log", "log_dict") if n in pl_module.__dict__}
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = _ignore
    try:
        yield
    finally:
        for n in ("log", "log_dict"):
            pl_module.__dict__.pop(n, None)
        pl_module.__dict__.update(saved)


def _shard_loader(dl: DataLoader, rank: int, world: int) -> DataLoader | None:
    """``dl`` over an unrepeated strided shard of its index order; None when it cannot be rebuilt."""
    sampler = dl.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.num_replicas != world:
        return None
    if type(dl.batch_sampler).__name__ != "BatchSampler" or dl.batch_size is None:
        return None
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
    order = list(inner) if inner is not None and sampler.dataset is not dl.dataset else list(range(len(dl.dataset)))
    return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=order[rank::world], collate_fn=dl.collate_fn,
                      num_workers=dl.num_workers, pin_memory=dl.pin_memory, drop_last=False,
                      worker_init_fn=dl.worker_init_fn, persistent_workers=dl.num_workers > 0)


def val_loaders(trainer) -> list:
    """The trainer's validation dataloaders as a list (set up now if the loop has not run yet); [] if none."""
    dls = trainer.val_dataloaders
    if dls is None:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        dls = trainer.val_dataloaders
    if dls is None:
        return []
    if isinstance(dls, Mapping):
        return list(dls.values())
    return list(dls) if isinstance(dls, (list, tuple)) else [dls]


class Objective:
    """The exact validation loss of the live module, the same number at every world size.

    ``loss_fn(pl_module, batch) -> (loss_sum, count)`` overrides the default,
    which is the mean loss ``validation_step`` returns (a tensor, or
    ``dict['loss']``) times the batch size. Under a sharded strategy
    (``sharded``) ``validation_step`` runs through ``trainer.strategy`` (FSDP
    must see its root forward) and every rank runs the same number of batches
    (a rank with fewer repeats its first, counted 0), so the all-gathers of a
    forward match; untested on CPU, where Lightning cannot run FSDP.
    """

    def __init__(self, trainer, pl_module, loss_fn: Callable | None, sharded: bool) -> None:
        self.trainer, self.pl_module, self.loss_fn, self.sharded = trainer, pl_module, loss_fn, sharded
        loaders = val_loaders(trainer)
        if not loaders:
            raise ValueError("MergeSearch needs a validation dataloader to score merges: give Trainer.fit "
                             "val_dataloaders=..., or define val_dataloader() and validation_step() "
                             "(with limit_val_batches > 0)")
        rank, world = trainer.global_rank, trainer.world_size
        self.loaders = []
        for i, dl in enumerate(loaders):
            shard = _shard_loader(dl, rank, world) if world > 1 and isinstance(dl, DataLoader) else None
            if world > 1 and shard is None and rank == 0:
                warnings.warn(f"MergeSearch: validation dataloader {i} has no Lightning DistributedSampler to "
                              "replace; each rank evaluates what it yields, and the objective counts every "
                              "sample it yields (repeats included)", stacklevel=2)
            self.loaders.append(shard if shard is not None else dl)
        # A loader (or its sampler) with its own generator draws from it, not from the global RNG: put back too.
        gens = {id(g): g for dl in loaders if isinstance(dl, DataLoader)
                for g in (dl.generator, getattr(dl.sampler, "generator", None)) if isinstance(g, torch.Generator)}
        self._generators = [(g, g.get_state()) for g in gens.values()]
        self.steps = None
        if sharded:
            n = torch.tensor([len(dl) for dl in self.loaders], dtype=torch.float64, device=pl_module.device)
            self.steps = [int(x) for x in trainer.strategy.reduce(n, reduce_op="max").tolist()]

    def close(self) -> None:
        """Put back the state of every generator the trainer's loaders own (the iterators drew from them)."""
        for g, state in self._generators:
            g.set_state(state)

    def _batch(self, batch, i: int, dl_idx: int) -> tuple[torch.Tensor, float]:
        strategy = self.trainer.strategy
        batch = strategy.batch_to_device(batch, dataloader_idx=dl_idx)
        if self.loss_fn is not None:
            total, count = self.loss_fn(self.pl_module, batch)
            return torch.as_tensor(total, dtype=torch.float64).detach(), float(count)
        args = (batch, i) if len(self.loaders) == 1 else (batch, i, dl_idx)
        with self.trainer.precision_plugin.val_step_context():
            out = (strategy.validation_step(*args) if self.sharded else self.pl_module.validation_step(*args))
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"MergeSearch: validation_step returned {type(out).__name__}, not a scalar loss "
                             "tensor or a dict with 'loss'; return one, or pass loss_fn=(pl_module, batch) -> "
                             "(loss_sum, count)")
        from lightning.pytorch.utilities.data import extract_batch_size

        n = extract_batch_size(batch)
        return loss.detach().reshape(()).double() * n, float(n)

    @torch.no_grad()
    def __call__(self, failed: bool = False) -> tuple[float, float]:
        """Every rank: ``(loss, count)`` over the whole validation set; loss is NaN if any rank failed.

        ``failed``: this rank's merge failed; it still runs the batches and the
        reduction, so no rank waits for it, and the result is NaN everywhere.
        """
        dev = self.pl_module.device
        total = torch.zeros((), dtype=torch.float64, device=dev)
        count, bad = 0.0, float(failed)
        self.pl_module.eval()
        with _muted_self_log(self.pl_module):
            for dl_idx, dl in enumerate(self.loaders):
                first, done = None, 0
                for i, batch in enumerate(dl):
                    first = batch if first is None else first
                    s, n = self._batch(batch, i, dl_idx)
                    total += s.to(dev)
                    count += n
                    done += 1
                while self.steps is not None and done < self.steps[dl_idx] and first is not None:
                    self._batch(first, done, dl_idx)  # keeps FSDP's collectives in step; not counted
                    done += 1
        if not torch.isfinite(total):
            bad = 1.0  # a NaN on one rank, made known to all
        sums = torch.stack([total, torch.tensor(count, dtype=torch.float64, device=dev),
                            torch.tensor(bad, dtype=torch.float64, device=dev)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        s, n, b = (float(x) for x in sums.tolist())
        if b > 0 or n <= 0:
            return float("nan"), n
        return s / n, n


def safe_merge(live, held, weights) -> bool:
    """Every rank: merge, returning False instead of raising so that the collectives that follow still run."""
    try:
        merge_live(live, held, weights)
        return True
    except MergeError:
        return False
