"""The fused merge kernel and MergePlan: bitwise equal to the eager merge, one host read per run.

The compiled kernel (``lightning_merge/kernels.py``) must give exactly the eager
merge's bits (a resumed run, or a run on another machine, must score the same
weights the same), so every case here compares the two with ``torch.equal`` on
the raw bits, not with a tolerance. Compiling costs seconds per (source count,
dtype) combination the first time (Inductor caches it on disk), so the full
dtype matrix is a slow test.
"""

from __future__ import annotations

import pytest
import torch

from lightning_merge import kernels
from lightning_merge.merge import MergeError, MergePlan, merge_into

pytestmark = pytest.mark.skipif(kernels.unavailable("cpu") is not None, reason="no C++ compiler for torch.compile")

N = kernels.MIN_NUMEL + 4099  # above the kernel's threshold, with an odd tail for the vector loop


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _sources(k: int, dtype: torch.dtype, seed: int = 0, n: int = N) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(n, generator=g) * (1 + j)).to(dtype)] for j in range(k)]


def _both(srcs, w, out_dtype):
    eager, fused = torch.empty(N, dtype=out_dtype), torch.empty(N, dtype=out_dtype)
    merge_into([eager], srcs, w, kernel="eager")
    merge_into([fused], srcs, w, kernel="compiled")
    return eager, fused


def test_compiled_equals_eager_bitwise_bf16_and_fp32():
    for k, dtype, w in ((3, torch.bfloat16, [0.1, 0.7, 0.2]), (2, torch.float32, [1 / 3, 2 / 3])):
        srcs = _sources(k, dtype)
        eager, fused = _both(srcs, w, dtype)
        assert torch.equal(_bits(eager), _bits(fused)), (k, dtype)
        ref = sum(wk * s[0].double() for wk, s in zip(w, srcs))  # and both are the fp32-accumulated merge
        assert (eager.double() - ref).abs().max() <= ref.abs().max() * (2 ** -8 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_compiled_equals_eager_bitwise_matrix(src_dtype, out_dtype, k):
    srcs = _sources(k, src_dtype, seed=k)
    for w in ([1.0 / k] * k, [(-0.5 if j == 0 else 1.5 / (k - 1)) for j in range(k)] if k > 1 else [0.7]):
        eager, fused = _both(srcs, w, out_dtype)
        assert torch.equal(_bits(eager), _bits(fused)), (w, int((_bits(eager) != _bits(fused)).sum()))


def test_zero_weights_are_skipped_so_one_hot_is_exact_in_the_kernel():
    srcs = _sources(3, torch.bfloat16)
    srcs[1][0][5] = float("inf")  # 0 * inf would be NaN: the zero-weighted source is never read
    out = torch.empty(N, dtype=torch.bfloat16)
    merge_into([out], srcs, [0.0, 0.0, 1.0], kernel="compiled")
    assert torch.equal(_bits(out), _bits(srcs[2][0]))


def test_a_non_finite_result_names_its_tensor_in_the_kernel():
    srcs = _sources(2, torch.float32)
    srcs[0][0][7] = float("nan")
    with pytest.raises(MergeError, match=r"'w\.big'.*non-finite"):
        merge_into({"w.big": torch.empty(N)}, [{"w.big": s[0]} for s in srcs], [0.5, 0.5], kernel="compiled")


def test_one_host_read_per_run_however_many_tensors(monkeypatch):
    """No host synchronisation per tensor: the finiteness of every tensor is read once (one .item())."""
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 300), (64,), (64,), (1000, 70), (5,)]
    srcs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    outs = [torch.empty(s) for s in shapes]
    plan = MergePlan(outs, srcs, pack_small=True)
    calls = []
    real = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real(self))
    plan.run([0.2, 0.3, 0.5])
    assert len(calls) == 1
    for o, group in zip(outs, zip(*srcs)):
        ref = torch.empty_like(o)
        monkeypatch.undo()
        merge_into([ref], [[t] for t in group], [0.2, 0.3, 0.5], kernel="eager")
        assert torch.equal(o, ref)


