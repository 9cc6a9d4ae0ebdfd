"""The merge math: in-place resident merges (the streaming writer is ``writer.py``).

``merged = sum_k w_k * theta_k``. With weights that sum to 1 this is a convex
(or affine, with negative weights) combination of checkpoints: the paper's
``lam*theta_t + (1-lam)*theta_{t-1}`` is ``weights=[1-lam, lam]``. Weights that
do not sum to 1 also scale the parameters (``[0.5, 0.5]`` halves nothing, but
``[1, 1]`` doubles them); pass ``normalize=True`` to divide by their sum.
:func:`weight_sum_warning` says so for weights a person typed.

Accumulation is in fp32 whatever the storage dtype, and it is done in chunks
that stay in cache, so the memory traffic is about one read of each source and
one write of the output (see ``benchmarks/``). Non-float tensors (integer
buffers) are not averaged: they must be equal in every source.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .errors import CheckpointError, SourceReadError

__all__ = ["MergeError", "check_weights", "merge_into", "read_source", "weight_sum_warning"]

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


def _merge_nonfloat(out: torch.Tensor, srcs: Sequence[torch.Tensor], name: str, policy: str) -> None:
    """Integer/bool tensors are not averaged: they must agree, or (explicitly) come from the newest."""
    if policy == "newest":
        out.copy_(srcs[-1])
        return
    ref = srcs[0]
    for k, s in enumerate(srcs[1:], 1):
        if not torch.equal(ref, s):
            raise MergeError(f"non-float tensor {name!r} differs between source 0 and source {k}; "
                             "integer buffers must be equal across checkpoints (or set "
                             "merge.nonfloat=newest to take them from the newest checkpoint)")
    out.copy_(ref)


def _merge_one(out: torch.Tensor, srcs: Sequence[torch.Tensor], w: Sequence[float], name: str,
               scratch: torch.Tensor | None) -> None:
    """out <- sum_k w_k * srcs[k] for a float tensor, accumulated in fp32 (or wider), chunk by chunk.

    The merge is memory-bound, so each chunk is finished while it is in cache:
    one read of each source and one write of ``out`` (benchmarks/resident_merge.py).
    Sources weighted 0 are skipped, so a one-hot merge reproduces its source bit
    for bit (``0 * x`` would turn -0.0 into +0.0, and ``0 * inf`` into NaN).
    Two sources whose weights sum to 1 take one fused ``torch.lerp``, equal to
    ``w0*a + w1*b`` up to fp32 rounding (a few ulps of the larger term).
    fp32/fp64 outputs accumulate in place; bf16/fp16 ones in an fp32 scratch,
    rounded once. The result is checked finite through its chunk sums (fp16:
    extremes); NaN or inf make them non-finite, and only an overflowing sum is
    re-checked element by element. One host sync per tensor; ``torch.isfinite``
    would run at ~0.5 GB/s on CPU, 40x slower than the merge itself.
    """
    flat_out = out.view(-1)
    terms = [(s.reshape(-1), float(wk)) for s, wk in zip(srcs, w) if wk != 0.0]
    if not terms:
        flat_out.zero_()
        return
    same = all(s.dtype == out.dtype for s, _ in terms)
    fused = same and (len(terms) == 1 or (len(terms) == 2 and terms[0][1] + terms[1][1] == 1.0))
    wide = out.dtype in (torch.float32, torch.float64)
    n = flat_out.numel()
    if out.device.type == "cpu":  # each thread's share of a chunk fits its L2
        step = _CHUNK * max(1, torch.get_num_threads())
    else:  # few, large kernels (32 MiB of fp32 stays in an H100's 50 MB L2)
        step = 1 << 23
    if not (fused or wide):
        if out.device.type == "cpu" and scratch is not None and scratch.dtype == torch.float32:
            step = scratch.numel()
        elif scratch is None or scratch.dtype != torch.float32 or scratch.numel() < min(step, n):
            scratch = torch.empty(min(step, n), dtype=torch.float32, device=out.device)
    (s0, w0), rest = terms[0], terms[1:]
    sums = []
    for a in range(0, n, step):
        b = min(a + step, n)
        o = flat_out[a:b]
        if fused and rest:
            torch.lerp(s0[a:b], rest[0][0][a:b], rest[0][1], out=o)
        elif fused:
            torch.mul(s0[a:b], w0, out=o)
        else:
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
        if o.dtype == torch.float16:  # an fp16 sum overflows at 65504; sum(dtype=fp32) is 30x slower
            mn, mx = torch.aminmax(o)
            sums.append(mn.float() + mx.float())
        else:
            sums.append(o.sum())
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    if not math.isfinite(total.item()) and not bool(torch.isfinite(out).all()):
        raise MergeError(f"merging tensor {name!r} with weights {list(w)} gave non-finite values")


@torch.no_grad()
def merge_into(params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
               sources: Sequence[Sequence[torch.Tensor] | Mapping[str, torch.Tensor]],
               weights: Sequence[float], *, normalize: bool | None = False, nonfloat: str = "equal") -> None:
    """Overwrite ``params`` in place with ``sum_k weights[k] * sources[k]``.

    ``params`` is a list (or name->tensor mapping) of output tensors, e.g. a
    model's parameters; ``sources[k]`` holds checkpoint ``k``'s tensors in the
    same order (or under the same names). Sources are only read. Weights are
    used as given unless ``normalize`` (None counts as False); see the module docstring for what
    un-normalised weights mean. Non-float tensors follow ``nonfloat``:
    ``"equal"`` (they must agree in every source) or ``"newest"`` (copied from
    the last source). Raises :class:`MergeError` on non-finite weights or
    results; params may then be partly written.
    """
    if nonfloat not in NONFLOAT_POLICIES:
        raise MergeError(f"nonfloat policy {nonfloat!r}: use one of {NONFLOAT_POLICIES}")
    if isinstance(params, Mapping):
        names = list(params)
        outs = [params[n] for n in names]
        srcs = [[s[n] for n in names] if isinstance(s, Mapping) else list(s) for s in sources]
    else:
        outs = list(params)
        names = [f"#{i}" for i in range(len(outs))]
        srcs = [list(s.values()) if isinstance(s, Mapping) else list(s) for s in sources]
    w = check_weights(weights, len(srcs), normalize)
    for k, s in enumerate(srcs):
        if len(s) != len(outs):
            raise MergeError(f"source {k} has {len(s)} tensors but there are {len(outs)} params")
    scratch = None
    for i, out in enumerate(outs):
        group = [s[i] for s in srcs]
        for k, t in enumerate(group):
            if t.shape != out.shape:
                raise MergeError(f"tensor {names[i]!r}: source {k} has shape {list(t.shape)}, "
                                 f"param has {list(out.shape)}")
        if out.is_floating_point() and scratch is None and not (
                out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in group)):
            scratch = torch.empty(_CHUNK, dtype=torch.float32, device=out.device)
        if out.is_floating_point():
            _merge_one(out, group, w, names[i], scratch)
        else:
            _merge_nonfloat(out, group, names[i], nonfloat)


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
