"""The fused merge kernel: one pass over memory per tensor, bitwise equal to the eager merge.

The eager merge (``merge._merge_eager``) runs one PyTorch op per source and
chunk: upcast, fused multiply-add into an fp32 accumulator, round. On CPU
each op is a separate pass, and PyTorch's mixed bf16/fp32 kernels are slow, so
a bf16 merge of 4 sources moved bytes at 0.26-0.54 of a plain copy
(``benchmarks/resident_merge.py``). Here the same arithmetic is one
``torch.compile``d loop: every element of every source is read once and the
output is written once. (No reduction rides along: Inductor would schedule a
sum of the output as a second loop that reads every source again; the
finiteness check is :class:`merge.MergePlan`'s bound instead.) The arithmetic
is the eager merge's, op for op:

    acc = float32(s_0) * w_0;  acc = fma(float32(s_k), w_k, acc) for k >= 1;  out = round(acc)

(the eager ``add_(s, alpha=w)`` is a fused multiply-add on CPU; ``tests/test_kernels.py``
checks the two bitwise, for fp32, bf16 and fp16 sources and outputs). Weights are
a tensor input, so a new trial's weights never recompile; the length is
dynamic, so one compilation serves every tensor of a model (Inductor keeps a
second variant for tensors of <= 4096 elements, which we leave to eager).

A compiler is needed at run time (a C++ compiler on CPU; Triton, which CUDA
builds of torch ship, on GPU). The first compilation of a (source count, dtype)
combination takes seconds; Inductor caches the compiled code on disk
(``TORCHINDUCTOR_CACHE_DIR``; the driver points it at ``cache_dir/inductor``),
so later runs load it. Where compilation fails, a warning says why once and the
eager merge is used: results are the same, only slower.

Modes (``merge.kernel``, or ``LIGHTNING_MERGE_KERNEL``): ``auto`` compiles for
merges of at least :data:`AUTO_MIN_ELEMENTS` float elements (where a few
seconds of compilation are repaid by the first few trials), ``compiled``
always, ``eager`` never. Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Sequence

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "eager", "compiled")
AUTO_MIN_ELEMENTS = 1 << 26  # 67M float elements per merge (a ~67M-parameter model or shard)
MIN_NUMEL = 1 << 16  # smaller tensors stay eager (or are packed, see merge.MergePlan)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_mode: str | None = None
_broken: dict[str, str] = {}  # device type -> why compilation failed
_compiled: dict[int, object] = {}


def set_mode(mode: str | None) -> None:
    """Set the kernel mode for this process (None: ``LIGHTNING_MERGE_KERNEL``, else ``auto``)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"merge.kernel={mode!r}: use one of {', '.join(MODES)}")
    _mode = mode


def mode() -> str:
    """The kernel mode in force: :func:`set_mode`'s, else ``LIGHTNING_MERGE_KERNEL``, else ``auto``."""
    m = _mode or os.environ.get("LIGHTNING_MERGE_KERNEL") or "auto"
    if m not in MODES:
        raise ValueError(f"LIGHTNING_MERGE_KERNEL={m!r}: use one of {', '.join(MODES)}")
    return m


def unavailable(device_type: str) -> str | None:
    """Why the compiled kernel cannot run on this device type, or None when it can (as far as we can tell)."""
    if device_type in _broken:
        return _broken[device_type]
    if torch._dynamo.config.disable:  # torch.compile would run the function eagerly: not the eager merge's bits
        return "torch.compile is disabled (TORCHDYNAMO_DISABLE)"
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None and shutil.which("clang++") is None:
            return f"no C++ compiler ({cxx} or clang++) on PATH for torch.compile's CPU code"
        return None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401  (only whether it imports)
        except ImportError:
            return "Triton is not installed (CUDA builds of torch ship it)"
        if not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")):
            return "no C compiler (cc, gcc or clang) on PATH for Triton's kernel launcher"
        return None
    return f"no compiled kernel for device type {device_type!r}"


def wanted(total_elements: int, device_type: str, mode_: str | None = None) -> bool:
    """Whether a merge of ``total_elements`` float elements on ``device_type`` should use the compiled kernel.

    ``mode_`` overrides the process's :func:`mode` (``merge.MergePlan``'s ``kernel``).
    """
    m = mode_ or mode()
    if m == "eager":
        return False
    if m == "auto" and total_elements < AUTO_MIN_ELEMENTS:
        return False
    return unavailable(device_type) is None


def eligible(out: torch.Tensor, srcs: Sequence[torch.Tensor]) -> bool:
    """Whether one tensor's merge can go through the kernel (fp64, small and cross-device merges stay eager)."""
    return (out.numel() >= MIN_NUMEL and out.dtype in KERNEL_DTYPES
            and all(s.dtype in KERNEL_DTYPES and s.device == out.device for s in srcs))


def _source(k: int) -> str:
    """The kernel for ``k`` sources as Python source: the eager merge's arithmetic, written out term by term."""
    args = ", ".join(f"s{i}" for i in range(k))
    lines = [f"def merge_{k}(w, out, {args}):", "    acc = s0.float() * w[0]"]
    lines += [f"    acc = fma(s{i}.float(), w[{i}], acc)" for i in range(1, k)]
    lines += ["    out.copy_(acc)"]
    return "\n".join(lines) + "\n"


def _kernel(k: int):
    """The compiled kernel for ``k`` sources.

    One function (one code object) per ``k``, so dynamo's recompile limit (8
    per code object) is never shared between source counts; each specialises
    per dtype combination, device and size class only.
    """
    fn = _compiled.get(k)
    if fn is None:
        from torch._inductor import inductor_prims

        scope = {"fma": inductor_prims.fma}
        exec(compile(_source(k), f"<lightning_merge.kernels.merge_{k}>", "exec"), scope)  # noqa: S102
        fn = _compiled[k] = torch.compile(scope[f"merge_{k}"], dynamic=True, fullgraph=True)
    return fn


def fused_merge(out: torch.Tensor, srcs: Sequence[torch.Tensor], w: torch.Tensor) -> bool:
    """``out <- sum_k w[k] * srcs[k]`` (1-D, contiguous) in one pass; False when it could not run.

    ``w`` is an fp32 tensor on ``out``'s device holding the nonzero weights of
    ``srcs``. Returns False, after logging why once, when the kernel cannot be
    compiled on this device: the caller then merges eagerly.
    """
    dev = out.device.type
    if dev in _broken:
        return False
    try:
        # Past the recompile limit dynamo would run the function eagerly, where inductor's fma is not the
        # eager merge's: fail instead, and merge eagerly below (the same bits).
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            _kernel(len(srcs))(w, out, *srcs)
        return True
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager merge gives the same result
        _broken[dev] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("the fused merge kernel could not be compiled on %s (%s); merging with eager PyTorch ops "
                    "instead (the same result, slower). Set merge.kernel=eager to skip the attempt", dev,
                    _broken[dev])
        return False
