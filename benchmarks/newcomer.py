"""A new user's first hour, as a script: every row of issue 10's table, run through the real CLI.

Each row builds small checkpoints of a kind users have (written by
``transformers``/``torch`` themselves, on disk), runs ``python -m
lightning_merge`` on them in a fresh folder, and checks the outcome: either
the run works and its loss is finite, or it is refused (exit 2) with a message
naming the option to change. The table says which, with the first line of the
message; the script exits 1 if any row does not behave as expected.

    python benchmarks/newcomer.py [--keep DIR] [--rows gpt2,tied_llama,...]

About 2-4 minutes on 2 cores (one CLI start per row).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\nclass C{i}:\n    value = {i}\n" for i in range(60)]


@dataclass
class Row:
    name: str
    what: str
    args: list[str]
    expect: str  # "works" | "refused:<text the message must hold>" | "warns:<text on stderr>"
    setup: object = None


def _tokenizer():
    sys.path.insert(0, str(ROOT))
    from lightning_merge.demo import train_tokenizer

    return train_tokenizer(TEXTS, 300)


def _save(model, tok, path: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return path


def _llama(tok, seed: int, tied: bool = False, dtype=torch.float32, positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=positions,
                      tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).to(dtype)


def _gpt2(tok, seed: int, positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


def build(root: Path) -> dict[str, Path]:
    """Every input the rows use, written once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = _tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}
    jsonl = root / "heldout.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    txt = root / "heldout.txt"
    txt.write_text("".join(TEXTS))
    p["jsonl"], p["txt"] = jsonl, txt
    one = root / "heldout_one.jsonl"  # the .txt file's text as one document
    one.write_text(json.dumps({"text": "".join(TEXTS)}) + "\n")
    p["one_doc"] = one
    for kind in ("llama", "gpt2", "tied_llama", "mixed"):
        for i, step in enumerate((100, 200, 300)):
            if kind == "gpt2":
                m = _gpt2(tok, i)
            else:
                m = _llama(tok, i, tied=kind == "tied_llama",
                           dtype=torch.bfloat16 if kind == "mixed" and i == 2 else torch.float32)
            _save(m, tok, root / kind / f"step{step}")
        p[kind] = root / kind
    # An HF Trainer output folder: checkpoint-N children plus the final model at the top level.
    trainer = root / "hf_trainer_run"
    for i, step in enumerate((500, 1000)):
        _save(_llama(tok, 10 + i), tok, trainer / f"checkpoint-{step}")
        (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"step": step, "learning_rate": 1e-3, "loss": 3.0}]}))
    _save(_llama(tok, 12), tok, trainer)
    p["hf_trainer"] = trainer
    # No tokenizer beside the checkpoints, and a tokenizer-only folder.
    for i, step in enumerate((100, 200)):
        _save(_llama(tok, i), tok, root / "no_tok" / f"step{step}", with_tokenizer=False)
    tok.save_pretrained(root / "tokenizer_only")
    p["no_tok"], p["tok"] = root / "no_tok", root / "tokenizer_only"
    # A training loop's own file: {"model": state_dict, "optimizer": ..., "epoch": ..., ...}.
    m = _llama(tok, 0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    nano = root / "training_state"
    nano.mkdir()
    for step in (1000, 2000):
        torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": step // 1000,
                    "best_val_loss": torch.tensor(3.2), "config": {"lr": 1e-3}},
                   nano / f"ckpt_{step}.pt")
    p["training_state"] = nano
    # A PyTorch DCP folder (torchtitan-style step folders).
    import torch.distributed.checkpoint as dcp

    for step in (100, 200):
        dcp.save({k: v.clone() for k, v in _llama(tok, step).state_dict().items()},
                 checkpoint_id=str(root / "dcp" / f"step-{step}"))
    p["dcp"] = root / "dcp"
    return p


def rows(p: dict[str, Path]) -> list[Row]:
    own = lambda src, *more: [f"checkpoints.sources=[{src}]", f"data.heldout.path={p['jsonl']}",
                              "data.heldout.block_size=64", *more]
    ev = ["mode=evaluate", "merge.weights=[0.5,0.5]"]
    return [
        Row("llama", "Llama folder of step folders, mode=evaluate", own(p["llama"], *ev), "works"),
        Row("gpt2", "GPT-2 (tied embeddings), mode=evaluate", own(p["gpt2"], *ev), "works"),
        Row("tied_llama", "Llama with tie_word_embeddings=true, search", own(p["tied_llama"], "search.trials=3"),
            "works"),
        Row("mixed", "fp32 and bf16 checkpoints in one series", own(p["mixed"], *ev), "works"),
        Row("hf_trainer", "HF Trainer run folder (final model + checkpoint-*)",
            own(p["hf_trainer"], "checkpoints.last=2", "mode=evaluate", "merge.weights=[0.5,0.5]"), "works"),
        Row("no_tokenizer", "checkpoints without a tokenizer", own(p["no_tok"], *ev),
            "refused:checkpoints.tokenizer_dir"),
        Row("tokenizer_dir", "... with checkpoints.tokenizer_dir", own(p["no_tok"], *ev,
            f"checkpoints.tokenizer_dir={p['tok']}"), "works"),
        Row("training_state", "a training loop's {model, optimizer, epoch} files",
            own(p["training_state"], f"checkpoints.config_dir={p['llama']}/step100", "mode=merge", "merge.weights=[0.5,0.5]"),
            "refused:'model'"),
        Row("dcp_no_config", "a folder of DCP step folders, no config", own(p["dcp"], *ev),
            "refused:checkpoints.config_dir"),
        Row("dcp", "... with checkpoints.config_dir", own(p["dcp"], *ev, f"checkpoints.config_dir={p['llama']}/step100"),
            "works"),
        Row("no_heldout", "own checkpoints, no data.heldout.path", [f"checkpoints.sources=[{p['llama']}]", *ev],
            "refused:data.heldout.path"),
        Row("weight_count", "3 weights, default checkpoints.last=2", own(p["llama"], "mode=merge",
            "merge.weights=[0.2,0.3,0.5]"), "refused:checkpoints.last=2 (the default)"),
        Row("weight_sum", "weights [0.7,0.7] (sum 1.4), mode=merge", own(p["llama"], "mode=merge",
            "merge.weights=[0.7,0.7]"), "warns:1.4"),
        Row("block_size", "block_size 256 on a GPT-2 with n_positions=128",
            [f"checkpoints.sources=[{p['gpt2']}]", f"data.heldout.path={p['jsonl']}", "data.heldout.block_size=256",
             *ev], "refused:data.heldout.block_size"),
        Row("txt", ".txt held-out file (read as one document)",
            [f"checkpoints.sources=[{p['llama']}]", f"data.heldout.path={p['txt']}", "data.heldout.block_size=64",
             *ev], "works"),
        Row("txt_vs_jsonl", "... the same text as a one-row .jsonl",
            [f"checkpoints.sources=[{p['llama']}]", f"data.heldout.path={p['one_doc']}",
             "data.heldout.block_size=64", *ev], "works"),
        Row("help", "python -m lightning_merge --help", ["--help"], "works:mode=merge"),
    ]