def test_packed_small_tensors_equal_the_unpacked_merge_and_follow_new_weights():
    g = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (64,), (3,), (2, 2, 2)]
    srcs = [[torch.randn(s, generator=g).bfloat16() for s in shapes] + [torch.arange(4)] for _ in range(2)]
    outs = [torch.empty(s, dtype=torch.bfloat16) for s in shapes] + [torch.empty(4, dtype=torch.int64)]
    plan = MergePlan(outs, srcs, pack_small=True)
    assert len(plan.packs) == 1 and len(plan.packs[0].idx) == 4
    for w in ([0.25, 0.75], [1.0, 0.0], [-1.0, 2.0]):
        plan.run(w)
        refs = [torch.empty_like(o) for o in outs]
        merge_into(refs, srcs, w, kernel="eager")
        assert all(torch.equal(o, r) for o, r in zip(outs, refs)), w


def test_integer_buffers_are_checked_once_when_the_plan_is_built():
    with pytest.raises(MergeError, match="non-float tensor"):
        MergePlan([torch.empty(3, dtype=torch.int64)], [[torch.arange(3)], [torch.arange(3) + 1]])


def test_a_failing_compiler_warns_once_and_the_eager_merge_gives_the_same_bits(monkeypatch, caplog):
    srcs = _sources(2, torch.bfloat16)
    ref = torch.empty(N, dtype=torch.bfloat16)
    merge_into([ref], srcs, [0.3, 0.7], kernel="eager")

    def broken(k):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlots of compiler output")

    monkeypatch.setattr(kernels, "_kernel", broken)
    monkeypatch.setattr(kernels, "_broken", {})
    out = torch.empty(N, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="lightning_merge.kernels"):
        merge_into([out], srcs, [0.3, 0.7], kernel="compiled")
        merge_into([out], srcs, [0.3, 0.7], kernel="compiled")
    assert torch.equal(_bits(out), _bits(ref))
    warned = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warned) == 1 and "CppCompileError" in warned[0] and "merge.kernel=eager" in warned[0]


def test_modes_and_the_auto_threshold(monkeypatch):
    monkeypatch.setenv("LIGHTNING_MERGE_KERNEL", "fast")
    with pytest.raises(ValueError, match="LIGHTNING_MERGE_KERNEL='fast'.*auto, eager, compiled"):
        kernels.mode()
    monkeypatch.setenv("LIGHTNING_MERGE_KERNEL", "auto")
    assert not kernels.wanted(kernels.AUTO_MIN_ELEMENTS - 1, "cpu")
    assert kernels.wanted(kernels.AUTO_MIN_ELEMENTS, "cpu")
    assert not MergePlan([torch.empty(N)], [[torch.ones(N)]]).compiled["cpu"]  # small: eager under auto
    monkeypatch.setenv("LIGHTNING_MERGE_KERNEL", "eager")
    assert not kernels.wanted(1 << 40, "cpu")
    with pytest.raises(MergeError, match="merge kernel 'gpu'"):
        MergePlan([torch.empty(1)], [[torch.ones(1)]], kernel="gpu")


def test_a_plan_built_in_inference_mode_runs_outside_it_and_back():
    """Lightning validates in inference mode; the plan's own buffers must stay writable everywhere."""
    g = torch.Generator().manual_seed(5)
    srcs = [[torch.randn(9, generator=g).bfloat16(), torch.randn(4, generator=g).bfloat16()] for _ in range(2)]
    outs = [torch.empty(9, dtype=torch.bfloat16), torch.empty(4, dtype=torch.bfloat16)]
    with torch.inference_mode():
        plan = MergePlan(outs, srcs, pack_small=True)
        plan.run([0.5, 0.5])
    plan.run([0.25, 0.75])
    with torch.inference_mode():
        plan.run([0.75, 0.25])
    refs = [torch.empty_like(o) for o in outs]
    merge_into(refs, srcs, [0.75, 0.25])
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))


