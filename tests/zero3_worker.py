"""One rank of a sharded (DeepSpeed ZeRO-3, or FSDP) merge-and-evaluate run on CPU (see test_zero3_cpu.py).

usage: python -m torch.distributed.run --nproc_per_node=2 tests/zero3_worker.py SPEC.json

Lightning refuses DeepSpeed on CPU, so this drives raw ``deepspeed`` the way
Lightning's ``DeepSpeedStrategy`` does for inference: the model is built under
``deepspeed.zero.Init`` (no rank ever holds it whole) and wrapped by
``deepspeed.initialize`` with ZeRO stage 3 and no optimizer. Each rank then
merges its own ``ds_tensor`` partitions from the matching slices of the
sources (``ShardMerger``) and evaluates a disjoint share of the blocks; the NLL
sum and token count are all-reduced, so the loss is exact. Forward gathers the
parameters as ZeRO-3 always does; merging never does, which is checked.

With ``strategy`` ``fsdp1`` or ``fsdp2`` in SPEC the same run uses torch FSDP
(Lightning's ``FSDPStrategy`` / ``ModelParallelStrategy`` layouts) instead.

SPEC (json): ``strategy`` (``zero3``, the default; ``fsdp1``; ``fsdp2``),
``sources`` (checkpoint folders), ``weights`` (a list of weight vectors,
merged and evaluated in turn), ``blocks`` (a ``torch.save``d ``[n, T]``
int64 tensor), ``batch_size``, ``out`` (json written by rank 0).
"""

import json
import os
import sys

os.environ["DS_ACCELERATOR"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402

# Hack: DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (minutes on 2 cores).
# Marked incompatible, deepspeed.comm falls back to torch.distributed (gloo), which is all we need.
deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lightning_merge.series import CheckpointSeries  # noqa: E402
from lightning_merge.sharding import ShardMerger, local_shards  # noqa: E402

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def gathered(module: torch.nn.Module) -> list[str]:
    """Names of parameters whose full copy is present (gathered) on this rank."""
    return [n for n, p in module.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]


def evaluate(forward, blocks: torch.Tensor, batch_size: int, rank: int, world: int) -> tuple[float, int]:
    """Exact sum of token NLL and token count over all ranks.

    Rank r takes blocks r, r+world, ...; ranks are padded with masked blocks to
    the same number of forwards, since every ZeRO-3 forward is a collective.
    """
    n = blocks.shape[0]
    per_rank = -(-n // world)
    idx = list(range(rank, per_rank * world, world))
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.int64)
    for a in range(0, len(idx), batch_size):
        chunk = idx[a:a + batch_size]
        ids = blocks[[i if i < n else 0 for i in chunk]]
        valid = torch.tensor([1.0 if i < n else 0.0 for i in chunk], dtype=torch.float64)
        logits = forward(input_ids=ids).logits
        tok_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                  reduction="none").view(ids.shape[0], -1)
        nll += (tok_nll.to(torch.float64).sum(dim=1) * valid).sum()
        tokens += int(valid.sum().item()) * (ids.shape[1] - 1)
    dist.all_reduce(nll)
    dist.all_reduce(tokens)
    return float(nll), int(tokens)


def build_zero3(config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model built partitioned under zero.Init and wrapped as Lightning does for inference."""
    # zero.Init patches torch.Tensor.__new__, which breaks torch._dynamo if transformers first imports
    # it lazily inside the context: resolve the model class (and its imports) before entering.
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = model_cls._from_config(config, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, optimizer=None, model_parameters=[],
                                      dist_init_required=False)
    return engine, engine.module.eval()


def build_fsdp(config, version: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """FSDP1 (Lightning's FSDPStrategy: use_orig_params) or FSDP2 (fully_shard) over the decoder layers."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layer_cls = type(model.model.layers[0])
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        root = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}),
                                        use_orig_params=True, device_id=torch.device("cpu"))
        return root, root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