def run_row(row: Row, work: Path, cache: Path) -> dict:
    out = work / row.name
    args = list(row.args) + ([f"output_dir={out}"] if row.args != ["--help"] else [])
    env = dict(os.environ, LIGHTNING_MERGE_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    res = {"row": row.name, "what": row.what, "rc": proc.returncode, "seconds": time.perf_counter() - t0}
    err = [ln for ln in proc.stderr.splitlines() if "lightning_merge: error:" in ln]
    warn = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "WARNING" in ln or "warning" in ln.lower()]
    results = out / "results.json"
    loss = None
    if results.exists():
        loss = json.loads(results.read_text()).get("best", {}).get("heldout_loss")
    kind, _, needle = row.expect.partition(":")
    if kind == "works":
        ok = proc.returncode == 0 and (row.args == ["--help"] or loss is None or loss == loss)
        ok = ok and (not needle or needle in proc.stdout)
        msg = f"loss {loss:.4f}" if isinstance(loss, float) else ("ok" if ok else proc.stderr.strip()[-300:])
    elif kind == "refused":
        ok = proc.returncode == 2 and bool(err) and needle in err[0]
        msg = err[0].split("error: ", 1)[-1] if err else proc.stderr.strip()[-300:]
    else:  # warns
        hits = [ln for ln in warn if needle in ln]
        ok = proc.returncode == 0 and bool(hits)
        msg = hits[0].split("] ", 1)[-1] if hits else "no warning"
    res.update(ok=ok, message=re.sub(r"\s+", " ", msg)[:220], loss=loss)
    return res


def two_runs_row(p: dict[str, Path], work: Path, cache: Path) -> dict:
    """Two searches started at once on one output folder (different seeds), then a resume of it."""
    out = work / "two_runs"
    env = dict(os.environ, LIGHTNING_MERGE_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    base = [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{p['llama']}]",
            f"data.heldout.path={p['jsonl']}", "data.heldout.block_size=64", "search.trials=4",
            "baselines.enabled=false", f"output_dir={out}"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*base, f"search.seed={seed}"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for seed in (0, 1)]
    rcs = [pr.wait(timeout=600) for pr in procs]
    again = subprocess.run([*base, "search.seed=0"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    err = [ln for ln in again.stderr.splitlines() if "lightning_merge: error:" in ln]
    ok = again.returncode == 2 and bool(err) and "trial" in err[0]
    msg = err[0].split("error: ", 1)[-1] if err else f"first two rc={rcs}, resume rc={again.returncode}"
    return {"row": "two_runs", "what": "two searches at once on one output_dir, then a resume", "rc": again.returncode,
            "seconds": time.perf_counter() - t0, "ok": ok, "message": re.sub(r"\s+", " ", msg)[:220], "loss": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temp folder)")
    ap.add_argument("--rows", help="comma-separated row names (default: all)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="newcomer-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build(work / "inputs")
    print(f"inputs built in {time.perf_counter() - t0:.1f}s under {work}")
    todo = [r for r in rows(paths) if not args.rows or r.name in args.rows.split(",")]
    results = []
    for row in todo:
        r = run_row(row, work, work / "cache")
        results.append(r)
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['row']:<14} rc={r['rc']} {r['seconds']:5.1f}s  {r['message']}",
              flush=True)
    if not args.rows or "two_runs" in args.rows.split(","):
        r = two_runs_row(paths, work, work / "cache")
        results.append(r)
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['row']:<14} rc={r['rc']} {r['seconds']:5.1f}s  {r['message']}",
              flush=True)
    txt = {r["row"]: r["loss"] for r in results}
    if txt.get("txt") is not None and txt.get("txt_vs_jsonl") is not None:
        same = abs(txt["txt"] - txt["txt_vs_jsonl"]) < 1e-9
        print(f"{'ok ' if same else 'BAD'} .txt (one document) {txt['txt']:.6f} vs one-row .jsonl "
              f"{txt['txt_vs_jsonl']:.6f}")
        results.append({"ok": same})
    bad = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(bad)} of {len(results)} rows as expected; {time.perf_counter() - t0:.0f}s")
    (work / "newcomer.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
