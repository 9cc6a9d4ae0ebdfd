"""The merge math: in-place resident merges (the streaming writer is ``writer.py``).

``merged = sum_k w_k * theta_k``. With weights that sum to 1 this is a convex
(or affine, with negative weights) combination of checkpoints: the paper's
``lam*theta_t + (1-lam)*theta_{t-1}`` is ``weights=[1-lam, lam]``. Weights that
do not sum to 1 also scale the parameters (``[0.5, 0.5]`` halves nothing, but
``[1, 1]`` doubles them); pass ``normalize=True`` to divide by their sum.
:func:`weight_sum_warning` says so for weights a person typed.

Accumulation is in fp32 whatever the storage dtype. The memory traffic is about
one read of each source and one write of the output: a compiled fused kernel
(``kernels.py``) for large merges, else PyTorch ops on chunks that stay in
cache, bitwise the same (see ``benchmarks/resident_merge.py``). Non-float
tensors (integer buffers) are not averaged: they must be equal in every source.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from . import kernels
from .errors import CheckpointError, SourceReadError

__all__ = ["MergeError", "MergePlan", "check_weights", "merge_into", "read_source", "weight_sum_warning"]

_CHUNK = 1 << 19  # elements per accumulation chunk and thread: 2 MiB of fp32, one L2 (benchmarks/)



class MergeError(ValueError):
    """Bad weights, or a merge that produced non-finite values."""


def check_weights(weights: Sequence[float], k: int, normalize: bool | None = False) -> list[float]:
    """Validate K finite weights (and normalise them if asked; None is False); return them as floats."""
    w = [float(x) for x in weights]
    if len(w) != k:
        raise MergeError(f"got {len(w)} weights for {k} checkpoints; give one weight per checkpoint")
    if not all(math.isfinite(x) for x in w):
        raise MergeError(f"weights must be finite, got {w}")
    if normalize:
        s = sum(w)
        if s == 0.0:
            raise MergeError(f"cannot normalise weights {w}: they sum to 0")
        w = [x / s for x in w]
    return w


def weight_sum_warning(weights: Sequence[float] | None, normalize: bool | None) -> str | None:
    """The warning for given weights that scale the model, or None when there is nothing to say.

    Weights that sum to ``s`` merge to ``s`` times the normalised merge, so
    ``[0.7, 0.7]`` scales every parameter by 1.4, which is rarely what was
    meant and gives a plausible-looking, wrong model. Nothing is said when
    ``normalize`` was set either way (the choice is made) or the weights sum to
    1 within 1e-6 (decimal rounding, far below a bf16 parameter's precision).
    The message names the CLI options (``merge.weights``, ``merge.normalize``).
    """
    if normalize is not None or not weights:
        return None
    w = [float(x) for x in weights]
    s = sum(w)
    if not math.isfinite(s) or abs(s - 1.0) <= 1e-6:
        return None  # non-finite weights are refused by check_weights
    if abs(s) <= 1e-6:
        return (f"merge.weights {w} sum to 0: the merge is a difference of checkpoints, not a model "
                "(merge.normalize=true cannot divide by 0); set merge.normalize=false to keep them as "
                "given and silence this warning")
    return (f"merge.weights {w} sum to {s:.6g}: every merged parameter is scaled by {s:.6g}; set "
            "merge.normalize=true to divide them by their sum, or merge.normalize=false to keep them as "
            "given and silence this warning")


NONFLOAT_POLICIES = ("equal", "newest")


def _check_nonfloat(srcs: Sequence[torch.Tensor], name: str) -> None:
    """Integer/bool tensors are not averaged: under ``equal`` they must agree in every source."""
    ref = srcs[0]
    for k, s in enumerate(srcs[1:], 1):
        if not torch.equal(ref, s):
            raise MergeError(f"non-float tensor {name!r} differs between source 0 and source {k}; "
                             "integer buffers must be equal across checkpoints (or set "
                             "merge.nonfloat=newest to take them from the newest checkpoint)")


def _merge_eager(flat_out: torch.Tensor, terms: list[tuple[torch.Tensor, float]],
                 scratch: torch.Tensor | None, check: bool = True) -> torch.Tensor | None:
    """``flat_out <- sum_k w_k * s_k`` with PyTorch ops, chunk by chunk; with ``check``, the chunk sums' total.

    The merge is memory-bound, so each chunk is finished while it is in cache:
    one read of each source and one write of the output. The arithmetic is
    ``acc = s_0 * w_0`` then ``acc += w_k * s_k`` (a fused multiply-add) in fp32
    (fp64 for fp64 outputs), rounded once to the output dtype; the compiled kernel
    (``kernels.py``) does exactly this in one pass. The sum feeds the finiteness
    check (fp16: min + max, as an fp16 sum overflows at 65504).
    """
    (s0, w0), rest = terms[0], terms[1:]
    wide = flat_out.dtype in (torch.float32, torch.float64)
    n = flat_out.numel()
    if flat_out.device.type == "cpu":  # each thread's share of a chunk fits its L2
        step = _CHUNK * max(1, torch.get_num_threads())
        if not wide and scratch is not None and scratch.numel() >= _CHUNK:
            step = min(step, scratch.numel())
    else:  # few, large kernels (32 MiB of fp32 stays in an H100's 50 MB L2)
        step = 1 << 23
    if not wide and (scratch is None or scratch.dtype != torch.float32 or scratch.numel() < min(step, n)):
        scratch = torch.empty(min(step, n), dtype=torch.float32, device=flat_out.device)
    sums = []
    for a in range(0, n, step):
        b = min(a + step, n)
        o = flat_out[a:b]
        acc = o if wide else scratch[: b - a]
        if s0.dtype == acc.dtype:
            torch.mul(s0[a:b], w0, out=acc)
        else:  # mul with a bf16 input would round w0 * s0 to bf16 before accumulating
            acc.copy_(s0[a:b])
            if w0 != 1.0:
                acc.mul_(w0)
        for s, wk in rest:
            acc.add_(s[a:b], alpha=wk)
        if not wide:
            o.copy_(acc)
        if not check:
            continue
        if o.dtype == torch.float16:
            mn, mx = torch.aminmax(o)
            sums.append(mn.float() + mx.float())
        else:
            sums.append(o.sum())
    if not sums:
        return None
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


class _Pack:
    """Small float tensors of one (output dtype, source dtypes, device) merged as one flat tensor.

    The sources' small tensors are concatenated once, when the plan is built
    (resident checkpoints do not change), so a trial runs one merge and one
    ``torch._foreach_copy_`` for all of them instead of a few ops per tensor.
    """

    def __init__(self, idx: list[int], outs: list[torch.Tensor], srcs: list[list[torch.Tensor]]) -> None:
        self.idx = idx
        self.sizes = [outs[i].numel() for i in idx]
        self.sources = [torch.cat([src[i].reshape(-1) for i in idx]) for src in srcs]
        self.out = torch.empty(sum(self.sizes), dtype=outs[idx[0]].dtype, device=outs[idx[0]].device)


class MergePlan:
    """A merge set up once and run per trial: ``params[i] <- sum_k w_k * sources[k][i]`` in place.

    The checks (counts, shapes, integer buffers equal under ``nonfloat="equal"``)
    run once, here. :meth:`run` then merges with the given weights, with no
    host synchronisation per tensor. Finiteness: with ``bound`` (a plan that is
    run many times), the largest ``|value|`` of each source is read once, at the
    first run; then ``sum_k |w_k| * max|source k|`` bounds every merged value, and
    while it is below the output dtypes' largest finite value (with a margin for
    fp32 rounding) no merged value can be inf or NaN, so nothing is checked at all.
    Otherwise (or for a one-off merge) each tensor's sum stays on its device and
    all of them are read back once, at the end. Tensors of at least
    ``kernels.MIN_NUMEL`` elements go through the fused compiled kernel when
    ``kernels.wanted`` says so (``kernel`` overrides the process's mode for this
    plan); the rest, and every tensor when it is not wanted, through the eager
    chunked merge. Both give bitwise the same result. With ``pack_small``, the
    small float tensors are packed into one flat tensor per dtype group (a copy
    of their sources: resident sources must not change after the plan is built).
    """

    @torch.no_grad()
    @torch.inference_mode(False)  # its buffers are written in place later, inside inference mode or not
    def __init__(self, params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                 sources: Sequence[Sequence[torch.Tensor] | Mapping[str, torch.Tensor]], *,
                 nonfloat: str = "equal", kernel: str | None = None, pack_small: bool = False,
                 bound: bool = False) -> None:
        if nonfloat not in NONFLOAT_POLICIES:
            raise MergeError(f"nonfloat policy {nonfloat!r}: use one of {NONFLOAT_POLICIES}")
        if kernel is not None and kernel not in kernels.MODES:
            raise MergeError(f"merge kernel {kernel!r}: use one of {kernels.MODES}")
        if isinstance(params, Mapping):
            names = list(params)
            outs = [params[n] for n in names]
            srcs = [[s[n] for n in names] if isinstance(s, Mapping) else list(s) for s in sources]
        else:
            outs = list(params)
            names = [f"#{i}" for i in range(len(outs))]
            srcs = [list(s.values()) if isinstance(s, Mapping) else list(s) for s in sources]
        self.names, self.outs, self.srcs, self.nonfloat, self.k = names, outs, srcs, nonfloat, len(srcs)
        for k, s in enumerate(srcs):
            if len(s) != len(outs):
                raise MergeError(f"source {k} has {len(s)} tensors but there are {len(outs)} params")
        floats, self.nonfloats = [], []
        for i, out in enumerate(outs):
            for k, src in enumerate(srcs):
                if src[i].shape != out.shape:
                    raise MergeError(f"tensor {names[i]!r}: source {k} has shape {list(src[i].shape)}, "
                                     f"param has {list(out.shape)}")
            if out.is_floating_point():
                floats.append(i)
            else:
                if nonfloat == "equal":
                    _check_nonfloat([s[i] for s in srcs], names[i])
                self.nonfloats.append(i)
        total = sum(outs[i].numel() for i in floats)
        self.compiled = {dev: kernels.wanted(total, dev, kernel) for dev in {outs[i].device.type for i in floats}}
        self.packs: list[_Pack] = []
        if pack_small:
            groups: dict[tuple, list[int]] = {}
            for i in floats:
                if outs[i].numel() < kernels.MIN_NUMEL:
                    key = (outs[i].dtype, outs[i].device, tuple(s[i].dtype for s in srcs))
                    groups.setdefault(key, []).append(i)
            self.packs = [_Pack(idx, outs, srcs) for idx in groups.values() if len(idx) > 1]
        packed = {i for p in self.packs for i in p.idx}
        self.floats = [i for i in floats if i not in packed]
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self.bound = bound
        self._amax: list[float] | None = None  # max |value| of each source's float tensors (bound)
        self._limit = min((torch.finfo(outs[i].dtype).max for i in floats), default=math.inf)

    def _source_amax(self) -> list[float]:
        """Max |value| over each source's float tensors (nan/inf if one holds nan/inf), read back once."""
        idx = self.floats + [i for p in self.packs for i in p.idx]
        per = []
        for src in self.srcs:
            m = [src[i].abs().amax().float() for i in idx if src[i].numel()]
            per.append(torch.stack([x.cpu() for x in m]).amax() if m else torch.zeros(()))
        return [float(x) for x in torch.stack(per).tolist()] if per else []

    def rebind(self, params: Sequence[torch.Tensor]) -> None:
        """Point the plan at new output tensors of the same shapes and dtypes, in the same order.

        For frameworks that re-point a parameter's storage between merges (see
        ``sharding.ShardMerger``); the sources and packs are kept.
        """
        params = list(params.values()) if isinstance(params, Mapping) else list(params)
        if len(params) != len(self.outs):
            raise MergeError(f"rebind: {len(params)} tensors for a plan of {len(self.outs)}")
        for name, old, new in zip(self.names, self.outs, params):
            if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                raise MergeError(f"rebind: tensor {name!r} is now {list(new.shape)} {new.dtype} on {new.device}, "
                                 f"the plan was built for {list(old.shape)} {old.dtype} on {old.device}")
        self.outs = params

    @torch.no_grad()
    def run(self, weights: Sequence[float], *, normalize: bool | None = False) -> None:
        """Merge with ``weights`` (one per source; normalised if asked); :class:`MergeError` on non-finite results.

        Sources weighted 0 are skipped, so a one-hot merge reproduces its source
        bit for bit (``0 * x`` would turn -0.0 into +0.0, and ``0 * inf`` into NaN).
        On an error the params may be partly written.
        """
        w = check_weights(weights, self.k, normalize)
        live = [k for k, wk in enumerate(w) if wk != 0.0]
        check = True
        if self.bound:
            if self._amax is None:
                self._amax = self._source_amax()
            bound = sum(abs(w[k]) * self._amax[k] for k in live) * (1 + 1e-5 * max(len(live), 1))
            check = not bound < self._limit  # nan (a source holds nan/inf) checks too
        wt: dict[torch.device, torch.Tensor] = {}
        checks: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (sum, tensor, name)
        for i in self.floats:
            out = self.outs[i]
            total = self._merge(out.view(-1), [self.srcs[k][i].reshape(-1) for k in live], w, live, wt, check)
            if total is not None:  # None: unchecked, or an empty tensor
                checks.append((total, out, self.names[i]))
        for p in self.packs:
            total = self._merge(p.out, [p.sources[k] for k in live], w, live, wt, check)
            torch._foreach_copy_([self.outs[i].view(-1) for i in p.idx], list(torch.split(p.out, p.sizes)))
            if total is not None:
                checks.append((total, p.out, "small tensors " + ", ".join(self.names[i] for i in p.idx[:3]) +
                               (", ..." if len(p.idx) > 3 else "")))
        for i in self.nonfloats:
            self.outs[i].copy_(self.srcs[-1 if self.nonfloat == "newest" else 0][i])
        self._check(checks, w)

    def _merge(self, flat_out: torch.Tensor, srcs: list[torch.Tensor], w: list[float], live: list[int],
               wt: dict, check: bool) -> torch.Tensor | None:
        dev = flat_out.device
        if not live:
            flat_out.zero_()
            return torch.zeros((), device=dev)
        if self.compiled.get(dev.type) and kernels.eligible(flat_out, srcs):
            if dev not in wt:
                wt[dev] = torch.tensor([w[k] for k in live], dtype=torch.float32).to(dev, non_blocking=True)
            if kernels.fused_merge(flat_out, srcs, wt[dev]):
                if not check:
                    return None
                if flat_out.dtype == torch.float16:  # an fp16 sum overflows at 65504
                    mn, mx = torch.aminmax(flat_out)
                    return mn.float() + mx.float()
                return flat_out.sum()
            self.compiled[dev.type] = False
        scratch = self._scratch.get(dev)
        if scratch is None and flat_out.dtype not in (torch.float32, torch.float64):
            with torch.inference_mode(False):  # reused by later runs, in inference mode or not
                scratch = self._scratch[dev] = torch.empty(_CHUNK, dtype=torch.float32, device=dev)
        return _merge_eager(flat_out, [(s, w[k]) for s, k in zip(srcs, live)], scratch, check)

    @staticmethod
    def _check(checks: list, w: list[float]) -> None:
        """One host read for all the sums (per device); only a non-finite total looks at each tensor."""
        by_dev: dict[torch.device, list] = {}
        for c in checks:
            by_dev.setdefault(c[0].device, []).append(c)
        for group in by_dev.values():
            total = group[0][0] if len(group) == 1 else torch.stack([c[0].float() for c in group]).sum()
            if math.isfinite(total.item()):
                continue
            for s, t, name in group:  # an overflowing sum of finite values is re-checked element by element
                if not math.isfinite(s.item()) and not bool(torch.isfinite(t).all()):
                    raise MergeError(f"merging tensor {name!r} with weights {w} gave non-finite values")


