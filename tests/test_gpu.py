"""GPU checks (skipped without CUDA): sharded merging under Lightning's DeepSpeed ZeRO-3, and one-GPU runs.

Each case goes through the real ``Evaluator``: ``trainer.validate`` sets the
strategy up, the merge runs in ``on_validation_start`` through
``ShardMerger`` (``zero3``: each rank merges its own ``ds_tensor``
partitions), and the exact loss must equal a plain single-process
transformers loop over the same blocks, on a model merged whole. Every case
evaluates two weight vectors on one Trainer (the first one twice), so the
second merge must drop the copies ZeRO-3 keeps gathered between forwards
(persistent parameters), and an evaluation without a merge must still run
after Lightning's teardown moved the module (and those copies) to CPU. The
merged shards themselves are compared with the whole merge too, so a wrong
loss can be told apart from a wrong merge.

Each case runs in its own process (``python tests/test_gpu.py CASE DIR``):
DeepSpeed, Lightning and NCCL keep process-wide state (process groups,
patched constructors) that must not leak from one case into the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WEIGHTS = [[0.2, 0.3, 0.5], [-0.25, 0.5, 0.75]]
# Evaluations in turn (indices into WEIGHTS): the repeat evaluates again without merging, as the
# driver does for its held-out and OOD sets, after Lightning's teardown has moved the module to CPU.
SEQUENCE = [0, 0, 1]
VOCAB, BLOCK, NBLOCKS, BATCH = 1000, 128, 23, 4  # 23 blocks: the last batch is short
# case -> (strategy.name, devices, precision, relative tolerance of the loss)
CASES = {
    "deepspeed3-bf16": ("deepspeed_stage_3", 1, "bf16-true", 1e-3),
    "deepspeed3-fp32": ("deepspeed_stage_3", 1, "32-true", 1e-5),
    "single-bf16": ("single", 1, "bf16-true", 1e-3),
    "ddp1-bf16": ("ddp", 1, "bf16-true", 1e-3),  # one NCCL process group of one rank
    "fsdp1-bf16": ("fsdp", 1, "bf16-true", 1e-3),  # FSDP root wraps the LightningModule
}
_KIND = {"deepspeed_stage_3": "zero3", "single": "whole", "ddp": "whole", "fsdp": "fsdp"}


def make_inputs(root: Path) -> tuple[list[Path], Path]:
    """Three small Llamas (fp32, different seeds) and fixed blocks, on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=344, num_hidden_layers=4, max_position_embeddings=BLOCK,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(root / f"step{seed}")
        paths.append(root / f"step{seed}")
    blocks = torch.randint(0, VOCAB, (NBLOCKS, BLOCK), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, root / "blocks.pt")
    return paths, root / "blocks.pt"


