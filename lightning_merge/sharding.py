"""Where each rank's share of every parameter lives, so a rank merges only what it holds.

Under DDP a rank holds the whole model and merges whole tensors. Models that do
not fit one device are sharded, and gathering each parameter to merge it would
need the very memory sharding saves (and a collective per tensor per trial).
But ``merged = sum_k w_k * theta_k`` is elementwise, so a rank can merge its own
slice of each flattened parameter from the matching slices of the sources, and
hold only ``1/world`` of every source. This module finds those slices:

``whole``  every parameter (and persistent buffer), all of it (DDP, one device).
``zero3``  DeepSpeed ZeRO-3: ``param.ds_tensor``, a 1-D partition of the
           flattened parameter. DeepSpeed 0.19 (``partition_parameters.py``:
           ``_partition_param``) pads ``ds_numel`` up to a multiple of the
           partition group's size ``W``; every rank holds
           ``P = ceil(ds_numel / W)`` elements, rank ``r`` the elements
           ``[r*P, (r+1)*P)``. Past ``ds_numel`` is padding, allocated with
           ``torch.empty`` and never read (gathers keep the first ``ds_numel``).
``fsdp``   FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``):
           DTensor parameters sharded on dim 0, the local shard being a
           contiguous run of the flattened tensor; or FSDP1 (Lightning's
           ``FSDPStrategy``, ``use_orig_params=True``): each ``FlatParameter``'s
           local shard holds a contiguous run of each original parameter
           (``_shard_param_infos``).

A :class:`LocalShard`'s ``target`` covers only real elements, never padding, so
merging cannot write garbage into the padding and the sources hold no padding.

Sharded strategies may keep a gathered full copy between forwards (ZeRO-3
persistent parameters, ``param_persistence_threshold``; the FSDP root, which
is not resharded after forward). A merge into the shards would leave that copy
stale, so :meth:`ShardMerger.apply` first drops every gathered copy
(:func:`release_gathered`): the next forward gathers the merged shards.
:meth:`ShardMerger.release` does only that, for an evaluation that follows
another without a merge between them, once the framework may have moved
those copies (Lightning's teardown moves the module to CPU).

Knows ranks and strategies, but not Lightning or Hydra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .checkpoints import CheckpointError
from .series import CheckpointSeries
from .merge import MergePlan, read_source

__all__ = ["KINDS", "ShardingError", "LocalShard", "zero3_partition", "local_shards", "load_local_sources",
           "release_gathered", "ShardMerger"]

KINDS = ("whole", "zero3", "fsdp")
# Path segments that wrappers insert between a model's own parameter names.
_WRAPPER_SEGMENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


class ShardingError(ValueError):
    """A model's sharding is not what the chosen kind expects; the message names the tensor."""


@dataclass
class LocalShard:
    """Elements ``[start, end)`` of the flattened full tensor ``name``, held here in ``target``.

    ``target`` is a 1-D view of the rank-local storage with ``end - start``
    elements (padding excluded); ``shape`` is the full tensor's shape.
    """

    name: str
    target: torch.Tensor
    start: int
    end: int
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.target.dim() != 1 or self.target.numel() != self.end - self.start:
            raise ShardingError(f"{self.name!r}: target has shape {list(self.target.shape)} "
                                f"for elements [{self.start}, {self.end})")


