"""MergeSearch in real Lightning training: bit-identical continuation, real numbers, DDP, clear refusals.

The training run is tests/callback_worker.py (an MLP with BatchNorm, dropout
and Adam; 40 steps, a checkpoint every 10, K=3, so searches run at steps 30
and 40). References are plain loops with no Lightning, over merges rebuilt
here from the ``.ckpt`` files ModelCheckpoint wrote.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callback_worker import EVERY, K, STEPS, Regressor, final_state, make_data, plain_loss, train
from lightning_merge.callbacks import MergeSearch

WORKER = Path(__file__).with_name("callback_worker.py")


def assert_same_state(a: dict, b: dict) -> None:
    """Every weight, buffer and optimizer tensor equal (``torch.equal``), and the validation generator's state."""
    assert torch.equal(a["val_generator"], b["val_generator"])
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)


def rebuilt(ckpt_dir: Path, steps: list[int], weights: list[float]) -> dict:
    """The merge rebuilt from ModelCheckpoint's files: ``sum w_i sd_i`` in fp64 (integer buffers: newest)."""
    sds = [torch.load(ckpt_dir / f"step={s}.ckpt", weights_only=True)["state_dict"] for s in steps]
    out = {}
    for name, t in sds[-1].items():
        if t.is_floating_point():
            out[name] = sum(w * sd[name].double() for w, sd in zip(weights, sds)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def loss_of(state: dict) -> float:
    model = Regressor()
    model.load_state_dict(state)
    return plain_loss(model, make_data()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same training without and with MergeSearch (both with a CSVLogger), and what they left."""
    root = tmp_path_factory.mktemp("callbacks")
    out = {"root": root}
    for name, cb in (("plain", None), ("merge", MergeSearch(k=K, trials=4, seed=0, save_dir=root / "merged"))):
        logger = CSVLogger(root / name / "logs", name="run", version=0)
        trainer, model = train(root / name, cb, logger=logger)
        out[name] = {"state": final_state(trainer, model), "callback": cb, "logger": logger}
    return out


def test_training_continues_bit_identically(runs):
    """Searching at steps 30 and 40 (merging into the live weights, evaluating) leaves training untouched."""
    assert_same_state(runs["plain"]["state"], runs["merge"]["state"])
    history = runs["merge"]["callback"].history
    assert [r["step"] for r in history] == [3 * EVERY, STEPS]
    assert [r["checkpoint_steps"] for r in history] == [[10, 20, 30], [20, 30, 40]]
    assert all(r["trials"] == 4 and r["stop"].startswith("trial budget") for r in history)
    # The merged weights really were evaluated: the candidates' losses differ.
    assert all(len({round(e["loss"], 9) for e in r["evaluated"]}) >= 3 for r in history)


def test_reported_losses_equal_a_plain_evaluation_of_the_saved_checkpoints(runs):
    """best / last / uniform and every trial are the loss of the merge rebuilt from the .ckpt files."""
    ckpt = runs["root"] / "merge" / "ckpt"
    for rec in runs["merge"]["callback"].history:
        steps = rec["checkpoint_steps"]
        assert rec["last_loss"] == pytest.approx(loss_of(rebuilt(ckpt, steps[-1:], [1.0])), rel=1e-12)
        assert rec["uniform_loss"] == pytest.approx(loss_of(rebuilt(ckpt, steps, [1 / K] * K)), rel=1e-6)
        assert rec["best_loss"] == pytest.approx(loss_of(rebuilt(ckpt, steps, rec["weights"])), rel=1e-6)
        for e in rec["evaluated"]:
            assert e["loss"] == pytest.approx(loss_of(rebuilt(ckpt, steps, e["weights"])), rel=1e-6)
        assert rec["best_loss"] == min(e["loss"] for e in rec["evaluated"]) <= rec["last_loss"]
        assert rec["gain"] == pytest.approx(100 * (rec["last_loss"] - rec["best_loss"]) / rec["last_loss"])


def test_metrics_reach_the_trainers_loggers_and_the_best_merge_is_saved(runs):
    rows = list(csv.DictReader(open(Path(runs["merge"]["logger"].log_dir) / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("merge/best_loss")}
    history = runs["merge"]["callback"].history
    assert sorted(logged) == [r["step"] for r in history]
    for rec in history:
        row = logged[rec["step"]]
        assert float(row["merge/best_loss"]) == pytest.approx(rec["best_loss"], rel=1e-6)
        assert float(row["merge/last_loss"]) == pytest.approx(rec["last_loss"], rel=1e-6)
        assert float(row["merge/gain"]) == pytest.approx(rec["gain"], rel=1e-5, abs=1e-9)
        assert [float(row[f"merge/weight_{i}"]) for i in range(K)] == pytest.approx(rec["weights"], rel=1e-6)
        # save_dir: the merged state_dict, published whole, with its record beside it
        from safetensors.torch import load_file

        folder = runs["root"] / "merged" / f"step-{rec['step']}"
        assert rec["saved"] == str(folder)
        saved = load_file(folder / "lightning_module.safetensors")
        ref = rebuilt(runs["root"] / "merge" / "ckpt", rec["checkpoint_steps"], rec["weights"])
        assert saved.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(saved[name], ref[name], rtol=1e-6, atol=1e-7)
        assert loss_of(saved) == pytest.approx(rec["best_loss"], rel=1e-9)
        assert json.loads((folder / "merge.json").read_text())["weights"] == rec["weights"]
    assert not [p for p in (runs["root"] / "merged").iterdir() if p.name.startswith(".")]


# --- a tiny Llama with a token-weighted loss_fn, saved with save_pretrained --------------------------
V, T = 64, 16


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=2,
                                                  intermediate_size=64, max_position_embeddings=T))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def token_nll(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of ``ids`` and the number of predicted tokens."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
    return nll, ids[:, 1:].numel()


def sequences(n: int, g: torch.Generator) -> TensorDataset:
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return TensorDataset((start + step * torch.arange(T)) % V)


def test_lm_loss_fn_and_save_pretrained(tmp_path):
    """A token-weighted loss_fn, and the saved HF folder scores the reported best loss in plain transformers.

    The search at step 20 comes before Lightning's first validation has run (no sanity check).
    """
    from transformers import LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    train_set, val_set = sequences(160, g), sequences(20, g)  # 20 steps an epoch
    L.seed_everything(0, verbose=False)
    cb = MergeSearch(k=2, trials=3, space="pairwise", alpha=0.2, acquisition="ei", save_dir=tmp_path / "merged",
                     loss_fn=lambda m, b: token_nll(m.model, b[0]))
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                   every_n_train_steps=10, save_top_k=-1), cb])
    trainer.fit(TinyLM(), DataLoader(train_set, batch_size=8, shuffle=True), DataLoader(val_set, batch_size=6))
    (rec,) = cb.history
    assert rec["step"] == 20 and rec["checkpoint_steps"] == [10, 20]
    model = LlamaForCausalLM.from_pretrained(rec["saved"]).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for (ids,) in DataLoader(val_set, batch_size=5):  # a different batching: the loss is per token
            s, c = token_nll(model, ids)
            nll, n = nll + s.double().item(), n + c
    assert n == 20 * (T - 1)
    assert rec["best_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert (Path(rec["saved"]) / "lightning_module.safetensors").exists()
    # pairwise: every evaluated point is lam * newest + (1 - lam) * older, lam in [alpha, 1]
    assert all(0.2 - 1e-9 <= e["weights"][1] <= 1 + 1e-9 and sum(e["weights"]) == pytest.approx(1)
               for e in rec["evaluated"])


# --- DDP, two gloo ranks ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_objective_is_exact_and_training_is_untouched(tmp_path):
    """Under DDP (2 ranks): each objective equals one process scoring the rebuilt merge, and training is bit-equal.

    DDP training itself differs from one process (gradients averaged over two
    half batches, BatchNorm statistics per rank), so the reference is the DDP
    run's own checkpoints, scored by a plain loop over the whole validation set.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "2"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert_same_state(torch.load(tmp_path / f"plain-rank{rank}.pt", weights_only=False),
                          torch.load(tmp_path / f"merge-rank{rank}.pt", weights_only=False))
    history = json.loads((tmp_path / "history-rank0.json").read_text())
    assert [r["step"] for r in history] == [30, 40]
    other = json.loads((tmp_path / "history-rank1.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in other] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    for rec in history:
        for e in rec["evaluated"]:
            ref = loss_of(rebuilt(tmp_path / "merge" / "ckpt", rec["checkpoint_steps"], e["weights"]))
            assert e["loss"] == pytest.approx(ref, rel=1e-6), e
    assert "merge search at step 40" in proc.stderr


# --- refusals, before any work ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"k": 1}, r"k=1.*at least 2"),
    ({"trials": 1}, r"search.trials"),
    ({"space": "cube"}, r"search.space"),
    ({"acquisition": "thompson"}, r"search.acquisition"),
    ({"every_n_checkpoints": 0}, r"every_n_checkpoints"),
    ({"temperature": 1.0}, r"temperature"),
    ({"k": 3, "space": "pairwise", "pair": [0, 5]}, r"search.pair"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeSearch(**kwargs)


def _fit_without_val(tmp_path, **ckpt):
    train_set, _ = make_data()
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, **ckpt), MergeSearch(k=2)])
    return trainer, train_set


def test_no_validation_dataloader_is_refused_before_training(tmp_path):
    trainer, train_set = _fit_without_val(tmp_path)
    with pytest.raises(ValueError, match="needs a validation dataloader"):
        trainer.fit(Regressor(), DataLoader(train_set, batch_size=8))
    assert trainer.global_step == 0


def test_weights_only_checkpoints_are_refused(tmp_path):
    trainer, train_set = _fit_without_val(tmp_path, save_weights_only=True)
    _, val_set = make_data()
    with pytest.raises(ValueError, match="save_weights_only=False"):
        trainer.fit(Regressor(), DataLoader(train_set, batch_size=8), DataLoader(val_set, batch_size=7))
    assert trainer.global_step == 0
