"""The streaming writer at scale: ``write_merged`` of a pair at 0.5B, 1.5B and 7B, against this disk's floor.

What it measures. For each size a pair of random-init bf16 Llama checkpoints (HF safetensors:
``config.json``, 2 GB shards, the index; tensor names and shapes from ``LlamaForCausalLM`` built on
the meta device, so nothing of model size is instantiated) is built once and cached in
``--workdir``. Then, in one run and each from a cold page cache (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before every measurement, so the disk is really read):

* floor: plain file I/O of the same bytes, one thread: both sources' shard files read in 64 MiB
  chunks (alternating between the two, as the merge does) and an output of one source's size
  written in 64 MiB chunks, fsync'd at the end; measured twice, with the output written through
  the page cache (plain) and with ``O_DIRECT`` (as ``write_merged`` writes it), and the target is
  checked against the faster of the two;
* ours: ``write_merged(CheckpointSeries.from_sources([a, b]), [0.4, 0.6], out)`` (default shard
  cap, 5 GiB) in a fresh subprocess under ``/usr/bin/time -v`` (wall, peak RSS);
* mergekit (optional; default on at every size when the disk allows): ``mergekit-yaml`` linear,
  same weights, ``normalize: false``, bf16 out, ``--out-shard-size 5B --lazy-unpickle --no-cuda``.

Every output is deleted after it is measured, so the disk holds the sources and at most one
output; free space is checked before each build and write (refused with a message when short).
Targets (issue 15) at 7B: peak RSS <= 1.5 GiB and wall <= 1.5x the floor; across sizes time grows
about linearly with the bytes and RSS stays flat.

    python benchmarks/write_scale.py --wait-quiet 900                   # 0.5B, 1.5B, 7B (~35 GB of sources)
    python benchmarks/write_scale.py --sizes 0.5b --no-mergekit         # a quick look

mergekit lives in its own venv (see ``write_vs_mergekit.py``). Run under the shared benchmark lock:
``flock /tmp/lm_bench.lock python benchmarks/write_scale.py ...``; dropping the page cache makes
other processes' next reads cold too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from _machine import busy_cpu_seconds, wait_quiet
from write_vs_mergekit import INSTALL_HINT, TIME, _find_mergekit, _mergekit_config, run_timed

HERE = Path(__file__).resolve().parent

# Llama shapes: 0.5B as write_vs_mergekit.py, 1.5B (TinyLlama-like widths), and Llama-2-7B exactly.
SIZES = {
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, vocab=4000),  # a smoke test, not in the default
    "0.5b": dict(hidden=1024, intermediate=4096, layers=26, heads=16, vocab=32000),
    "1.5b": dict(hidden=2048, intermediate=5504, layers=28, heads=16, vocab=32000),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000),
}
SHARD_BYTES = 2 * 10**9
CHUNK = 64 << 20
WEIGHTS = [0.4, 0.6]


def _config(spec: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                       num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                       num_key_value_heads=spec["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])  # what save_pretrained writes (mergekit needs it)


def _layout(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The exact HF Llama tensor names and shapes, from the model built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_config(spec))
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _need_space(path: Path, nbytes: int, what: str) -> None:
    free = _free(path)
    if free < nbytes * 1.03 + (1 << 30):
        sys.exit(f"refusing to write {what}: it needs {nbytes / 1e9:.1f} GB (+3% and 1 GB spare) on the disk of "
                 f"{path}, which has {free / 1e9:.1f} GB free. Free space, pass another --workdir, or leave "
                 f"out sizes (--sizes)")


def build_pair(workdir: Path, size: str) -> tuple[list[Path], int, int]:
    """Build (or reuse) two random-init bf16 checkpoints of ``size``; return paths, parameters, bytes each."""
    import torch
    from safetensors.torch import save_file

    spec = SIZES[size]
    layout = _layout(spec)
    params = sum(math.prod(s) for _, s in layout)
    nbytes = 2 * params
    root = workdir / size
    paths = [root / f"ckpt{i}" for i in range(2)]
    stamp = root / "built.json"
    want = {**spec, "shard_bytes": SHARD_BYTES, "params": params}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(
            (p / "model.safetensors.index.json").exists() for p in paths):
        print(f"reusing the {size} pair in {root}")
        return paths, params, nbytes
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _need_space(root, 2 * nbytes + nbytes, f"the {size} pair and one output")
    shards: list[list[tuple[str, tuple]]] = [[]]
    size_now = 0
    for n, s in layout:
        b = 2 * math.prod(s)
        if shards[-1] and size_now + b > SHARD_BYTES:
            shards.append([])
            size_now = 0
        shards[-1].append((n, s))
        size_now += b
    for i, p in enumerate(paths):
        t0 = time.perf_counter()
        p.mkdir()
        _config(spec).save_pretrained(p)
        g = torch.Generator().manual_seed(1000 * i + len(layout))
        weight_map = {}
        for si, shard in enumerate(shards):
            fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for n, s in shard:
                if n.endswith("norm.weight"):
                    t = 1.0 + 0.02 * torch.randn(s, generator=g)  # near the init of 1, but not equal across sources
                else:
                    t = 0.02 * torch.randn(s, generator=g)
                tensors[n] = t.to(torch.bfloat16)
                weight_map[n] = fname
            save_file(tensors, p / fname, metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"built {p} ({params / 1e9:.2f}B parameters, {len(shards)} shards) in "
              f"{time.perf_counter() - t0:.0f} s")
    stamp.write_text(json.dumps(want))
    return paths, params, nbytes


def drop_caches() -> str:
    """Write back dirty pages and drop the page cache (root only); returns 'cold' or why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "cold"
    except OSError as e:
        return f"warm (could not drop the page cache: {e.strerror})"


