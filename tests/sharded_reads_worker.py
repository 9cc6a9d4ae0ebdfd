"""One rank of an FSDP2-sharded merge on CPU that records the bytes it read (see test_sharded_reads.py).

usage: python -m torch.distributed.run --nproc_per_node=W tests/sharded_reads_worker.py SPEC.json

The HF model is built from the series' config.json and sharded with FSDP2
(``fully_shard`` over each decoder layer, then the root: what Lightning's
``ModelParallelStrategy`` does), so each rank holds dim-0 row ranges of every
parameter. ``ShardMerger(model, "fsdp", series)`` then reads each source's
slices (``Checkpoint.read_slice``); the bytes every checkpoint read
(``Checkpoint.bytes_read``) are recorded before and after, with each shard's
``[start, end)``. After ``apply(weights)`` each rank saves its merged local
shards, so the test can check them against its own merge of the whole tensors.

SPEC (json): ``sources`` (checkpoint folders), ``weights`` (one weight vector),
``out`` (a folder: ``rank{r}.pt`` per rank and ``result.json`` from rank 0).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lightning_merge.series import CheckpointSeries  # noqa: E402
from lightning_merge.sharding import ShardMerger  # noqa: E402


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    rank, world = dist.get_rank(), dist.get_world_size()
    series = CheckpointSeries.from_sources(spec["sources"])
    before = [ck.bytes_read for ck in series.checkpoints]  # opening reads headers only

    config = AutoConfig.from_pretrained(series.config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    merger = ShardMerger(model, "fsdp", series)
    after = [ck.bytes_read for ck in series.checkpoints]
    shards = merger.shards
    layout = [[s.name, s.start, s.end, list(s.shape), s.target.element_size()] for s in shards]

    merger.apply(spec["weights"])
    torch.save({s.name: s.target.clone() for s in shards}, os.path.join(spec["out"], f"rank{rank}.pt"))
    stats = {"rank": rank, "bytes_before": before, "bytes_after": after, "layout": layout,
             "local_numel": merger.local_numel, "full_numel": merger.full_numel}

    everyone = [None] * world
    dist.all_gather_object(everyone, stats)
    if rank == 0:
        tmp = os.path.join(spec["out"], "result.json.tmp")
        with open(tmp, "w") as fh:
            json.dump({"world": world, "ranks": everyone}, fh)
        os.replace(tmp, os.path.join(spec["out"], "result.json"))
    dist.barrier()
    # Hack (as zero3_worker.py): a gloo thread now and then aborts the process at teardown after all the
    # work is done; leave without tearing down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