@torch.no_grad()
def merge_into(params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
               sources: Sequence[Sequence[torch.Tensor] | Mapping[str, torch.Tensor]],
               weights: Sequence[float], *, normalize: bool | None = False, nonfloat: str = "equal",
               kernel: str | None = None) -> None:
    """Overwrite ``params`` in place with ``sum_k weights[k] * sources[k]``.

    ``params`` is a list (or name->tensor mapping) of output tensors, e.g. a
    model's parameters; ``sources[k]`` holds checkpoint ``k``'s tensors in the
    same order (or under the same names). Sources are only read. Weights are
    used as given unless ``normalize`` (None counts as False); see the module docstring for what
    un-normalised weights mean. Non-float tensors follow ``nonfloat``:
    ``"equal"`` (they must agree in every source) or ``"newest"`` (copied from
    the last source). ``kernel``: see :class:`MergePlan`. Raises
    :class:`MergeError` on non-finite weights or results; params may then be
    partly written. A merge repeated with new weights should build a
    :class:`MergePlan` once and call its ``run``.
    """
    if nonfloat not in NONFLOAT_POLICIES:
        raise MergeError(f"nonfloat policy {nonfloat!r}: use one of {NONFLOAT_POLICIES}")
    n_src = len(sources)
    check_weights(weights, n_src, normalize)  # the weights' errors come first, as they always have
    MergePlan(params, sources, nonfloat=nonfloat, kernel=kernel).run(weights, normalize=normalize)


def read_source(ck, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """``ck.read(name)``, or ``ck.read_slice(name, start, end)``; a failure is a :class:`SourceReadError`.

    Reads after the run started (a rank's resident slices, the merged model's write) come after the
    checkpoint's metadata was accepted, so a failure means the file was damaged, truncated or replaced
    since: the error names the file and tensor, and the search stops rather than score garbage.
    """
    try:
        return ck.read(name) if start is None else ck.read_slice(name, start, end)
    except SourceReadError:
        raise
    except CheckpointError as e:  # the reader's own words already name the file
        raise SourceReadError(f"{e}. Restore the checkpoint (or drop it from checkpoints.sources) and run the "
                              f"same command again") from e
    except Exception as e:  # noqa: BLE001 - any reader's error: the bytes are not what the header said
        span = "" if start is None else f" [{start}, {end})"
        raise SourceReadError(
            f"{ck.path}: reading tensor {name!r}{span} failed ({type(e).__name__}: {e}). Its metadata was read "
            f"when the run started, so the file was damaged, truncated or replaced since. Restore the checkpoint "
            f"(or drop it from checkpoints.sources) and run the same command again") from e
