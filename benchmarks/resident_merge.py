"""Resident re-merge bandwidth: ``merge_into`` against a same-size copy, in one run.

What it measures. Each search trial re-merges K resident source checkpoints into
the model's parameters with ``lightning_merge.merge.MergePlan.run`` (the plan is
built once, as ``sharding.ShardMerger`` builds it), with the eager chunked merge
and with the fused compiled kernel (``kernels.py``), side by side. That is a
memory-bound stream: read K sources, write one output. We time it on a
Llama-like list of tensors (a few big matrices per layer, many small norm
vectors, ~207M elements by default) and report its effective bandwidth
``(K+1) * bytes / time`` next to that of a plain copy of the same tensors,
``2 * bytes / time`` (``torch._foreach_copy_``), measured in the same run,
interleaved repeat by repeat so that machine noise hits both alike.

Goal: ratio >= 0.8, i.e. the merge moves bytes at least 80% as fast as the
cheapest possible pass over the same memory, with 1 and with 2 threads, for
fp32 and for bf16 (bf16 storage, fp32 accumulation).

    python benchmarks/resident_merge.py                      # the full run (~4 GB RAM)
    python benchmarks/resident_merge.py --layers 2 --vocab 4000 --repeats 3   # a quick look
    python benchmarks/resident_merge.py --wait-quiet 600     # on a shared machine
    python benchmarks/resident_merge.py --device cuda --threads 1            # on a GPU
    python benchmarks/resident_merge.py --kernels compiled                   # one kernel only
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
from lightning_merge import kernels  # noqa: E402
from lightning_merge.merge import MergePlan  # noqa: E402

from _machine import busy_cpu_seconds as _busy_cpu_seconds  # noqa: E402
from _machine import own_cpu_seconds as _own_cpu_seconds  # noqa: E402
from _machine import wait_quiet as _wait_quiet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_shapes(hidden: int, intermediate: int, kv_hidden: int, vocab: int,
                 layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama (GQA, untied embeddings) in state-dict order."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                (p + "self_attn.k_proj.weight", (kv_hidden, hidden)),
                (p + "self_attn.v_proj.weight", (kv_hidden, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def _median_pair(f_base, f_test, warmup: int, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """Median seconds of two callables, run alternately so that noise hits both."""
    for _ in range(warmup):
        f_base()
        f_test()
    sync()
    tb, tt = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        f_base()
        sync()
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        f_test()
        sync()
        tt.append(time.perf_counter() - t)
    return statistics.median(tb), statistics.median(tt)


def _check(params, sources, weights) -> float:
    """Max relative error of the merge against a float64 reference, on a few tensors."""
    err = 0.0
    for i in (0, 1, len(params) - 2):  # embedding, a projection, the final norm
        ref = sum(w * s[i].double() for w, s in zip(weights, sources))
        d = (params[i].double() - ref).abs().max().item()
        err = max(err, d / max(ref.abs().max().item(), 1e-30))
    return err


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--kv-hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=12, help="12 gives ~207M parameters")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of sources")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--goal", type=float, default=0.8)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each row, wait up to S seconds for other processes to go idle")
    ap.add_argument("--device", default="cpu", help="e.g. cuda (threads then only set the host side)")
    ap.add_argument("--kernels", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                    help="merge.kernel modes to measure (compiled needs a C++ compiler on CPU, Triton on GPU)")
    args = ap.parse_args(argv)

    shapes = llama_shapes(args.hidden, args.intermediate, args.kv_hidden, args.vocab, args.layers)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    small = sum(1 for _, s in shapes if len(s) == 1)
    print(f"{len(shapes)} tensors ({small} norm vectors), {numel / 1e6:.1f}M parameters; "
          f"torch {torch.__version__}, median of {args.repeats} (after {args.warmup} warm-up)")
    weight_sets = {k: [(j + 1) / (k * (k + 1) / 2) for j in range(k)] for k in args.ks}  # sum to 1

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device != "cpu":
        print(f"device {args.device}: {torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}")
    rows = []
    why = kernels.unavailable(args.device.split(":")[0])
    if "compiled" in args.kernels and why:
        print(f"compiled kernel not measured: {why}")
        args.kernels = [k for k in args.kernels if k != "compiled"]
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(0)
        sources = [[torch.randn(s, generator=g).to(args.device, dtype) for _, s in shapes]
                   for _ in range(max(args.ks))]
        params = [torch.empty(s, dtype=dtype, device=args.device) for _, s in shapes]
        nbytes = numel * params[0].element_size()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for k in args.ks:
                srcs, w = sources[:k], weight_sets[k]
                results = {}
                for kern in args.kernels:
                    plan = MergePlan(params, srcs, kernel=kern, pack_small=True, bound=True)
                    plan.run(w)  # compiles once (cached on disk by Inductor), outside the timing
                    _wait_quiet(args.wait_quiet)
                    busy0, own0, wall0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
                    t_copy, t_merge = _median_pair(lambda: torch._foreach_copy_(params, srcs[0]),
                                                   lambda: plan.run(w), args.warmup, args.repeats, sync)
                    other = (_busy_cpu_seconds() - busy0 - (_own_cpu_seconds() - own0)) / (
                        time.perf_counter() - wall0)
                    err = _check(params, srcs, w)
                    results[kern] = [p.clone() for p in params[:2]] if len(args.kernels) > 1 else None
                    bw_copy, bw_merge = 2 * nbytes / t_copy, (k + 1) * nbytes / t_merge
                    rows.append((dname, threads, k, kern, t_copy * 1e3, bw_copy / 1e9, t_merge * 1e3,
                                 bw_merge / 1e9, bw_merge / bw_copy, err, max(other, 0.0)))
                if len(results) > 1:  # the kernels must agree bit for bit
                    a, b = results.values()
                    same = all(torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y)
                               for x, y in zip(a, b))
                    print(f"{dname} threads={threads} K={k}: eager and compiled bitwise equal: {same}")
        del sources, params
        gc.collect()

    head = ("dtype", "threads", "K", "kernel", "copy ms", "copy GB/s", "merge ms", "merge GB/s", "ratio",
            f">= {args.goal}", "rel err", "other procs")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d, th, k, kern, tc, bc, tm, bm, r, e, o in rows:
        print(f"| {d} | {th} | {k} | {kern} | {tc:.1f} | {bc:.1f} | {tm:.1f} | {bm:.1f} | {r:.2f} | "
              f"{'yes' if r >= args.goal else 'NO'} | {e:.1e} | {o:.2f} CPU |")
    print("\nratio = merge GB/s / copy GB/s; merge GB/s = (K+1)*bytes/time, copy GB/s = 2*bytes/time "
          "(torch._foreach_copy_ of the same tensors, timed alternately with the merge).\n"
          "rel err: max |merge - float64 reference| / max |reference| on 3 tensors. other procs: "
          "CPUs kept busy by other processes meanwhile; with 2 threads on a 2-core machine any "
          "such load stalls every parallel op, so rerun rows where it is not ~0.")


if __name__ == "__main__":
    main()
