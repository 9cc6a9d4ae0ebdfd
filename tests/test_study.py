"""``python benchmarks/study.py --quick``: the study's code end to end, and its numbers against a plain reference.

The quick study trains the demo and two small annealing controls in a fresh cache, runs every experiment on
tiny grids, and writes the document and its plots. The test then recomputes two of the document's numbers
without the tool (a plain ``transformers`` forward over the same blocks, a hand-made average of two
checkpoints' state dicts) and checks the document shows what the results hold.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"1_pilot_tiny", "2_curve_tiny", "3_efficiency_tiny", "4_alpha_tiny", "5_heldout_tiny",
               "7_annealing", "8_schedules_tiny", "9_objective_tiny"}


def plain_loss(state: dict, config_dir: Path, blocks: torch.Tensor) -> float:
    """sum(token NLL) / tokens over ``blocks``, with a bare ``LlamaForCausalLM`` in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), torch_dtype=torch.float32)
    model.load_state_dict(state)
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for b in blocks.split(8):
            logits = model(input_ids=b).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     b[:, 1:].reshape(-1), reduction="sum").item()
            tokens += b[:, 1:].numel()
    return nll / tokens


@pytest.mark.slow
def test_quick_study_writes_the_document_from_the_tools_numbers(tmp_path):
    cache, study, out = tmp_path / "cache", tmp_path / "study", tmp_path / "out"
    env = dict(os.environ, LIGHTNING_MERGE_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               STUDY_THREADS="1")
    cmd = [sys.executable, "benchmarks/study.py", "--quick", "--study-dir", str(study), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text())["result"] for p in (study / "results").glob("*.json")}
    assert set(results) == EXPERIMENTS

    md = (out / "study.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((study/[^)]+\.png)\)", md)
    assert len(images) == 7 and all((out / i).stat().st_size > 10_000 for i in images), images
    claims = md.split("## Claims")[1].split("## Trajectories")[0]
    rows = [r for r in claims.splitlines() if r.startswith("| ") and not r.startswith("| claim")]
    assert len(rows) == 10
    assert all(re.search(r"\| (reproduced|partly|not reproduced)", r) for r in rows), rows

    # Two numbers of the pilot, recomputed without the tool: the newest checkpoint's loss on the search blocks,
    # and the merge 0.5 * (step 720) + 0.5 * (step 800) (the quick pilot's grid is lam in {0.5, 0.75}).
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lightning_merge.config import TextSetConf
    from lightning_merge.data import evenly_spaced, load_blocks

    metas = {p.parent: json.loads(p.read_text())["conf"] for p in cache.glob("demo/*/trajectory.json")}
    assert sorted((m["steps"], m["lr_schedule"]) for m in metas.values()) == [
        (150, "cosine"), (150, "wsd"), (800, "constant")]  # the demo itself and the quick annealing controls
    root = next(p for p, m in metas.items() if m["steps"] == 800)
    new, old = root / "checkpoints" / "step800", root / "checkpoints" / "step720"
    tok = AutoTokenizer.from_pretrained(new)
    blocks = evenly_spaced(load_blocks(TextSetConf(path=str(root / "heldout.jsonl"), num_blocks=64), tok), 64)
    pilot = results["1_pilot_tiny"]
    assert pilot["steps"] == [560, 640, 720, 800]
    a, b = load_file(old / "model.safetensors"), load_file(new / "model.safetensors")
    assert pilot["single"][-1] == pytest.approx(plain_loss(b, new, blocks), rel=1e-5)
    half = {k: (0.5 * a[k].double() + 0.5 * b[k].double()).float() for k in a}
    merged = plain_loss(half, new, blocks)
    pair = next(p for p in results["2_curve_tiny"] if p["step_i"] == 720)
    assert pair["lams"][0] == 0.0 and pair["lams"][-1] == 1.0
    at_half = [v for lam, v in zip(pair["lams"], pair["losses"]) if math.isclose(lam, 0.5)]
    assert at_half and at_half[0] == pytest.approx(merged, rel=1e-5)
    # ... and the document shows what the results hold
    top = pilot["top"]
    assert f"{top['gain_pct']:+.2f}%" in md
    assert f"adjacent late {pilot['adjacent_late_mean']:+.2f}%" in md
