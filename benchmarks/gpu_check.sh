#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100 (the three timeouts add up to 7.8 minutes): what the machine is, the GPU-only tests
# (tests/test_gpu.py: ZeRO-3 partition merging under Lightning's DeepSpeedStrategy, and one-GPU
# evaluation, against single-process references), the resident re-merge's bandwidth against
# torch._foreach_copy_ (eager and the compiled Triton kernel, fp32 and bf16, K = 2 and 4, with their
# bitwise agreement), and evaluation throughput of our Evaluator next to a plain
# torch.inference_mode transformers loop on the same blocks (~100M-param Llama, bf16).
#
# usage: bash benchmarks/gpu_check.sh          (PYTHON=... to pick the interpreter)
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set. Installs nothing unless an
# import fails; then `pip install -e .` with DS_BUILD_OPS=0 (DeepSpeed then builds no CUDA ops at
# install time; ZeRO-3 inference needs none). Exit status: that of the tests (0 = all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
section() { echo; echo "=== $* ($(date +%T)) ==="; }

main() {
T0=$SECONDS

section "nvidia-smi"
nvidia-smi || echo "nvidia-smi: not found"

section "dependencies"
if ! $PY -c "import lightning_merge, lightning, deepspeed, transformers, torchmetrics" 2>/dev/null; then
  echo "an import failed; installing the package (editable) with DS_BUILD_OPS=0"
  DS_BUILD_OPS=0 $PY -m pip install -q -e . || echo "pip install -e . FAILED (no network on this machine?)"
fi
$PY -c "import pytest" 2>/dev/null || $PY -m pip install -q pytest || echo "pip install pytest FAILED"

section "versions"
$PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")
for m in ("lightning", "deepspeed", "transformers", "torchmetrics", "lightning_merge"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # report, do not stop: the tests say what is missing
        print(m, "IMPORT FAILED:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
EOF

section "tests/test_gpu.py"
timeout 230 $PY -m pytest -q -rs -p no:cacheprovider -m 'slow or not slow' tests/test_gpu.py
TESTS_RC=$?
echo "tests exit status: $TESTS_RC"

section "resident re-merge (one GPU): MergePlan.run eager and compiled vs torch._foreach_copy_ (goal >= 0.8)"
timeout 150 $PY benchmarks/resident_merge.py --device cuda --threads 1 --repeats 7
echo "resident merge exit status: $?"

section "evaluation throughput (bf16, one GPU): Evaluator vs plain transformers loop (goal >= 0.95)"
timeout 90 $PY - <<'EOF'
import copy, logging, time, warnings
import torch
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from transformers import LlamaConfig, LlamaForCausalLM
from lightning_merge.config import StrategyConf
from lightning_merge.evaluate import Evaluator

N, T, B, VOCAB = 512, 1024, 16, 32000
cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=T,
                  tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, bf16; "
      f"{N} blocks x {T} tokens, batch {B}")
blocks = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(0))
tokens = N * (T - 1)

plain = copy.deepcopy(model).cuda()
gpu_blocks = blocks.cuda()

def plain_loop(bl):
    nll = 0.0
    with torch.inference_mode():
        for b in bl.split(B):
            nll += plain(input_ids=b, labels=b).loss.double() * b[:, 1:].numel()
    torch.cuda.synchronize()
    return float(nll) / (bl.shape[0] * (T - 1))

plain_loop(gpu_blocks[: 2 * B])  # warm-up (kernels, allocator)
times, plain_loss = [], None
for _ in range(2):
    t0 = time.perf_counter()
    plain_loss = plain_loop(gpu_blocks)
    times.append(time.perf_counter() - t0)
t_plain = min(times)
del plain
torch.cuda.empty_cache()

ev = Evaluator(model, StrategyConf(name="single", accelerator="gpu", precision="bf16-true"), batch_size=B)
ev.evaluate(blocks[: 2 * B])  # warm-up (strategy setup)
times, ev_loss = [], None
for _ in range(2):
    res = ev.evaluate(blocks)  # includes Lightning's per-validate model moves (to GPU, back to CPU)
    times.append(res.seconds)
    ev_loss = res.loss
t_ev = min(times)
print(f"plain transformers loop: {tokens / t_plain:,.0f} tokens/s ({t_plain:.2f}s), loss {plain_loss:.6f}")
print(f"lightning_merge Evaluator: {tokens / t_ev:,.0f} tokens/s ({t_ev:.2f}s), loss {ev_loss:.6f}")
print(f"throughput ratio Evaluator / plain: {t_plain / t_ev:.3f}")
print(f"loss relative difference: {abs(ev_loss - plain_loss) / plain_loss:.2e}")
EOF
echo "throughput exit status: $?"

section "done in $((SECONDS - T0))s; tests exit status $TESTS_RC"
return $TESTS_RC
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee -a "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
main