class ProcessGroupRunner:
    """ResidentLM's runner on a raw process group: this rank's dealt batches, then all_gather_object."""

    def __init__(self, model, rank: int, world: int) -> None:
        self.model, self.rank, self.world = model, rank, world

    def map(self, fn, items):
        from lightning_merge.lmeval.model import collect, deal

        with torch.no_grad():
            mine = [(i, fn(self.model, items[max(i, 0)])) for i in deal(len(items), self.rank, self.world)]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, [(i, o) for i, o in mine if i >= 0])
        return collect(everyone, len(items))


def run_lmeval(conf: dict, series, config, module, rank: int, world: int) -> dict:
    """lm-eval's metrics of the merged model: every forward (and every generation step) on all ranks."""
    from transformers import AutoTokenizer

    from lightning_merge.lmeval.model import ResidentLM
    from lightning_merge.lmeval.tasks import load_tasks, run_tasks

    tok = AutoTokenizer.from_pretrained(series.config_dir)
    lm = ResidentLM(config, tok, ProcessGroupRunner(module, rank, world), batch_size=conf["batch_size"],
                    synced=True)
    tasks = load_tasks(conf["tasks"], data=conf["data"], num_fewshot=conf.get("num_fewshot"))
    res = run_tasks(lm, tasks, limit=conf.get("limit"))
    return {t: {k: v for k, v in res[t].items() if isinstance(v, (int, float))} for t in conf["tasks"]}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    kind = spec.get("strategy", "zero3")
    rank, world = dist.get_rank(), dist.get_world_size()
    series = CheckpointSeries.from_sources(spec["sources"])
    blocks = torch.load(spec["blocks"], weights_only=True)
    config = AutoConfig.from_pretrained(series.config_dir)
    zero3 = kind == "zero3"
    forward, module = build_zero3(config) if zero3 else build_fsdp(config, int(kind[-1]))
    # Lightning evaluates FSDP under no_grad (pytorch#95957) and the rest under inference_mode.
    no_grad = torch.inference_mode if zero3 else torch.no_grad
    stats: dict = {"rank": rank}

    if zero3:  # each rank's partitions are about 1/world of every parameter; merging reads only these
        shards = local_shards(module, "zero3")
        stats["gathered_after_init"] = gathered(module)
        stats["per_param"] = []
        for (name, p), s in zip(module.named_parameters(), shards):
            assert s.name == name, (s.name, name)
            stats["per_param"].append([name, p.ds_numel, s.end - s.start, p.ds_tensor.numel()])
    merger = ShardMerger(module, "fsdp" if not zero3 else "zero3", series)
    stats["local_numel"] = merger.local_numel
    stats["full_numel"] = merger.full_numel
    stats["source_numel"] = [sum(t.numel() for t in src) for src in merger.sources]
    if zero3:
        stats["gathered_after_load"] = gathered(module)

    losses, gathered_before, gathered_after = [], [], []
    for i, w in enumerate(spec["weights"]):
        if zero3:
            gathered_before.append(len(gathered(module)))
        if i == 0:  # as in a Lightning hook: the merge runs inside the evaluation's grad mode
            with no_grad():
                merger.apply(w)
        else:
            merger.apply(w)
        if zero3:
            gathered_after.append(gathered(module))  # a merge gathers nothing (and drops stale copies)
        with no_grad():
            nll, tokens = evaluate(forward, blocks, spec["batch_size"], rank, world)
        losses.append({"weights": w, "loss": nll / tokens, "nll": nll, "tokens": tokens})
        if spec.get("lmeval"):  # lm-eval tasks on the merged, partitioned model (ZeRO-3 only)
            losses[-1]["lmeval"] = run_lmeval(spec["lmeval"], series, config, module, rank, world)
    if zero3:
        stats["gathered_before_merge"] = gathered_before
        stats["gathered_after_merge"] = gathered_after

    everyone = [None] * world
    dist.all_gather_object(everyone, stats)
    if rank == 0:
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"world": world, "strategy": kind, "losses": losses, "ranks": everyone}, fh)
        os.replace(tmp, spec["out"])
    dist.barrier()
    # Hack: about one run in eight, a gloo thread aborts the process at teardown ("terminate called
    # without an active exception") after all the work is done; leave without tearing down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