def zero3_partition(numel: int, world: int, rank: int) -> tuple[int, int, int]:
    """DeepSpeed ZeRO-3's layout: ``(start, end, partition_numel)`` of ``rank``'s real elements.

    ``partition_numel`` is ``ceil(numel / world)`` (the padded size every rank
    stores); ``end - start`` is smaller on the last rank(s), and 0 on a rank
    whose partition lies wholly in the padding (``numel < world``).
    """
    if world < 1 or not 0 <= rank < world:
        raise ShardingError(f"rank {rank} is not in a partition group of {world}")
    part = -(-numel // world)
    start = min(rank * part, numel)
    return start, min(start + part, numel), part


def _clean(name: str, prefix: str) -> str:
    """Drop wrapper segments, then ``prefix`` (which every name must carry)."""
    name = ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)
    if prefix:
        if not name.startswith(prefix):
            raise ShardingError(f"parameter {name!r} does not start with prefix {prefix!r}")
        name = name[len(prefix):]
    return name


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers that go into a state dict; no strategy here shards buffers, so each rank holds them whole."""
    out = []
    for mod_name, mod in model.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def _whole(name: str, t: torch.Tensor, prefix: str) -> LocalShard:
    if not t.is_contiguous():
        raise ShardingError(f"{name!r} is not contiguous, so it cannot be merged in place as a flat view")
    return LocalShard(_clean(name, prefix), t.detach().view(-1), 0, t.numel(), tuple(t.shape))


def _zero3_shards(model: torch.nn.Module, prefix: str) -> list[LocalShard]:
    from deepspeed import comm as ds_dist

    out = []
    for name, p in model.named_parameters():  # named_parameters() reads _parameters without gathering
        if getattr(p, "ds_tensor", None) is None:
            raise ShardingError(f"parameter {name!r} has no ds_tensor: the model is not partitioned by "
                                "DeepSpeed ZeRO-3 (use kind='whole' for DDP, or build it under zero.Init / "
                                "deepspeed.initialize with zero_optimization.stage=3)")
        ds = p.ds_tensor
        if hasattr(ds, "ds_quant_scale"):
            raise ShardingError(f"parameter {name!r}: quantized ZeRO-3 weights cannot be merged in place; "
                                "turn off zero_quantized_weights / zero_quantized_nontrainable_weights")
        if getattr(getattr(ds, "final_location", None), "value", None) == "nvme":
            raise ShardingError(f"parameter {name!r} is offloaded to NVMe; use offload_param.device=cpu or none")
        if getattr(p, "ds_secondary_tensor", None) is not None:
            raise ShardingError(f"parameter {name!r} has a secondary (hpZ) partition that a merge would leave "
                                "stale; set zero_hpz_partition_size=1")
        group = p.ds_process_group
        world, rank = ds_dist.get_world_size(group=group), ds_dist.get_rank(group=group)
        start, end, part = zero3_partition(p.ds_numel, world, rank)
        if ds.numel() != part or p.partition_numel() != part:
            raise ShardingError(f"parameter {name!r}: ds_tensor has {ds.numel()} elements, but ZeRO-3 with "
                                f"{world} ranks should give ceil({p.ds_numel}/{world}) = {part}")
        out.append(LocalShard(_clean(name, prefix), ds.data.view(-1).narrow(0, 0, end - start), start, end,
                              tuple(p.ds_shape)))
    return out


def _fsdp1_shards(model: torch.nn.Module, prefix: str) -> list[LocalShard]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, FSDP) or mod._handle is None:
            continue
        fp = mod._handle.flat_param
        # The sharded storage (fp.data points at it only while resharded); before FSDP's lazy init,
        # fp.data is that storage and becomes _local_shard.
        local = getattr(fp, "_local_shard", None)
        local = fp.data if local is None else local
        for fqn, info, numel, shape in zip(fp._fqns, fp._shard_param_infos, fp._numels, fp._shapes):
            full = f"{mod_name}.{fqn}" if mod_name else fqn
            if info.in_shard:
                target = local.narrow(0, info.offset_in_shard, info.numel_in_shard)
                start, end = info.intra_param_start_idx, info.intra_param_end_idx + 1
            else:
                target, start, end = local.narrow(0, 0, 0), 0, 0
            if end - start != target.numel() or end > numel:
                raise ShardingError(f"FSDP flat parameter of {mod_name or 'the root'}: {fqn!r} maps "
                                    f"[{start}, {end}) onto {target.numel()} local elements of {numel}")
            out.append(LocalShard(_clean(full, prefix), target, start, end, tuple(shape)))
    return out


def _fsdp2_shard(name: str, p: torch.Tensor, prefix: str) -> LocalShard:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(p.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    with torch.no_grad():
        local = p.to_local()
    # A shard is a contiguous run of the flattened tensor only if it is cut on dim 0 alone.
    if tuple(local.shape) != tuple(local_shape) or any(offset[1:]) or tuple(local_shape[1:]) != shape[1:]:
        raise ShardingError(f"parameter {name!r}: local shard {list(local.shape)} at offset {list(offset)} "
                            f"of {list(shape)} is not a run of whole rows; only dim-0 (FSDP) sharding is "
                            "supported, not tensor parallelism")
    if not local.is_contiguous():
        raise ShardingError(f"parameter {name!r}: the local shard is not contiguous")
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    start = offset[0] * row if shape else 0
    return LocalShard(_clean(name, prefix), local.view(-1), start, start + local.numel(), shape)


def _fsdp_shards(model: torch.nn.Module, prefix: str) -> list[LocalShard]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return _fsdp1_shards(model, prefix)
    for m in model.modules():  # FSDP2 registers unsharded params between forward and reshard
        if isinstance(m, FSDPModule):
            m.reshard()
    out = []
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out.append(_fsdp2_shard(name, p, prefix))
        elif getattr(p, "_fsdp_flattened", False):
            raise ShardingError(f"parameter {name!r} belongs to an FSDP1 FlatParameter held by an enclosing "
                                "FullyShardedDataParallel: pass the module that contains the FSDP root (for "
                                "Lightning's FSDPStrategy, trainer.strategy.model, with prefix='model.')")
        else:
            raise ShardingError(f"parameter {name!r} is not sharded: pass the FSDP-wrapped model (FSDP1 "
                                "FullyShardedDataParallel, or FSDP2 fully_shard on the modules holding it)")
    return out


def local_shards(model: torch.nn.Module, kind: str, *, prefix: str = "") -> list[LocalShard]:
    """This rank's share of every parameter and persistent buffer of ``model``, per ``kind``.

    Names are ``model``'s own, with wrapper segments (``_fsdp_wrapped_module``,
    ``_orig_mod``, ...) and then ``prefix`` removed, so that they match the
    checkpoint names (e.g. ``prefix="model."`` for a LightningModule holding
    the HF model as ``self.model``). For FSDP1, pass the module that contains
    the FSDP root (for Lightning's FSDPStrategy: ``trainer.strategy.model``).
    Tied parameters appear once. Every parameter gets a shard, perhaps empty.
    """
    if kind not in KINDS:
        raise ShardingError(f"sharding kind {kind!r}: use one of {KINDS}")
    if kind == "whole":
        shards = [_whole(n, p, prefix) for n, p in model.named_parameters()]
    elif kind == "zero3":
        shards = _zero3_shards(model, prefix)
    else:
        shards = _fsdp_shards(model, prefix)
    shards += [_whole(n, b, prefix) for n, b in _persistent_buffers(model)]
    seen: set[str] = set()
    for s in shards:
        if s.name in seen:
            raise ShardingError(f"two local shards are both named {s.name!r}; is the prefix {prefix!r} right?")
        seen.add(s.name)
    return shards


def _check_coverage(series: CheckpointSeries, shards: Sequence[LocalShard]) -> None:
    """Same names and shapes on both sides, from the manifests, before any data is read."""
    names = series.names
    have = {s.name for s in shards}
    missing = [n for n in names if n not in have]
    if missing:
        raise CheckpointError(f"{series.newest.path}: tensors {missing[:5]} are not in the model's local shards "
                              "(wrong model, or wrong prefix)")
    extra = [s.name for s in shards if s.name not in set(names)]
    if extra:
        raise CheckpointError(f"{series.newest.path}: the model expects tensors {extra[:5]} "
                              "that the checkpoints do not hold")
    for s in shards:
        info = series.newest.tensors[s.name]
        if s.shape is not None and tuple(info.shape) != tuple(s.shape):
            raise CheckpointError(f"{info.file}: tensor {s.name!r} has shape {list(info.shape)} "
                                  f"but the model's has {list(s.shape)}")


def load_local_sources(series: CheckpointSeries, shards: Sequence[LocalShard],
                       device: torch.device | str | None = None) -> list[list[torch.Tensor]]:
    """Each source's slices ``[start:end]`` matching ``shards``: ``sources[k][i]`` for shard ``i``.

    Only the slice is read (``Checkpoint.read_slice``: by byte range from
    safetensors, by the overlapping chunks from DCP, through mmap from torch
    files), so the bytes a rank reads fall as ``1/world``; formats that cannot
    seek read the whole tensor once and keep the slice. Slices
    keep the checkpoint's dtype (as whole-tensor merges do), so the fp32
    accumulation and the one rounding to the model's dtype are the same as in
    an unsharded merge: the merged values are bitwise equal. They are placed
    on ``device`` (default: each target's device). ``shards`` must match
    ``series.names`` one to one (leave out a tied ``lm_head`` alias, as
    :class:`ShardMerger` does).
    """
    _check_coverage(series, shards)
    out: list[list[torch.Tensor]] = []
    for ck in series.checkpoints:
        row = []
        for s in shards:
            dev = device if device is not None else s.target.device
            if s.end == s.start:
                row.append(torch.empty(0, dtype=ck.tensors[s.name].dtype, device=dev))
                continue
            numel = math.prod(ck.tensors[s.name].shape)
            if s.end > numel:
                raise CheckpointError(f"{ck.path}: tensor {s.name!r} has {numel} elements, "
                                      f"the model's shard needs [{s.start}, {s.end})")
            row.append(read_source(ck, s.name, s.start, s.end).to(dev))
        out.append(row)
    return out


def release_gathered(model: torch.nn.Module, kind: str) -> int:
    """Drop every gathered full copy of a sharded parameter; return how many were dropped.

    Called before merging into shards: otherwise a copy gathered by an earlier
    forward (ZeRO-3 persistent parameters, the FSDP root) would be used again
    as it is, and the merge would not be seen. Outside a forward only.
    """
    dropped = 0
    if kind == "zero3":
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = []
        for name, p in model.named_parameters():
            status = getattr(p, "ds_status", None)
            if status == ZeroParamStatus.INFLIGHT:
                raise ShardingError(f"parameter {name!r} is being gathered; merge between forwards only")
            if status == ZeroParamStatus.AVAILABLE:
                # As DeepSpeed's own release_and_reset_all does: a module whose post-forward hook did not
                # fire can leave itself listed as a user of the parameter; between forwards, none is.
                p.ds_active_sub_modules.clear()
                gathered.append(p)
        if gathered:  # the partition is current, so this only frees the gathered copy (no copy back)
            gathered[0].partition(param_list=gathered)
        dropped = len(gathered)
    elif kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.fsdp._runtime_utils import _reshard

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
                dropped += 1
            elif isinstance(m, FullyShardedDataParallel) and m._handle is not None:
                h = m._handle
                lazy_init_done = hasattr(h.flat_param, "_full_param_padded")
                if h.uses_sharded_strategy and lazy_init_done and not h.needs_unshard():  # full copy allocated
                    _reshard(m, h, True)
                    dropped += 1
    return dropped


class ShardMerger:
    """This rank's share of every source, bound to its shards: ``apply(weights)`` re-merges in place.

    Memory per rank is ``K / world`` of one model's sources plus its own
    shards; nothing is gathered to merge. Padding in ZeRO-3 partitions is not
    part of any target, so it is never written (DeepSpeed never reads it).
    The targets are looked up again at every :meth:`apply` and not kept, since
    a framework may re-point a parameter's storage between merges (Lightning's
    ``module.to(dtype / device)`` under DDP or one device), and a kept view
    would keep the old storage alive; the ranges must not change, and the
    sources must sit on the targets' device.
    """

    def __init__(self, model: torch.nn.Module, kind: str, series: CheckpointSeries, *, prefix: str = "",
                 nonfloat: str = "equal", normalize: bool | None = False,
                 device: torch.device | str | None = None) -> None:
        self.model, self.kind, self.prefix = model, kind, prefix
        self.nonfloat, self.normalize = nonfloat, bool(normalize)  # None (merge.normalize unset) is False
        self._tied = {"lm_head.weight"} if series.tied else set()  # re-tied by the model, not merged (as in DDP)
        release_gathered(model, kind)  # FSDP2 swaps in its sharded params only when resharded
        shards = self.shards
        self._layout = [(s.name, s.start, s.end) for s in shards]
        self._full_numel = sum(math.prod(s.shape) for s in shards if s.shape is not None)
        self.sources = load_local_sources(series, shards, device=device)
        self._live = [i for i, s in enumerate(shards) if s.end > s.start]  # a rank may hold none of a small tensor
        self._plan: MergePlan | None = None  # built at the first apply, where the sources sit on the targets' device
        self._plan_kinds: list = []

    @property
    def shards(self) -> list[LocalShard]:
        """This rank's shards as the model holds them now (fresh views; cheap)."""
        return [s for s in local_shards(self.model, self.kind, prefix=self.prefix) if s.name not in self._tied]

    @property
    def local_numel(self) -> int:
        """Elements this rank merges (its shards), next to :attr:`full_numel`."""
        return sum(end - start for _, start, end in self._layout)

    @property
    def full_numel(self) -> int:
        """Elements of the whole (unsharded) model's merged tensors."""
        return self._full_numel

    def release(self) -> int:
        """Drop the full copies a forward left gathered (see :func:`release_gathered`).

        :meth:`apply` does this itself. Call it after an evaluation that is not
        followed by a merge: a framework may move those copies meanwhile (Lightning's
        teardown after ``validate`` moves the module to CPU, gathered ZeRO-3 copies
        included, and the next forward would use them there, as they are).
        """
        return release_gathered(self.model, self.kind)

    def apply(self, weights: Sequence[float]) -> None:
        """Merge ``weights`` into this rank's shards; the next forward sees the merged model."""
        self.release()
        shards = self.shards
        if [(s.name, s.start, s.end) for s in shards] != self._layout:
            raise ShardingError("the model's local shards changed since the sources were loaded "
                                "(re-sharded or re-wrapped?); build a new ShardMerger")
        for s, src in zip(shards, self.sources[0]):
            if s.target.device != src.device:
                raise ShardingError(f"{s.name!r} is on {s.target.device} but its sources were loaded on "
                                    f"{src.device}: the model moved after the ShardMerger was built; build it "
                                    "(or pass device=) where the model is merged")
        targets = [shards[i].target for i in self._live]
        kinds = [(t.dtype, t.device) for t in targets]
        if self._plan is None or kinds != self._plan_kinds:  # checks, buffers, packing: once (per dtype/device)
            self._plan = MergePlan(targets, [[src[i] for i in self._live] for src in self.sources],
                                   nonfloat=self.nonfloat, pack_small=True, bound=True)
            self._plan_kinds = kinds
        else:
            self._plan.rebind(targets)
        self._plan.run(list(weights), normalize=self.normalize)