def _aligned_buffer(nbytes: int):
    import mmap

    return mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT needs


def floor_io(paths: list[Path], out: Path, nbytes: int, direct: bool = False) -> dict:
    """Plain one-thread file I/O of the merge's bytes: read both sources, write one source's size, fsync.

    ``direct`` writes the output with ``O_DIRECT`` (as ``write_merged`` does where it can) instead of through
    the page cache; the reads are plain in both."""
    buf = _aligned_buffer(CHUNK)
    view = memoryview(buf)
    files = [sorted(p.glob("*.safetensors")) for p in paths]
    fds = [[os.open(f, os.O_RDONLY) for f in fl] for fl in files]
    busy0, cpu0 = busy_cpu_seconds(), time.process_time()
    t0 = time.perf_counter()
    read = written = 0
    cur = [0] * len(paths)
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)

    def write_upto(limit: int) -> int:
        n = written
        while n < limit:
            k = min(CHUNK, limit - n)
            k += -k % 4096 if direct else 0  # O_DIRECT writes whole blocks; truncated below
            n += os.pwrite(fo, view[:k], n)
        return n

    while any(cur[k] < len(fds[k]) for k in range(len(paths))):
        for k in range(len(paths)):  # one chunk of each source in turn, as the merge reads them
            while cur[k] < len(fds[k]):
                got = os.readv(fds[k][cur[k]], [view])
                if got:
                    read += got
                    break
                cur[k] += 1
        target = min(read // len(paths), nbytes)
        if target - written >= CHUNK:
            written = write_upto(written + CHUNK * ((target - written) // CHUNK))
    written = write_upto(nbytes)
    if written != nbytes:
        os.ftruncate(fo, nbytes)
    os.fsync(fo)
    os.close(fo)
    wall = time.perf_counter() - t0
    assert out.stat().st_size == nbytes, (out, out.stat().st_size, nbytes)
    own = time.process_time() - cpu0
    for fl in fds:
        for fd in fl:
            os.close(fd)
    return {"wall": wall, "read": read, "written": nbytes,
            "other": max(busy_cpu_seconds() - busy0 - own, 0.0) / max(wall, 1e-9)}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lm_scale"),
                    help="where the pairs are cached (~35 GB for all sizes) and outputs written")
    ap.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b", "7b"], choices=list(SIZES))
    ap.add_argument("--no-mergekit", action="store_true", help="leave mergekit out at every size")
    ap.add_argument("--mergekit-sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                    help="sizes at which mergekit runs too (default: all; skipped where the disk is short)")
    ap.add_argument("--mergekit-yaml", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to go idle")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache (the default is cold runs)")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the pairs, measure nothing")
    args = ap.parse_args(argv)
    if args.build_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            build_pair(args.workdir, size)
        return

    if not Path(TIME).exists():
        sys.exit(f"{TIME} is missing: apt-get update && apt-get install -y time")
    mk = None if args.no_mergekit else _find_mergekit(args.mergekit_yaml)
    if mk is None and not args.no_mergekit:
        print(f"mergekit-yaml not found; running ours and the floor only. To install it:\n  {INSTALL_HINT}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM; "
          f"{_free(args.workdir) / 1e9:.0f} GB free on {args.workdir}; weights {WEIGHTS}; "
          f"load average {os.getloadavg()[0]:.2f}")

    def prepare(out: Path, nbytes: int, what: str) -> str:
        shutil.rmtree(out, ignore_errors=True)
        if out.is_file():
            out.unlink()
        _need_space(out.parent, nbytes, what)
        wait_quiet(args.wait_quiet)
        return "warm" if args.warm else drop_caches()

    rows = []
    for size in args.sizes:
        paths, params, nbytes = build_pair(args.workdir, size)
        row = {"size": size, "params": params, "bytes": nbytes}
        out = args.workdir / f"out_{size}"

        for key, direct in (("floor", False), ("floor_direct", True)):
            row["cache"] = prepare(out, nbytes, f"the {size} floor's output")
            out.mkdir()
            row[key] = floor_io(paths, out / "floor.bin", nbytes, direct)
            shutil.rmtree(out)
            print(f"  {size} {key:12s} {row[key]['wall']:7.1f} s ({row['cache']})")

        row["cache_ours"] = prepare(out, nbytes, f"the {size} merged model")
        child = json.dumps({"paths": [str(p) for p in paths], "weights": WEIGHTS, "out": str(out),
                            "max_shard_bytes": 5 * 1024**3})
        row["ours"] = run_timed([sys.executable, str(HERE / "write_vs_mergekit.py"), "--child-ours", child],
                                args.workdir / f"time_ours_{size}.log")
        row["ours"]["out_bytes"] = _dir_bytes(out)
        shutil.rmtree(out)
        print(f"  {size} ours     {row['ours']['wall']:7.1f} s, max RSS {row['ours']['maxrss']:6.0f} MiB")

        if mk and size in args.mergekit_sizes:
            if _free(args.workdir) < nbytes * 1.03 + (1 << 30):
                print(f"  {size} mergekit skipped: the disk is short of {nbytes / 1e9:.1f} GB for its output")
            else:
                cfg = args.workdir / f"mergekit_{size}.yml"
                cfg.write_text(_mergekit_config(paths, WEIGHTS))
                row["cache_mk"] = prepare(out, nbytes, f"mergekit's {size} output")
                row["mergekit"] = run_timed([mk, str(cfg), str(out), "--lazy-unpickle", "--no-cuda", "--quiet",
                                             "--out-shard-size", "5B"], args.workdir / f"time_mergekit_{size}.log")
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {size} mergekit {row['mergekit']['wall']:7.1f} s, "
                      f"max RSS {row['mergekit']['maxrss']:6.0f} MiB")
        rows.append(row)

    head = ("size", "params", "GB each", "floor s (plain)", "floor s (O_DIRECT write)", "ours s", "ours / floor",
            "ours / O_DIRECT floor", "ours s/GB", "ours RSS MiB",
            "mergekit s", "mergekit RSS MiB", "wall / mergekit", "RSS / mergekit", "other procs (floor/direct/ours/mk)")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        f, fd, o, m = r["floor"], r["floor_direct"], r["ours"], r.get("mergekit")
        gb = r["bytes"] / 1e9
        mk_cols = (f"{m['wall']:.1f} | {m['maxrss']:.0f} | {o['wall'] / m['wall']:.2f} | "
                   f"{o['maxrss'] / m['maxrss']:.2f}") if m else "- | - | - | -"
        other = "/".join(f"{x['other']:.2f}" for x in (f, fd, o, m) if x)
        print(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {gb:.2f} | {f['wall']:.1f} | {fd['wall']:.1f} | "
              f"{o['wall']:.1f} | **{o['wall'] / f['wall']:.2f}** | {o['wall'] / fd['wall']:.2f} | {o['wall'] / gb:.2f} | "
              f"{o['maxrss']:.0f} | {mk_cols} | {other} CPU |")
    caches = sorted({r[k] for r in rows for k in ("cache", "cache_ours", "cache_mk") if k in r})
    print(f"\npage cache: {', '.join(caches)} before every measurement. floor: one thread, 64 MiB reads "
          f"alternating between the two sources + a same-size write in 64 MiB chunks (plain, or O_DIRECT), fsync'd. "
          f"ours/mergekit: /usr/bin/time -v in "
          f"a fresh process, one run each. GB each: one source (= the output). other procs: CPUs kept busy "
          f"by other processes during the measurement.")
    seven = next((r for r in rows if r["size"] == "7b"), None)
    if seven:
        o = seven["ours"]
        print(f"7B targets: peak RSS {o['maxrss']:.0f} MiB <= 1536: {'met' if o['maxrss'] <= 1536 else 'MISSED'}; "
              f"wall {o['wall'] / seven['floor']['wall']:.2f}x the plain floor, "
              f"{o['wall'] / seven['floor_direct']['wall']:.2f}x the O_DIRECT one, <= 1.5: "
              f"{'met' if o['wall'] <= 1.5 * min(seven['floor']['wall'], seven['floor_direct']['wall']) else 'MISSED'}")


if __name__ == "__main__":
    main()
