"""lm-eval requests/s: lightning_merge's ResidentLM against lm-eval's own HFLM, same model, task and batch size.

One process, CPU. Three ways to score the same lm-eval task on the same saved random-init Llama:

- ``HFLM``: lm-eval's ``HFLM(pretrained=folder, batch_size=B)``, the baseline;
- ``ResidentLM, local``: our adapter with a ``LocalRunner`` (the model called in this process);
- ``ResidentLM, Evaluator``: our adapter as the tool runs it, every batch inside the Evaluator's
  ``Trainer.validate`` (strategy ``single``).

All three go through the same harness call (``lm_eval.evaluator.evaluate`` via ``lmeval.tasks.run_tasks``;
``simple_evaluate`` adds seconds of environment collection that are no model's cost), so only the model
differs. They alternate (A B C, A B C, ...) and each row's median over ``--repeats`` is reported as requests/s
(lm-eval's requests: one per choice of each item for ``cloze_local``, one per rolling window for
``text_local``) with the ratio to HFLM in the same run. Every figure must be equal to HFLM's (checked).
With ``--ranks 2`` the Evaluator's figure under DDP (2 gloo processes, through the CLI's ``mode=evaluate``
and its "lm-eval report" stage time, against the same CLI at 1 process) is added.

    python benchmarks/lmeval_throughput.py                       # ~20M params, 400 cloze items
    python benchmarks/lmeval_throughput.py --items 100 --hidden 256 --layers 4 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def prose() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if len(topics[k].split()) > 40]


def build(root: Path, args) -> tuple[Path, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_merge.demo import train_tokenizer
    from lightning_merge.lmeval.tasks import build_cloze_items

    texts = prose()
    tok = train_tokenizer(texts, 2048)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                      max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    folder = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    cloze = build_cloze_items(texts, root / "cloze.jsonl", n_items=args.items, seed=0)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[: args.docs]))
    return folder, {"cloze_local": str(cloze), "text_local": str(text)}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--docs", type=int, default=8, help="text_local documents (rolling windows)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=0, help="also measure the CLI at 1 and this many DDP ranks")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_merge.config import StrategyConf
    from lightning_merge.evaluate import Evaluator
    from lightning_merge.lmeval.model import LocalRunner, ResidentLM
    from lightning_merge.lmeval.tasks import load_tasks, run_tasks

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="lmeval_bench_"))
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
    folder, data = build(root, args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(folder)
    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=args.batch_size, dtype="float32")
    local = ResidentLM(model.config, tok, LocalRunner(model), batch_size=args.batch_size)
    ev = Evaluator(model, StrategyConf(), batch_size=args.batch_size)
    tool = ResidentLM(model.config, AutoTokenizer.from_pretrained(folder), ev, batch_size=args.batch_size)
    print(f"model: Llama {params / 1e6:.1f}M params, fp32, CPU, {torch.get_num_threads()} thread(s); "
          f"batch size {args.batch_size}; {args.items} cloze items, {args.docs} text documents")

    for task, metric in (("cloze_local", "acc_norm,none"), ("text_local", "word_perplexity,none")):
        tasks = load_tasks([task], data={task: data[task]})
        times = {"HFLM": [], "ResidentLM, local": [], "ResidentLM, Evaluator": []}
        values = {}
        n_req = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = run_tasks(hf, tasks)
            times["HFLM"].append(time.perf_counter() - t0)
            values["HFLM"] = ref[task][metric]
            for name, lm in (("ResidentLM, local", local), ("ResidentLM, Evaluator", tool)):
                before = lm.stats["requests"]
                t0 = time.perf_counter()
                res = run_tasks(lm, tasks)
                times[name].append(time.perf_counter() - t0)
                values[name] = res[task][metric]
                n_req = lm.stats["requests"] - before
        base = statistics.median(times["HFLM"])
        print(f"\n{task} ({metric}), {n_req} lm-eval requests, median of {args.repeats}:")
        print(f"  {'':24s} {'seconds':>8s} {'requests/s':>11s} {'vs HFLM':>8s}  {metric}")
        for name, ts in times.items():
            s = statistics.median(ts)
            print(f"  {name:24s} {s:8.2f} {n_req / s:11.1f} {base / s:8.2f}  {values[name]}")
        assert len(set(values.values())) == 1, f"the figures differ: {values}"

    if args.ranks > 1:
        secs = {}
        for world in (1, args.ranks):
            out = root / f"cli_{world}"
            cmd = [sys.executable, "-m", "lightning_merge", "mode=evaluate", "demo.enabled=false",
                   f"checkpoints.sources=[{folder}]", "merge.weights=[1.0]",
                   f"data.heldout.path={data['text_local']}", "data.heldout.block_size=64",
                   "data.heldout.num_blocks=4", "data.search_blocks=2", "report.lmeval.tasks=[cloze_local]",
                   f"lmeval.data.cloze_local={data['cloze_local']}", f"lmeval.batch_size={args.batch_size}",
                   f"threads={args.threads}", f"output_dir={out}", "report.progress=false",
                   *(["strategy=ddp", f"strategy.devices={world}"] if world > 1 else [])]
            subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
            res = json.loads((out / "results.json").read_text())
            secs[world] = res["seconds"]["lm-eval report"]
            print(f"\nCLI mode=evaluate, cloze_local at {world} rank(s): lm-eval report stage {secs[world]:.2f}s, "
                  f"acc_norm {res['lmeval']['rows'][0]['metrics']['cloze_local']['acc_norm,none']}")
        print(f"speed-up at {args.ranks} ranks: {secs[1] / secs[args.ranks]:.2f}x (the machine's cores: "
              f"{os.cpu_count()})")


if __name__ == "__main__":
    main()