def skeleton(series, dtype: torch.dtype):
    """The model from config.json, cast as Lightning's "-true" precisions cast it (``module.to(dtype)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(series.config_dir)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype).eval()


def reference(series, weights: list[float], blocks: torch.Tensor, dtype: torch.dtype,
              device: str = "cuda") -> tuple[float, dict]:
    """Loss of the whole merge with a plain inference_mode loop on one GPU, and the merged tensors."""
    import torch.nn.functional as F

    from lightning_merge.sharding import ShardMerger

    model = skeleton(series, dtype).to(device)
    ShardMerger(model, "whole", series).apply(weights)
    nll, n = 0.0, 0
    with torch.inference_mode():
        for b in blocks.to(device).split(BATCH):
            logits = model(input_ids=b).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(),
                                   reduction="sum").double().item()
            n += b[:, 1:].numel()
    merged = {k: v.detach().float().cpu() for k, v in model.named_parameters()}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return nll / n, merged


def run_case(case: str, root: Path, accelerator: str = "gpu", progress=None) -> dict:
    """Evaluate SEQUENCE through the Evaluator under ``case``; return what the test checks.

    ``progress(partial)`` is called after each evaluation, so a crash later still tells how far it got.
    """
    from lightning_merge.series import CheckpointSeries
    from lightning_merge.config import StrategyConf
    from lightning_merge.evaluate import Evaluator
    from lightning_merge.sharding import ShardMerger

    name, devices, precision, _ = CASES[case]
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    paths = sorted(p for p in root.glob("step*"))
    series = CheckpointSeries.from_sources(paths)
    blocks = torch.load(root / "blocks.pt", weights_only=True)
    refs = [reference(series, w, blocks, dtype, "cuda" if accelerator == "gpu" else "cpu") for w in WEIGHTS]

    kind = _KIND[name]
    conf = StrategyConf(name=name, accelerator="gpu", devices=devices, precision=precision)
    conf.accelerator = accelerator  # "cpu" only for the CPU dry run of this file (see __main__)
    ev = Evaluator(skeleton(series, torch.float32), conf, batch_size=BATCH,
                   merger_factory=lambda model, prefix: ShardMerger(model, kind, series, prefix=prefix))
    out: dict = {"case": case, "strategy": type(ev.trainer.strategy).__name__, "losses": [], "refs": [],
                 "tokens": [], "max_rel_param_err": []}
    for i in SEQUENCE:
        ev.set_weights(WEIGHTS[i])
        res = ev.evaluate(blocks)
        out["losses"].append(res.loss)
        out["tokens"].append(res.tokens)
        merger = ev.merger
        out["refs"].append(refs[i][0])
        err = 0.0  # this rank's merged shards against the same elements of the whole merge
        for s in merger.shards:
            if s.end > s.start:
                want = refs[i][1][s.name].view(-1)[s.start:s.end]
                got = s.target.detach().float().cpu()
                err = max(err, float(((got - want).abs() / want.abs().clamp_min(1e-3)).max()))
        out["max_rel_param_err"].append(err)
        if progress is not None:
            progress(out)
    params = list(ev.module.model.named_parameters())
    out["kind"] = merger.kind
    out["zero3_params"] = sum(getattr(p, "ds_tensor", None) is not None for _, p in params)
    out["params"] = len(params)
    out["local_numel"], out["full_numel"] = merger.local_numel, merger.full_numel
    out["persistent"] = sum(bool(getattr(p, "ds_persist", False)) for _, p in params)
    out["metric_dtype"] = str(ev.module.metric.nll.dtype)
    out["param_dtype"] = str(merger.shards[0].target.dtype)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    make_inputs(root)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_merge_then_evaluate_equals_the_single_process_reference(case, inputs):
    out_file = inputs / f"{case}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, case, str(inputs)], capture_output=True, text=True,
                          timeout=300, env=env)
    partial = inputs / f"{case}.partial.json"
    so_far = partial.read_text() if partial.exists() else "nothing"
    assert proc.returncode == 0, f"results so far: {so_far}\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
    check(case, json.loads(out_file.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "fsdp"])
def test_lmeval_under_lightning_sharding_equals_hflm(strategy, tmp_path, tokenizer):
    """lm-eval tasks on the merge in place under Lightning's ZeRO-3 (and FSDP) on one GPU equal lm-eval's HFLM
    on the saved merge: acc / acc_norm exactly, word perplexity to fp32 rounding (ZeRO-3's gathered
    parameters run the same kernels, but not necessarily in the same order)."""
    pytest.importorskip("accelerate")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lightning_merge.lmeval.tasks import build_cloze_items, load_tasks
    from lightning_merge.writer import write_merged
    from lightning_merge.series import CheckpointSeries
    from test_lmeval_distributed import PROSE, _model

    paths = [_model(tmp_path / "ckpts" / f"step{s}", seed=s, tokenizer=tokenizer) for s in (1, 2)]
    merged = write_merged(CheckpointSeries.from_sources([str(p) for p in paths]), [0.3, 0.7], tmp_path / "merged")
    data = {"cloze_local": str(build_cloze_items(PROSE * 3, tmp_path / "cloze.jsonl", n_items=12, seed=1)),
            "text_local": str(tmp_path / "text.jsonl")}
    Path(data["text_local"]).write_text("".join(json.dumps({"text": " ".join(PROSE) * 2}) + "\n" for _ in range(2)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    os.environ["HF_DATASETS_CACHE"] = env["HF_DATASETS_CACHE"]
    loaded = load_tasks(["cloze_local", "text_local"], data=data)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=str(merged), device="cuda", batch_size=3, dtype="float32"),
                                  tasks=list(loaded["tasks"].values()), bootstrap_iters=0)["results"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lightning_merge", "mode=evaluate", "demo.enabled=false",
           f"checkpoints.sources=[{paths[0]},{paths[1]}]", "merge.weights=[0.3,0.7]",
           f"data.heldout.path={data['text_local']}", "data.heldout.block_size=32", "data.heldout.num_blocks=4",
           "data.search_blocks=2", "report.lmeval.tasks=[cloze_local,text_local]", "lmeval.batch_size=3",
           *[f"lmeval.data.{k}={v}" for k, v in data.items()], f"strategy={strategy}", "strategy.accelerator=gpu",
           "strategy.devices=1", f"output_dir={out}", "report.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = json.loads((out / "results.json").read_text())["lmeval"]["rows"]
    got = row["metrics"]
    for m in ("acc,none", "acc_norm,none"):
        assert got["cloze_local"][m] == ref["cloze_local"][m]
    assert got["text_local"]["word_perplexity,none"] == pytest.approx(ref["text_local"]["word_perplexity,none"],
                                                                      rel=1e-4)


def check(case: str, out: dict) -> None:
    """The assertions on one case's results (also used by the CPU dry run)."""
    name, _, precision, rel = CASES[case]
    dtype = "torch.bfloat16" if precision.startswith("bf16") else "torch.float32"
    print(json.dumps(out))
    assert out["param_dtype"] == dtype
    assert out["tokens"] == [NBLOCKS * (BLOCK - 1)] * len(SEQUENCE)
    if name == "deepspeed_stage_3":
        assert out["strategy"].endswith("DeepSpeedStrategy") and out["kind"] == "zero3"
        assert out["zero3_params"] == out["params"] > 0  # every parameter is a ZeRO-3 partition
        assert out["persistent"] > 0  # so the second merge had gathered copies to drop
    assert out["local_numel"] == out["full_numel"]  # one rank holds all of it
    # The merge itself: the shards equal the same elements of the whole merge (a rounding at most).
    assert max(out["max_rel_param_err"]) <= (1e-2 if dtype == "torch.bfloat16" else 1e-6), out["max_rel_param_err"]
    # Exact sums need float64 states; a precision plugin's module.to(dtype) must not cast them.
    assert out["metric_dtype"] == "torch.float64", (
        f"TokenNLL's sum was cast to {out['metric_dtype']} by precision={precision} (module.to(dtype)); "
        "the loss is then rounded; keep the metric states out of dtype casts")
    for i, got, ref in zip(SEQUENCE, out["losses"], out["refs"]):
        assert got == pytest.approx(ref, rel=rel), (case, WEIGHTS[i])
    assert out["refs"][0] != pytest.approx(out["refs"][-1], rel=rel)  # the second merge is visible


