"""Streaming merged-model write: ``write_merged`` against ``mergekit-yaml``, time and peak memory.

What it measures. Four bf16 checkpoints of a random-init ~0.5B Llama (sharded
at 200 MB, with a byte-level BPE tokenizer) are built once under ``--workdir``.
Then, in the same run and from a warm page cache, the same linear merge
(weights 0.1/0.2/0.3/0.4, not normalised) is written by

* ours: ``write_merged(CheckpointSeries.from_sources(paths), weights, out)`` in a
  fresh Python subprocess, once per ``--max-shard-bytes`` value;
* mergekit: ``mergekit-yaml config.yml out --lazy-unpickle --no-cuda`` (linear,
  ``normalize: false``, fp32 accumulation, bf16 output), once per
  ``--out-shard-size`` value,

each under ``/usr/bin/time -v`` (wall time, maximum resident set size), while
this script samples ``/proc/PID/status`` for the split of resident memory into
anonymous (heap) and file-backed (mmapped checkpoint pages) parts. It then
checks that both outputs hold the same tensors, equal to within bf16 rounding.

Goal (issue 15): at most half mergekit's wall time and half its peak RSS, at every shard cap. The
outputs must be bitwise equal (both accumulate in fp32 and round once to bf16).

    python benchmarks/write_vs_mergekit.py                    # ~0.5B x 4, 4 GB on disk
    python benchmarks/write_vs_mergekit.py --layers 2 --vocab 4000   # a quick look
    python benchmarks/write_vs_mergekit.py --skip-mergekit --slice-bytes 16MiB   # our slice size, swept

mergekit is a benchmark-only dependency: install it in its own venv so that it
cannot change this environment (see ``--help`` for the default path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from _machine import busy_cpu_seconds as _busy_cpu_seconds
from _machine import wait_quiet

REPO = Path(__file__).resolve().parents[1]  # children import lightning_merge from this checkout
MKVENV = "/tmp/mkvenv"
INSTALL_HINT = (f"python -m venv {MKVENV} && {MKVENV}/bin/pip install torch==2.13.0 "
                f"&& {MKVENV}/bin/pip install mergekit")
TIME = "/usr/bin/time"


# ---------------------------------------------------------------- the checkpoints

def _tokenizer(vocab_size: int):
    """A byte-level BPE trained offline on a few stdlib sources (the demo's trainer)."""
    import inspect
    import json as json_mod
    import textwrap

    from lightning_merge.demo import train_tokenizer

    return train_tokenizer([inspect.getsource(m) for m in (json_mod, textwrap, argparse, re)], vocab_size)


def build_checkpoints(workdir: Path, n: int, spec: dict) -> list[Path]:
    """Build (or reuse) ``n`` random-init bf16 Llama checkpoints described by ``spec``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = [workdir / f"ckpt{i}" for i in range(n)]
    stamp = workdir / "checkpoints.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {**spec, "n": n} and all(
            (p / "model.safetensors.index.json").exists() for p in paths):
        print(f"reusing the checkpoints in {workdir}")
        return paths
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tok = _tokenizer(spec["tokenizer_vocab"])
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                      intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    for i, p in enumerate(paths):
        t = time.perf_counter()
        torch.manual_seed(i)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(p, max_shard_size=spec["shard"])
        tok.save_pretrained(p)
        nparams = sum(x.numel() for x in model.parameters())
        del model
        print(f"built {p} ({nparams / 1e6:.0f}M parameters) in {time.perf_counter() - t:.0f} s")
    stamp.write_text(json.dumps({**spec, "n": n}))
    return paths


# ---------------------------------------------------------------- measuring a subprocess

def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def run_timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; return wall s, max RSS and sampled RSS split (MiB)."""
    busy0 = _busy_cpu_seconds()
    proc = subprocess.Popen([TIME, "-v", *cmd], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            tree, todo = [], _children(proc.pid)
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += _children(pid)
            tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for pid in tree:
                for k, v in _status_kb(pid).items():
                    if k in tot:
                        tot[k] += v
            for k in peaks:
                peaks[k] = max(peaks[k], tot[k])
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    busy = _busy_cpu_seconds() - busy0
    done.set()
    th.join()
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log}:\n{text[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    maxrss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
    sys_t = float(re.search(r"System time \(seconds\): ([\d.]+)", text).group(1))
    return {"wall": secs, "maxrss": maxrss / 1024, "cpu": user + sys_t,
            "anon": peaks["RssAnon"] / 1024, "file": peaks["RssFile"] / 1024,
            "other": max(busy - user - sys_t, 0.0) / max(secs, 1e-9)}


def run_repeated(cmd: list[str], log: Path, repeats: int, before=lambda: None) -> dict:
    """``run_timed`` ``repeats`` times; the run with the median wall time is reported."""
    runs = []
    for _ in range(repeats):
        before()
        runs.append(run_timed(cmd, log))
    runs.sort(key=lambda m: m["wall"])
    return {**runs[len(runs) // 2], "walls": [m["wall"] for m in runs]}


def _child_ours(spec: str) -> None:
    """Subprocess body: one ``write_merged`` call and nothing else."""
    a = json.loads(spec)
    sys.path.insert(0, str(REPO))
    from lightning_merge.series import CheckpointSeries
    from lightning_merge.writer import write_merged

    kw = {"slice_bytes": a["slice_bytes"]} if a.get("slice_bytes") else {}
    write_merged(CheckpointSeries.from_sources(a["paths"]), a["weights"], a["out"],
                 max_shard_bytes=a["max_shard_bytes"], **kw)


# ---------------------------------------------------------------- comparing outputs

def _load_index(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open
    f = d / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        return {k: f for k in h.keys()}


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor by tensor: same names, shapes, dtypes; max difference in units of the bf16 ulp."""
    import torch
    from safetensors import safe_open

    ia, ib = _load_index(a), _load_index(b)
    if set(ia) != set(ib):
        return {"same_names": False, "only_a": sorted(set(ia) - set(ib))[:5],
                "only_b": sorted(set(ib) - set(ia))[:5]}
    handles: dict[Path, object] = {}

    def get(f: Path, name: str):
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    max_ulp, differ, total, max_abs, bad = 0, 0, 0, 0.0, []
    for name in sorted(ia):
        x, y = get(ia[name], name), get(ib[name], name)
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(name)
            continue
        total += x.numel()
        if x.dtype in (torch.bfloat16, torch.float16):
            # sign-magnitude bits -> a monotone integer line, so |difference| counts ulps
            def line(t):
                i = t.view(torch.int16).to(torch.int32)
                return torch.where(i < 0, -(i & 0x7FFF), i)
            d = (line(x) - line(y)).abs()
            max_ulp = max(max_ulp, int(d.max()))
            differ += int((d != 0).sum())
        else:
            differ += int((x != y).sum())
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"same_names": True, "tensors": len(ia), "elements": total, "differ": differ,
            "max_ulp": max_ulp, "max_abs": max_abs, "mismatched_shape_or_dtype": bad}


# ---------------------------------------------------------------- main

def _mergekit_config(paths: list[Path], weights: list[float]) -> str:
    lines = ["merge_method: linear", "models:"]
    for p, w in zip(paths, weights):
        lines += [f"  - model: {p}", "    parameters:", f"      weight: {w}"]
    lines += ["parameters:", "  normalize: false", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def _find_mergekit(arg: str | None) -> str | None:
    for c in ([arg] if arg else [shutil.which("mergekit-yaml"), f"{MKVENV}/bin/mergekit-yaml"]):
        if c and Path(c).exists():
            return c
    return None


def _size_arg(s: str) -> int:
    """Bytes from '200MB', '5GB', '5GiB' or mergekit's '200M' / '5B' (B = billion)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(K|KB|M|MB|G|GB|B|GIB|MIB)?", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: give bytes, e.g. 200MB or 5GB")
    mult = {None: 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "B": 1e9,
            "MIB": 2**20, "GIB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child-ours":
        _child_ours(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lm_bench"),
                    help="where the checkpoints are cached and outputs written")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=26, help="26 gives ~0.50B parameters")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--max-shard-bytes", type=_size_arg, nargs="+", default=[5 * 1024**3, 200 * 10**6],
                    help="our output shard caps to run (default: our 5 GiB default, and 200MB)")
    ap.add_argument("--out-shard-size", nargs="+", default=["5B", "200M"],
                    help="mergekit's --out-shard-size values to run, paired with --max-shard-bytes")
    ap.add_argument("--slice-bytes", type=_size_arg, default=None,
                    help="our writer's slice size per source (default: lightning_merge.writer.SLICE_BYTES)")
    ap.add_argument("--mergekit-yaml", default=None,
                    help=f"path to mergekit-yaml (default: on PATH, else {MKVENV}/bin/mergekit-yaml)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each run, wait up to S seconds for other processes to go idle "
                         "(for shared machines)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)

    if not Path(TIME).exists():
        sys.exit(f"{TIME} is missing: apt-get update && apt-get install -y time")
    spec = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
            "heads": args.heads, "vocab": args.vocab, "tokenizer_vocab": 2000, "shard": "200MB"}
    paths = build_checkpoints(args.workdir, len(args.weights), spec)
    mk = None if args.skip_mergekit else _find_mergekit(args.mergekit_yaml)
    if mk is None and not args.skip_mergekit:
        print(f"mergekit-yaml not found; running ours only. To install it apart from this "
              f"environment:\n  {INSTALL_HINT}")
    in_bytes = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
    for p in paths:  # warm the page cache so both tools read from memory, not disk
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    cfg = args.workdir / "mergekit.yml"
    cfg.write_text(_mergekit_config(paths, args.weights))
    print(f"{len(paths)} sources, {in_bytes / 1e9:.2f} GB of bf16 safetensors; weights {args.weights}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")

    results = []  # (tool, cap label, measurement, out dir, index of the mergekit row it is paired with)
    caps = list(zip(args.max_shard_bytes, args.out_shard_size + [None] * len(args.max_shard_bytes)))
    for cap, mk_cap in caps:
        out = args.workdir / f"out_ours_{cap}"
        child = json.dumps({"paths": [str(p) for p in paths], "weights": args.weights,
                            "out": str(out), "max_shard_bytes": cap, "slice_bytes": args.slice_bytes})
        m = run_repeated([sys.executable, str(Path(__file__).resolve()), "--child-ours", child],
                         args.workdir / f"time_ours_{cap}.log", args.repeats,
                         lambda: (shutil.rmtree(out, ignore_errors=True), wait_quiet(args.wait_quiet)))
        print(f"  ours      cap {cap / 1e6:>6.0f} MB: {m['wall']:6.1f} s, max RSS {m['maxrss']:6.0f} MiB")
        pair = len(results) + 1 if mk and mk_cap else None
        results.append(("lightning_merge", f"{cap / 1e6:.0f} MB", m, out, pair))
        if pair is not None:
            mk_out = args.workdir / f"out_mergekit_{mk_cap}"
            m = run_repeated([mk, str(cfg), str(mk_out), "--lazy-unpickle", "--no-cuda", "--quiet",
                              "--out-shard-size", mk_cap], args.workdir / f"time_mergekit_{mk_cap}.log",
                             args.repeats,
                             lambda: (shutil.rmtree(mk_out, ignore_errors=True), wait_quiet(args.wait_quiet)))
            out = mk_out
            print(f"  mergekit  cap {mk_cap:>9}: {m['wall']:6.1f} s, max RSS {m['maxrss']:6.0f} MiB")
            results.append(("mergekit", f"{_size_arg(mk_cap) / 1e6:.0f} MB ({mk_cap})", m, out, None))

    head = ("writer", "shard cap", "wall s (all runs)", "CPU s", "max RSS MiB", "anon MiB", "file MiB",
            "wall / mergekit", "RSS / mergekit", "other procs")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for tool, cap, m, _, pair in results:
        ref = results[pair][2] if pair is not None else None
        rw = f"{m['wall'] / ref['wall']:.2f}" if ref else "-"
        rr = f"{m['maxrss'] / ref['maxrss']:.2f}" if ref else "-"
        walls = "/".join(f"{x:.1f}" for x in m["walls"])
        print(f"| {tool} | {cap} | {m['wall']:.1f} ({walls}) | {m['cpu']:.1f} | {m['maxrss']:.0f} | "
              f"{m['anon']:.0f} | {m['file']:.0f} | {rw} | {rr} | {m['other']:.2f} CPU |")
    print("\nmedian run of each (by wall time); wall, CPU and max RSS from /usr/bin/time -v; anon/file: "
          "peak RssAnon/RssFile sampled every 20 ms from /proc (file = mmapped checkpoint pages "
          "counted in RSS); other procs: CPUs kept busy by other processes during that run "
          "(rerun rows where it is not ~0).")

    ours = [o for tool, _, _, o, _ in results if tool == "lightning_merge"]
    theirs = [o for tool, _, _, o, _ in results if tool == "mergekit"]
    if ours and theirs:
        c = compare_outputs(ours[0], theirs[0])
        if not c["same_names"]:
            print(f"\noutputs hold different tensors: only ours {c['only_a']}, only mergekit {c['only_b']}")
        else:
            print(f"\noutputs: {c['tensors']} tensors, {c['elements'] / 1e6:.0f}M elements; "
                  f"{c['differ']} differ ({c['differ'] / max(c['elements'], 1):.2e} of them), "
                  f"max {c['max_ulp']} bf16 ulp, max abs diff {c['max_abs']:.3g}; "
                  f"shape/dtype mismatches: {c['mismatched_shape_or_dtype'] or 'none'}")
    if not args.keep_outputs:
        for r in results:
            shutil.rmtree(r[3], ignore_errors=True)


if __name__ == "__main__":
    main()
