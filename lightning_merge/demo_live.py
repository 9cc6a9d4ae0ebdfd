"""The demo's run in flight: the tiny trajectory, trained by a background process that saves in place.

``+experiment=tiny_watch`` (and the watch tests) need what a team has: a
training job writing checkpoints while ``mode=watch`` follows its folder. This
is the embedded demo's own training loop (``demo.train``) in a subprocess, with
one difference: each checkpoint is written where it will stay, tokenizer and
``config.json`` first and the weights last, in two halves with a pause between
(``slow_save_s``), so a look at the folder mid-save sees a half-written
``model.safetensors`` exactly as it would on a slow shared filesystem. The
corpus and tokenizer are built once, in the foreground, and cached.

Training is seeded and single-threaded, so a re-run writes the same bytes; a
checkpoint already whole on disk is not written again (a reader may be reading it).

Run directly: ``python -m lightning_merge.demo_live --data DATA --out DIR [--slow-save-s S]
[--conf JSON]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DemoConf
from .io import atomic_write_json, publishing_dir

__all__ = ["LiveData", "prepare", "start", "save_in_place", "main"]

log = logging.getLogger(__name__)
_MARKER = "data.json"


@dataclass
class LiveData:
    """The live demo's inputs, all under ``root``: the tokenizer, the packed training tokens, held-out and OOD text."""

    root: Path

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.jsonl"

    @property
    def ood(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted((self.root / "ood").glob("*.jsonl"))}


def prepare(conf: DemoConf, cache_root: str | Path) -> LiveData:
    """The corpus, tokenizer and packed tokens for ``conf``, built on the first call (cached, published whole)."""
    import torch

    from .demo import cache_key, write_corpus

    root = Path(cache_root).expanduser() / "demo" / f"{cache_key(conf)}-live"
    if (root / _MARKER).is_file():
        return LiveData(root)
    t0 = time.perf_counter()
    with publishing_dir(root) as tmp:
        tokenizer, tokens, *_ = write_corpus(conf, tmp)
        tokenizer.save_pretrained(tmp / "tokenizer")
        torch.save(tokens, tmp / "tokens.pt")
        atomic_write_json(tmp / _MARKER, {"conf": dataclasses.asdict(conf), "tokens": int(tokens.numel())})
    log.info("demo: corpus and tokenizer for the live run in %.1fs (%s)", time.perf_counter() - t0, root)
    return LiveData(root)


def save_in_place(model, tokenizer, folder: Path, slow_save_s: float = 0.0) -> None:
    """Write one checkpoint where it stays: tokenizer and config first, the weights last (see the module docstring)."""
    from safetensors.torch import save

    from .completion import incomplete

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and incomplete(folder) is None:
        return  # written by an earlier run of this seeded job: the same bytes, and a reader may hold it
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    data = save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"})
    with open(folder / "model.safetensors", "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        if slow_save_s > 0:
            time.sleep(slow_save_s)
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())


def start(conf: DemoConf, data: LiveData, out: Path, slow_save_s: float = 0.0,
          log_file: Path | None = None) -> subprocess.Popen:
    """Start the training job in the background; its checkpoints go to ``out/step<N>``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = Path(log_file or out.parent / "train.log")
    cmd = [sys.executable, "-m", "lightning_merge.demo_live", "--data", str(data.root), "--out", str(out),
           "--slow-save-s", str(slow_save_s), "--conf", json.dumps(dataclasses.asdict(conf))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_file, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.info("demo: training in the background (pid %d), checkpoints in %s, log %s", proc.pid, out, log_file)
    return proc


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import PreTrainedTokenizerFast

    from .demo import train

    ap = argparse.ArgumentParser(prog="python -m lightning_merge.demo_live", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the folder prepare() built")
    ap.add_argument("--out", required=True, help="where the checkpoints go (step<N>/)")
    ap.add_argument("--slow-save-s", type=float, default=0.0, help="pause mid-way through each weights file")
    ap.add_argument("--conf", default="{}", help="DemoConf fields as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    conf = DemoConf(**json.loads(args.conf))
    data = LiveData(Path(args.data))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(data.root / "tokenizer"))
    tokens = torch.load(data.root / "tokens.pt")
    t0 = time.perf_counter()
    saved = train(conf, tokenizer, tokens, Path(args.out), progress=False,
                  save=lambda m, t, f: save_in_place(m, t, f, args.slow_save_s))
    log.info("demo_live: trained %d steps, %d checkpoints in %.1fs", conf.steps, len(saved), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
