"""Evaluation throughput of lightning_merge's Lightning path against a plain transformers loop.

Both score the same blocks with the same random-init Llama (~100M parameters,
fp32, CPU by default) and the same batch size; the plain loop is
``model(input_ids).logits`` + cross-entropy under ``torch.inference_mode``.
Goal: ours / plain >= 0.95 tokens/s. Both losses are printed, and must agree.

    python benchmarks/eval_throughput.py                 # ~100M params, 32 blocks of 256
    python benchmarks/eval_throughput.py --hidden 256 --layers 4 --blocks 16   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def plain_loop(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, float]:
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i:i + batch_size].to(model.device)
            logits = model(input_ids=b).logits[:, :-1].float()
            nll += F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").double().item()
            n += b[:, 1:].numel()
    return nll / n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--precision", default="32-true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_merge.config import StrategyConf
    from lightning_merge.evaluate import Evaluator

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                      max_position_embeddings=args.block_size)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    blocks = torch.randint(0, args.vocab, (args.blocks, args.block_size), generator=torch.Generator().manual_seed(1))
    tokens = args.blocks * (args.block_size - 1)

    ev = Evaluator(model, StrategyConf(accelerator=args.accelerator, precision=args.precision),
                   batch_size=args.batch_size)
    ev.evaluate(blocks[: args.batch_size])  # warm-up: Trainer setup, device move
    if args.accelerator != "cpu":
        model.to(ev.module.device)
        torch.cuda.synchronize()
    plain_loop(model, blocks[: args.batch_size], args.batch_size)
    ours, plain = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        r = ev.evaluate(blocks)
        ours.append(r.seconds)
        loss_p, dt = plain_loop(model, blocks, args.batch_size)
        plain.append(dt)
    t_ours, t_plain = statistics.median(ours), statistics.median(plain)
    print(f"model: Llama {params / 1e6:.1f}M params, {args.precision}, {args.accelerator}, "
          f"{torch.get_num_threads()} threads; {args.blocks} blocks x {args.block_size}, batch {args.batch_size}")
    print(f"{'path':<28}{'seconds':>10}{'tokens/s':>12}{'loss':>12}")
    print(f"{'plain transformers loop':<28}{t_plain:>10.3f}{tokens / t_plain:>12.0f}{loss_p:>12.6f}")
    print(f"{'lightning_merge Evaluator':<28}{t_ours:>10.3f}{tokens / t_ours:>12.0f}{r.loss:>12.6f}")
    print(f"ratio (ours / plain, tokens/s): {t_plain / t_ours:.3f}   goal >= 0.95")


if __name__ == "__main__":
    main()
