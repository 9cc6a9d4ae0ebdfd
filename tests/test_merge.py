"""merge_into against hand-computed values; write_merged output checked tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_merge.series import CheckpointSeries
from lightning_merge.merge import MergeError, merge_into
from lightning_merge.writer import write_merged


def test_merge_into_hand_computed():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([4.0, 5.0, 6.0])
    out = torch.empty(3)
    merge_into([out], [[a], [b]], [0.25, 0.75])
    assert out.tolist() == [3.25, 4.25, 5.25]
    merge_into({"x": out}, [{"x": a}, {"x": b}], [2.0, -1.0])  # affine, un-normalised
    assert out.tolist() == [-2.0, -1.0, 0.0]


def test_one_hot_reproduces_each_source_exactly():
    g = torch.Generator().manual_seed(0)
    srcs = [[torch.randn(300_000, generator=g), torch.randn(7, 5, generator=g)] for _ in range(3)]
    outs = [torch.empty(300_000), torch.empty(7, 5)]
    for k in range(3):
        merge_into(outs, srcs, [1.0 if j == k else 0.0 for j in range(3)])
        assert all(torch.equal(o, s) for o, s in zip(outs, srcs[k]))


def test_large_tensor_matches_reference_across_chunks():
    g = torch.Generator().manual_seed(1)
    srcs = [[torch.randn(1000, 333, generator=g)] for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    out = torch.empty(1000, 333)
    merge_into([out], srcs, w)
    ref = sum(wk * s[0].double() for wk, s in zip(w, srcs)).float()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_bf16_accumulates_in_fp32():
    # 128 + 0.5 + 0.5: in bf16 each partial sum rounds back to 128 (8 significant bits);
    # accumulated in fp32 the sum is 129, which bf16 represents exactly.
    a = torch.full((5,), 256.0, dtype=torch.bfloat16)
    b = torch.full((5,), 1.0, dtype=torch.bfloat16)
    out = torch.empty(5, dtype=torch.bfloat16)
    merge_into([out], [[a], [b], [b]], [0.5, 0.5, 0.5])
    assert out.tolist() == [129.0] * 5
    naive = a * 0.5 + b * 0.5 + b * 0.5  # bf16 arithmetic throughout
    assert naive.tolist() == [128.0] * 5


def test_normalize_option():
    a, b = torch.tensor([2.0]), torch.tensor([4.0])
    out = torch.empty(1)
    merge_into([out], [[a], [b]], [1.0, 3.0], normalize=True)
    assert out.item() == pytest.approx(3.5)


@pytest.mark.parametrize("w", [[float("nan"), 1.0], [float("inf"), 0.0]])
def test_non_finite_weights_rejected(w):
    with pytest.raises(MergeError, match="finite"):
        merge_into([torch.empty(2)], [[torch.ones(2)], [torch.ones(2)]], w)


def test_non_finite_result_rejected():
    big = torch.full((3,), 3e38)
    with pytest.raises(MergeError, match="non-finite"):
        merge_into([torch.empty(3)], [[big], [big]], [1.0, 1.0])


def test_integer_buffers_must_agree():
    out = torch.empty(3, dtype=torch.int64)
    merge_into([out], [[torch.arange(3)], [torch.arange(3)]], [0.5, 0.5])
    assert out.tolist() == [0, 1, 2]
    with pytest.raises(MergeError, match="non-float tensor"):
        merge_into([out], [[torch.arange(3)], [torch.arange(3) + 1]], [0.5, 0.5])


def test_wrong_number_of_weights():
    with pytest.raises(MergeError, match="one weight per checkpoint"):
        merge_into([torch.empty(1)], [[torch.ones(1)], [torch.ones(1)]], [1.0])


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("max_shard_bytes", [5 * 1024**3, 40_000])
def test_write_merged_equals_hand_merge_and_loads(tiny_run, tmp_path, max_shard_bytes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a_path, b_path = tiny_run["paths"][:2]
    series = CheckpointSeries.from_sources([a_path, b_path])
    lam = 0.37
    out = write_merged(series, [1 - lam, lam], tmp_path / "merged", max_shard_bytes=max_shard_bytes)
    got, a, b = _tensors(out), _tensors(a_path), _tensors(b_path)
    assert got.keys() == a.keys()
    for n in a:
        torch.testing.assert_close(got[n], lam * b[n] + (1 - lam) * a[n], rtol=1e-6, atol=1e-7)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 1e6)
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(a)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    AutoTokenizer.from_pretrained(out)
    recipe = (out / "merge.yaml").read_text()
    assert str(b_path.resolve()) in recipe and "0.37" in recipe
    assert not list(tmp_path.glob(".merged*")), "temporary folders must not be left behind"


def test_write_merged_bf16_output_dtype(tiny_run, tmp_path):
    series = CheckpointSeries.from_sources(tiny_run["paths"][:2])
    out = write_merged(series, [0.5, 0.5], tmp_path / "m16", dtype=torch.bfloat16)
    t = _tensors(out)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_write_merged_failure_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import lightning_merge.writer as merge_mod

    series = CheckpointSeries.from_sources(tiny_run["paths"][:2])
    calls = []

    def boom(self, t):
        calls.append(1)
        if len(calls) == 5:  # part-way through the first shard
            raise OSError("disk on fire")
        return real(self, t)

    real = merge_mod._ShardWriter.write
    monkeypatch.setattr(merge_mod._ShardWriter, "write", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_merged(series, [0.5, 0.5], tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_one_hot_keeps_negative_zero_bit_exact():
    a = torch.tensor([-0.0, 1.5, -2.0])
    b = torch.tensor([3.0, -0.0, 4.0])
    out = torch.empty(3)
    merge_into([out], [[a], [b]], [1.0, 0.0])
    assert torch.equal(out.view(torch.int32), a.view(torch.int32))  # -0.0 stays -0.0


def test_bf16_three_sources_round_once_from_fp32():
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(70_000, generator=g).to(torch.bfloat16) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    out = torch.empty(70_000, dtype=torch.bfloat16)
    merge_into([out], [[s] for s in srcs], w)
    ref = sum(wk * s.double() for wk, s in zip(w, srcs))
    # within one bf16 ulp of the fp64 result (one rounding, not one per term), plus fp32 accumulation
    # error where the terms cancel to ~0
    scale = torch.stack([s.double().abs() for s in srcs]).max(0).values
    tol = torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-6 * scale
    assert bool(((out.double() - ref).abs() <= tol).all())
    naive = srcs[0] * w[0] + srcs[1] * w[1] + srcs[2] * w[2]  # bf16 arithmetic: a rounding per step
    assert not bool(((naive.double() - ref).abs() <= tol).all())


def test_fp16_overflow_is_rejected():
    a = torch.full((4,), 60000.0, dtype=torch.float16)
    with pytest.raises(MergeError, match="non-finite"):
        merge_into([torch.empty(4, dtype=torch.float16)], [[a], [a]], [1.0, 1.0])


def test_huge_finite_values_whose_sum_overflows_are_accepted():
    big = torch.full((1000,), 3e38)  # finite, but their sum is not
    out = torch.empty(1000)
    merge_into([out], [[big], [big]], [0.5, 0.5])
    assert torch.equal(out, big)
