"""The whole path through the CLI, on a smaller embedded default (400 training steps).

The reported numbers are recomputed here independently: the merged tensors
from the two source folders, and the held-out loss with a plain transformers
loop over blocks rebuilt from the held-out file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SMALL = ["demo.steps=400", "demo.num_checkpoints=4", "data.heldout.num_blocks=128",
         "data.search_blocks=32", "search.trials=6", "search.alpha=0.2"]


def run_cli(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIGHTNING_MERGE_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lightning_merge", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cache = root / "cache"
    proc = run_cli(*SMALL, cwd=root, cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = root / "outputs" / "tiny" / "paper"
    return {"root": root, "cache": cache, "out": out, "proc": proc,
            "results": json.loads((out / "results.json").read_text())}


def test_best_merge_beats_every_checkpoint(e2e):
    r = e2e["results"]
    singles = [c for c in r["candidates"] if c["kind"] == "checkpoint"]
    assert len(singles) == 2 and r["trials"] == 6
    for c in singles:
        assert r["best"]["heldout_loss"] < c["heldout_loss"], (c, r["best"])
    assert r["gain_vs_last_percent"] > 0
    assert {"sources", "best", "candidates", "trials", "merged_dir"} <= r.keys()
    assert "best merge" in e2e["proc"].stdout and "gain vs last" in e2e["proc"].stdout


def test_ledger_records_every_trial_and_paper_init(e2e):
    lines = [json.loads(x) for x in (e2e["out"] / "trials.jsonl").read_text().splitlines()]
    last = {}
    for rec in lines:
        last[rec["trial"]] = rec
    assert sorted(last) == list(range(len(last)))
    assert all(r["status"] == "completed" for r in last.values())
    # Baselines inside the space [0.2, 1] come first (the newest checkpoint lam=1, the uniform average,
    # EMA with a=0.2 puts lam=0.2 on the newer one, WMA lam=2/3) ...
    base = [r for r in last.values() if r["origin"].startswith("baseline:")]
    assert sorted(round(r["params"]["lam"], 6) for r in base) == [0.2, 0.5, round(2 / 3, 6), 1.0]
    # ... then the paper's Algorithm 1: lam=alpha and lam=1, then the chosen acquisition (GP-Hedge: EI/PI/UCB).
    search = [r for r in last.values() if not r["origin"].startswith("baseline:")]
    assert len(search) == 6
    assert search[0]["params"]["lam"] == pytest.approx(0.2) and search[1]["params"]["lam"] == 1.0
    assert [r["origin"] for r in search[:2]] == ["init", "init"]
    assert search[1]["reused"] and search[1]["objective"] == base[0]["objective"]  # lam=1 was the baseline
    assert search[0]["reused"]  # and lam=0.2 was EMA's
    assert all(r["origin"] in ("ei", "pi", "ucb") for r in search[2:])
    assert all(set(r["state"]["hedge"]["gains"]) == {"ei", "pi", "ucb"} for r in search[2:])
    for r in last.values():
        assert set(r) >= {"trial", "status", "weights", "heldout_loss", "seconds", "tokens"}


def test_merged_model_equals_hand_merge(e2e):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = e2e["results"]
    merged = Path(r["merged_dir"])
    model = AutoModelForCausalLM.from_pretrained(merged)
    AutoTokenizer.from_pretrained(merged)
    lam = r["best"]["params"]["lam"]
    a = load_file(Path(r["sources"][0]) / "model.safetensors")
    b = load_file(Path(r["sources"][1]) / "model.safetensors")
    got = load_file(merged / "model.safetensors")
    for n in a:
        torch.testing.assert_close(got[n], lam * b[n] + (1 - lam) * a[n], rtol=1e-6, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert (merged / "README.md").exists() and (merged / "merge.yaml").exists()


def test_reported_loss_equals_plain_transformers_loop(e2e):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = e2e["results"]
    merged = Path(r["merged_dir"])
    tok = AutoTokenizer.from_pretrained(merged)
    heldout = next(Path(e2e["cache"]).glob("demo/*/heldout.jsonl"))
    ids: list[int] = []
    for line in heldout.read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // 256 * 256]).view(-1, 256)
    blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, 128).round().long()]
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, blocks.shape[0], 16):
            b = blocks[i:i + 16]
            logits = model(input_ids=b).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(),
                                                     reduction="sum").double().item()
            n += b[:, 1:].numel()
    assert r["best"]["heldout_loss"] == pytest.approx(nll / n, rel=1e-5)


def test_evaluate_and_merge_modes_reuse_the_cached_trajectory(e2e, tmp_path):
    proc = run_cli(*SMALL, "mode=evaluate", "merge.weights=[0.5,0.5]", f"output_dir={tmp_path / 'ev'}",
                   cwd=e2e["root"], cache=e2e["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    uniform = next(c for c in e2e["results"]["candidates"] if c["name"].startswith("uniform"))
    assert ev["best"]["weights"] == [0.5, 0.5]
    assert ev["best"]["heldout_loss"] == pytest.approx(uniform["heldout_loss"], rel=1e-9)

    proc = run_cli(*SMALL, "mode=merge", "merge.weights=[0.25,0.75]", f"output_dir={tmp_path / 'mg'}",
                   cwd=e2e["root"], cache=e2e["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "mg" / "results.json").read_text())
    got = load_file(Path(res["merged_dir"]) / "model.safetensors")
    a = load_file(Path(res["sources"][0]) / "model.safetensors")
    b = load_file(Path(res["sources"][1]) / "model.safetensors")
    for n in a:
        torch.testing.assert_close(got[n], 0.25 * a[n] + 0.75 * b[n], rtol=1e-6, atol=1e-6)


def test_rerunning_merge_yaml_reproduces_the_model(e2e, tmp_path):
    merged = Path(e2e["results"]["merged_dir"])
    proc = run_cli("mode=merge", f"merge.recipe={merged / 'merge.yaml'}", f"output_dir={tmp_path / 'again'}",
                   cwd=e2e["root"], cache=e2e["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = load_file(tmp_path / "again" / "merged" / "model.safetensors")
    first = load_file(merged / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[n], first[n]) for n in first)


def test_bad_option_fails_fast_with_its_name(tmp_path):
    proc = run_cli("search.alpha=1.5", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert "search.alpha" in proc.stderr and "[0, 1)" in proc.stderr
    assert not (tmp_path / "cache").exists(), "nothing expensive may start before the config is checked"