if __name__ == "__main__":
    # One case in a fresh process. ``--cpu-dry-run`` runs the same code on CPU (gloo) and checks it,
    # by lifting Lightning's CUDA-only guards for DeepSpeed: a check of this file, not a supported setup.
    case, root = sys.argv[1], Path(sys.argv[2])
    accelerator = "gpu"
    if "--cpu-dry-run" in sys.argv:
        accelerator = "cpu"
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        import lightning.pytorch.strategies.deepspeed as pl_deepspeed
        from lightning.pytorch.strategies import DDPStrategy

        deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False
        pl_deepspeed.DeepSpeedStrategy.setup_environment = DDPStrategy.setup_environment
        pl_deepspeed._validate_device_index_selection = lambda devices: None
        _set_vars = deepspeed.runtime.engine.DeepSpeedEngine._set_distributed_vars  # a CPU device has no index
        deepspeed.runtime.engine.DeepSpeedEngine._set_distributed_vars = lambda self, args: _set_vars(self, None)
    result = run_case(case, root, accelerator,
                      progress=lambda part: (root / f"{case}.partial.json").write_text(json.dumps(part)))
    tmp = root / f"{case}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, root / f"{case}.json")
    if accelerator == "cpu":
        check(case, result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_merge_kernel_on_cuda_equals_the_eager_merge_bitwise(dtype):
    """The Triton kernel (kernels.py) against the eager CUDA ops, bit for bit, with no host read per run."""
    from lightning_merge import kernels
    from lightning_merge.merge import MergePlan

    if kernels.unavailable("cuda"):
        pytest.skip(kernels.unavailable("cuda"))
    g = torch.Generator().manual_seed(0)
    shapes = [(1 << 20,), (4096, 300), (64,), (64,)]
    srcs = [[torch.randn(s, generator=g).to("cuda", dtype) for s in shapes] for _ in range(3)]
    eager = [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]
    fused = [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]
    pe = MergePlan(eager, srcs, kernel="eager", pack_small=True, bound=True)
    pf = MergePlan(fused, srcs, kernel="compiled", pack_small=True, bound=True)
    for w in ([0.2, 0.3, 0.5], [-0.25, 0.5, 0.75], [0.0, 1.0, 0.0]):
        pe.run(w)
        pf.run(w)
        assert pf.compiled["cuda"], kernels._broken
        iv = torch.int32 if dtype == torch.float32 else torch.int16
        assert all(torch.equal(a.view(iv), b.view(iv)) for a, b in zip(eager, fused)), w