def test_the_driver_points_inductor_at_the_cache_dir(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from lightning_merge.driver import _kernel_setup

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")  # so the next delenv is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(kernels, "_mode", None)
    _kernel_setup(SimpleNamespace(merge=SimpleNamespace(kernel="compiled"), cache_dir=str(tmp_path)))
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") and kernels.mode() == "compiled"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "inductor")  # read when Inductor compiles, not at import


def test_past_dynamos_recompile_limit_the_merge_is_eager_not_a_different_fma(monkeypatch, caplog):
    """Dynamo would run the kernel's Python eagerly past its limit (inductor's eager fma rounds twice):
    the kernel fails instead, and the eager merge gives the same bits."""
    import torch._dynamo

    monkeypatch.setattr(kernels, "_broken", {})
    monkeypatch.setattr(kernels, "_compiled", {})
    srcs32, srcs16 = _sources(2, torch.float32, seed=7), _sources(2, torch.bfloat16, seed=7)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING", logger="lightning_merge.kernels"):
        e32, f32 = _both(srcs32, [0.3, 0.7], torch.float32)  # the one compilation allowed
        e16, f16 = _both(srcs16, [0.3, 0.7], torch.bfloat16)  # a second dtype: over the limit
    assert torch.equal(_bits(e32), _bits(f32)) and torch.equal(_bits(e16), _bits(f16))
    assert "cpu" in kernels._broken and any("could not be compiled" in r.getMessage() for r in caplog.records)


def test_torch_compile_disabled_means_eager(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    assert "TORCHDYNAMO_DISABLE" in kernels.unavailable("cpu")
    assert not MergePlan([torch.empty(N)], [[torch.ones(N)]], kernel="compiled").compiled["cpu"]


def test_a_bounded_plan_reads_nothing_back_per_run_and_still_catches_overflow(monkeypatch):
    """bound=True: the sources' max |value| is read once; while sum |w_k| * max_k bounds the merge below the
    dtype's largest value, a run reads nothing back; past it, each tensor is checked as before."""
    g = torch.Generator().manual_seed(8)
    shapes = [(N,), (300, 300), (64,), (64,)]
    for kern in ("eager", "compiled"):
        srcs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
        outs = [torch.empty(s) for s in shapes]
        plan = MergePlan(outs, srcs, pack_small=True, bound=True, kernel=kern)
        plan.run([0.2, 0.3, 0.5])  # the one read: the sources' max |value|
        calls = []
        real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item") or real_item(self))
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append("tolist") or real_tolist(self))
        plan.run([0.1, 0.6, 0.3])
        assert calls == []
        monkeypatch.undo()
        refs = [torch.empty_like(o) for o in outs]
        merge_into(refs, srcs, [0.1, 0.6, 0.3], kernel="eager")
        assert all(torch.equal(o, r) for o, r in zip(outs, refs))
        with pytest.raises(MergeError, match="non-finite"):  # the bound is passed: checked, and it overflows
            plan.run([1e38, 1e38, 1e38])
        srcs[1][0][3] = float("inf")  # a source that holds inf: its bound is inf, so every run checks
        plan = MergePlan(outs, srcs, bound=True, kernel=kern)
        plan.run([0.5, 0.0, 0.5])  # weighted 0, it is never read: no error
        with pytest.raises(MergeError, match="'#0'.*non-finite"):
            plan.run([0.5, 0.25, 0.25])


def test_empty_float_tensors_merge_to_empty():
    outs = [torch.empty(0), torch.empty(0, 3, dtype=torch.bfloat16), torch.empty(2)]
    srcs = [[torch.empty(0), torch.empty(0, 3, dtype=torch.bfloat16), torch.tensor([1.0, 2.0])] for _ in range(2)]
    merge_into(outs, srcs, [0.5, 0.5])
    assert outs[2].tolist() == [1.0, 2.0] and outs[0].numel() == 0 and outs[1].shape == (0, 3)
