"""Per-slice reads: bytes read and wall time per rank at world sizes 1, 2 and 4 (CPU processes, FSDP2).

What it measures. Under FSDP (and ZeRO-3) a rank holds ``1/W`` of each
parameter, so it should read only that share of every source checkpoint.
Two Llama checkpoints (``--hidden``, ``--layers``, ``--vocab``; ~83 MB each in
fp32 by default) are saved with transformers' ``save_pretrained``
(safetensors). For each world size W, W CPU processes (``torch.distributed.run``,
gloo) shard a model of that config with FSDP2 (``fully_shard`` per decoder layer,
then the root) and build ``lightning_merge.sharding.ShardMerger``, which loads
each rank's slices of both sources (``Checkpoint.read_slice``: safetensors by
byte range). Per rank we record the bytes read (``Checkpoint.bytes_read``) and
the seconds spent loading (the slowest rank; median of ``--repeats`` runs, the
page cache warmed first). The baseline, measured in the same run at the same
W, is what the tool did before: read every whole tensor, then slice it.

Goal: bytes per rank at W within 1.1x of ``1/W`` of the single-rank figure
(the ``vs 1/W`` column <= 1.10), while the whole-tensor baseline stays at W x.

    python benchmarks/sharded_reads.py                 # W = 1, 2, 4 (~5 min on 2 cores)
    python benchmarks/sharded_reads.py --worlds 1 2 --layers 2 --hidden 256   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout, not an installed copy


def _save_sources(root: Path, a: argparse.Namespace) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_attention_heads=a.hidden // 64,
                          num_key_value_heads=max(1, a.hidden // 256), intermediate_size=int(a.hidden * 2.6875),
                          num_hidden_layers=a.layers, max_position_embeddings=256, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(root / f"step{seed + 1}")
        paths.append(root / f"step{seed + 1}")
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(paths: list[Path], world: int, whole: bool, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    spec = {"sources": [str(p) for p in paths], "whole": whole, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
           f"--master_port={_free_port()}", __file__, "--worker", str(out / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=out)
    if proc.returncode != 0:
        sys.exit(f"world {world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def worker(spec_file: str) -> None:
    """One rank: shard with FSDP2, load its slices through ShardMerger, record bytes and seconds."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_merge.checkpoints import Checkpoint
    from lightning_merge.series import CheckpointSeries
    from lightning_merge.sharding import ShardMerger

    spec = json.loads(Path(spec_file).read_text())
    if spec["whole"]:  # the baseline: what the tool did before, a whole tensor read per slice
        Checkpoint.read_slice = lambda self, name, s, e: self.read(name).reshape(-1)[s:e].clone()
    rank, world = dist.get_rank(), dist.get_world_size()
    series = CheckpointSeries.from_sources(spec["sources"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(series.config_dir),
                                             dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dist.barrier()
    t0 = time.perf_counter()
    merger = ShardMerger(model, "fsdp", series)
    seconds = time.perf_counter() - t0
    stats = {"rank": rank, "bytes": sum(ck.bytes_read for ck in series.checkpoints), "seconds": seconds,
             "local_numel": merger.local_numel, "full_numel": merger.full_numel}
    everyone = [None] * world
    dist.all_gather_object(everyone, stats)
    if rank == 0:
        (Path(spec["out"]) / "result.json").write_text(json.dumps(everyone))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tests/sharded_reads_worker.py: skip a gloo teardown that can abort after the work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8001, help="odd: FSDP2's dim-0 split is then uneven")
    ap.add_argument("--repeats", type=int, default=3, help="runs per (W, reads); the median seconds is shown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    with tempfile.TemporaryDirectory(prefix="sharded_reads_") as tmp:
        root = Path(tmp)
        paths = _save_sources(root / "ckpts", a)
        size = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
        print(f"2 sources, {size / 1e6:.1f} MB of safetensors in all; hidden {a.hidden}, {a.layers} layers, "
              f"vocab {a.vocab}; {os.cpu_count()} CPUs")
        for p in paths:  # warm the page cache, so that no row pays for the first read from disk
            for f in p.glob("*.safetensors"):
                f.read_bytes()
        rows, single = [], {}
        for w in a.worlds:
            runs: dict[bool, list] = {False: [], True: []}
            for rep in range(a.repeats):  # interleaved, so that machine noise hits both alike
                for whole in (False, True):
                    runs[whole].append(_run_world(paths, w, whole, root / f"w{w}_{rep}_{'whole' if whole else 'slices'}"))
            for whole in (False, True):
                b = [r["bytes"] for r in runs[whole][0]]
                assert all([r["bytes"] for r in res] == b for res in runs[whole])  # bytes are deterministic
                s = statistics.median(max(r["seconds"] for r in res) for res in runs[whole])
                mode = "whole tensors (before)" if whole else "slices"
                single.setdefault(mode, max(b) if w == 1 else None)
                rows.append((w, mode, max(b), sum(b) / w, s))
        print(f"\n{'W':>2}  {'reads':<22} {'max MB/rank':>11} {'mean MB/rank':>12} {'vs 1/W':>7} "
              f"{'s/rank':>10}")
        for w, mode, bmax, bmean, smax in rows:
            base = single.get(mode)
            ratio = f"{bmax / (base / w):7.2f}" if base else "      -"
            print(f"{w:>2}  {mode:<22} {bmax / 1e6:11.2f} {bmean / 1e6:12.2f} {ratio} {smax:10.2f}")
        by = {(w, m): (bm, sm) for w, m, bm, _, sm in rows}
        for w in a.worlds:
            sl, wh = by[(w, "slices")], by[(w, "whole tensors (before)")]
            print(f"W={w}: whole-tensor reads / slice reads = {wh[0] / sl[0]:.2f}x bytes, "
                  f"{wh[1] / max(sl[1], 1e-9):.2f}x seconds per rank")
        ok = all(by[(w, "slices")][0] <= 1.1 * single["slices"] / w for w in a.worlds) if single.get("slices") else None
        print(f"goal (bytes per rank within 1.1x of 1/W of W=1): {'met' if ok else 'NOT met' if ok is False else '-'}")


if __name__ == "__main__":
    main()
