"""torchtitan checkpoints (and any other plain DCP folder): ``<dump>/checkpoint/step-N/``.

What torchtitan writes (read in torchtitan 0.3.0,
``torchtitan/components/checkpointer/dcp.py`` and ``base.py``):

- ``CheckpointManager._save`` calls ``dcp.save(states, checkpoint_id=<folder>/step-N)``
  (``_create_checkpoint_id``). ``states`` is ``_flattened_model_states_sd()``: the
  model's state dict at the top level (``ModelWrapper.state_dict()``: FQNs such as
  ``tok_embeddings.weight``), beside ``optimizer`` (``OptimizersContainer.state_dict``,
  flat and FQN-keyed: ``state.<param fqn>.exp_avg``, ``param_groups.<fqn>.lr``,
  see ``components/optimizer/utils.py:get_flat_optim_state_dict``), ``lr_scheduler``
  (``{"last_epoch": n}``), ``dataloader`` and ``train_state`` (``{"step", "ntokens_seen"}``).
  DCP flattens the nesting with dots, so the saved keys are ``tok_embeddings.weight``,
  ``optimizer.state.layers.0....exp_avg``, ``train_state.step`` (plain Python values
  are saved as byte entries). Versions before the flattening (early 2025) saved
  ``{"model": ModelWrapper, ...}``: model keys prefixed ``model.``.
- The last step may be model-only (``last_save_model_only``, in ``export_dtype``), and
  ``--checkpoint.initial_load_path`` with ``initial_load_model_only`` loads exactly
  ``states[MODEL].state_dict()``: a model-only folder, which is what :meth:`write`
  gives by default (the inherited :meth:`DCPFormat.write`, under the template's own keys,
  prefix or not).
- ``_find_load_step`` counts a ``step-N`` folder only once its ``.metadata`` exists
  (DCP writes it last): :meth:`DCPFormat.complete`.

Model vs training state: every key under ``optimizer``, ``lr_scheduler``,
``dataloader`` or ``train_state`` is training state (``others`` / ``other_bytes``);
the rest is the model. A ``model.`` prefix on every model key is stripped only when
what remains is torchtitan's names (or HF's, ``{"model": hf_model.state_dict()}``), so
an HF-named DCP folder (``model.embed_tokens.weight``, ``lm_head.weight``) keeps its
names and is read by the identity layout ``hf``.

Two generations of torchtitan's Llama3 names map to ``LlamaForCausalLM``, following
``Llama3StateDictAdapter.to_hf`` (``torchtitan/models/llama3/state_dict_adapter.py``):
0.2.x ``layers.N.attention.{wq,wk,wv}`` and ``output.weight``, 0.3.0
``layers.N.attention.qkv_linear.{wq,wk,wv}`` and ``lm_head.weight`` (the fused
``wqkv`` of 0.3.0 is split back into these by its own state dict hook when saved).
torchtitan's RoPE is complex (pairs of adjacent features), HF's rotates halves, so
``to_hf`` permutes the rows of ``wq``/``wk`` per head (``_permute``); here that is a
:func:`~lightning_merge.formats.base.rows_of_permutation`: the HF tensor is read as
row runs of the native one. torchtitan carries no HF config: the config.json and
tokenizer come from ``checkpoints.config_dir``, as torchtitan's own converter needs
an ``hf_assets_path``.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

from ..errors import CheckpointError
from .base import LayoutMap, NativeTensor, Piece, rows_of_permutation
from .dcp import DCPCheckpoint, DCPFormat, is_dcp_dir, read_metadata

__all__ = ["FORMAT", "TorchtitanFormat", "STATE_KEYS", "split_keys", "llama3_to_hf"]

log = logging.getLogger(__name__)

#: torchtitan's ``CheckpointManager.states`` besides the model (``MODEL``, ``OPTIMIZER``,
#: ``LR_SCHEDULER``, ``DATALOADER``, ``TRAIN_STATE`` in ``checkpointer/base.py``).
STATE_KEYS = ("optimizer", "lr_scheduler", "dataloader", "train_state")
_STEP = re.compile(r"^step-(\d+)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_TT_NAME = re.compile(r"^(tok_embeddings\.weight$|norm\.weight$|output\.weight$|lm_head\.weight$|"
                      r"layers\.\d+\.(attention|feed_forward|attention_norm|ffn_norm)[.])")
_PREFIX = "model."


def _is_state(key: str) -> bool:
    return key.split(".", 1)[0] in STATE_KEYS


def split_keys(keys: Mapping[str, object]) -> tuple[str, list[str], list[str]]:
    """DCP keys -> (the model prefix to strip, the model keys, the training-state keys)."""
    model = [k for k in keys if not _is_state(k)]
    other = [k for k in keys if _is_state(k)]
    prefix = ""
    if model and all(k.startswith(_PREFIX) for k in model):
        rest = [k[len(_PREFIX):] for k in model]
        if any(_TT_NAME.match(k) for k in rest) or "model.embed_tokens.weight" in rest:  # torchtitan's or HF's
            prefix = _PREFIX
    return prefix, model, other


def _step_sibling_of_dcp(path: Path) -> bool:
    """An empty ``step-N`` folder beside finished DCP step folders: a save that has just begun."""
    if not (_STEP.match(path.name) and path.is_dir()) or any(path.iterdir()):
        return False
    return any(c != path and _STEP.match(c.name) and is_dcp_dir(c) for c in path.parent.iterdir())


class TorchtitanFormat(DCPFormat):
    """torchtitan's ``step-N`` DCP folders; also any plain ``dcp.save`` folder not claimed by a more
    specific DCP format (Megatron's ``metadata.json``, OLMo-core's ``model_and_optim``)."""

    name = "torchtitan"
    needs_config_dir = (" (torchtitan's own converter needs an HF assets folder the same way: "
                        "--checkpoint.initial_load_path with hf_assets_path)")

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir() or path.name == "model_and_optim":
            return False
        meta = path / "metadata.json"
        if meta.is_file():
            try:
                if "sharded_backend" in json.loads(meta.read_text()):
                    return False  # Megatron-core's dist checkpoint
            except (OSError, ValueError, TypeError):
                pass
        return is_dcp_dir(path) or _step_sibling_of_dcp(path)

    def series_children(self, folder: Path) -> list[Path] | None:
        folder = Path(folder)
        if not folder.is_dir() or is_dcp_dir(folder):
            return None
        kids = [c for c in folder.iterdir() if not c.name.startswith(".") and self.detect(c)]
        if kids:
            for c in folder.iterdir():
                if _STEP.match(c.name) and c not in kids and (c / "model.safetensors.index.json").is_file():
                    log.warning("%s: %s is torchtitan's last step saved in HF safetensors (last_save_in_hf), not "
                                "DCP: not part of this series; give it in checkpoints.sources to include it", folder,
                                c.name)
        return kids or None

    def open(self, path: Path) -> DCPCheckpoint:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        path = Path(path)
        md = read_metadata(path)
        entries = md.state_dict_metadata
        prefix, model, other = split_keys(entries)
        tensors = [k for k in model if isinstance(entries[k], TensorStorageMetadata)]
        if not tensors:
            raise CheckpointError(f"{path}: a DCP checkpoint with no model tensors (its keys: {sorted(entries)[:6]}): "
                                  "was it saved with the model (torchtitan saves the model in every step folder)?")

        def ours(k: str) -> str:
            return k[len(prefix):] if prefix and k.startswith(prefix) else k

        model_keys = {ours(k): k for k in tensors}
        other_keys = {k: k for k in other if isinstance(entries[k], TensorStorageMetadata)}
        model_bytes = [k for k in model if isinstance(entries[k], BytesStorageMetadata)]
        other_bytes = [k for k in other if isinstance(entries[k], BytesStorageMetadata)]
        log.debug("%s: %d model tensors (prefix %r), %d training-state tensors, %d byte entries", path,
                  len(model_keys), prefix, len(other_keys), len(model_bytes) + len(other_bytes))
        ck = DCPCheckpoint(path, md, model_keys, other_keys, model_bytes=model_bytes, other_bytes=other_bytes)
        ck.format = self.name
        return ck

    def maps(self) -> list[LayoutMap]:
        return [
            LayoutMap("torchtitan-llama3", "LlamaForCausalLM",
                      lambda n: "tok_embeddings.weight" in n and any(".attention.qkv_linear.wq." in k for k in n),
                      lambda n, cfg: llama3_to_hf(n, cfg, qkv="attention.qkv_linear.")),
            LayoutMap("torchtitan-llama3-0.2", "LlamaForCausalLM",
                      lambda n: "tok_embeddings.weight" in n and any(".attention.wq." in k for k in n),
                      lambda n, cfg: llama3_to_hf(n, cfg, qkv="attention.")),
            LayoutMap("hf", "the architecture of checkpoints.config_dir",
                      lambda n: any(k.startswith(("model.embed_tokens.", "model.layers.")) for k in n),
                      lambda n, cfg: {k: Piece(k, t.shape) for k, t in n.items()}),
        ]


def _rope_rows(n_rows: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """The rows of torchtitan's ``Llama3StateDictAdapter._permute(w, n_heads, n_rows, dim)``."""
    if n_rows % (2 * n_heads):
        raise CheckpointError(f"a q/k projection of {n_rows} rows cannot hold {n_heads} heads of even size")
    return rows_of_permutation(n_rows, lambda w: w.view(n_heads, n_rows // n_heads // 2, 2, 1)
                               .transpose(1, 2).reshape(n_rows, 1))


def llama3_to_hf(native: Mapping[str, NativeTensor], cfg: dict, qkv: str = "attention.qkv_linear.") -> dict[str, Piece]:
    """torchtitan Llama3 names -> ``LlamaForCausalLM`` pieces, as ``Llama3StateDictAdapter.to_hf`` maps them.

    ``qkv``: where ``wq``/``wk``/``wv`` sit in a layer (0.3.0 ``attention.qkv_linear.``,
    0.2.x ``attention.``). The head is ``lm_head.weight`` (0.3.0) or ``output.weight``
    (0.2.x); dropped when the config ties it to the embeddings (as ``to_hf`` drops it
    with ``enable_weight_tying``)."""
    hidden, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or hidden // nh
    layers = sorted({int(m.group(1)) for k in native if (m := _LAYER.match(k))})
    if layers != list(range(cfg["num_hidden_layers"])):
        raise CheckpointError(f"the checkpoint holds layers {layers[:3]}..{layers[-3:]} but the HF config says "
                              f"num_hidden_layers={cfg['num_hidden_layers']}: is checkpoints.config_dir the config "
                              "of this model?")

    def whole(name: str) -> Piece:
        t = native.get(name)
        return Piece(name, t.shape if t is not None else ())

    out = {"model.embed_tokens.weight": whole("tok_embeddings.weight"), "model.norm.weight": whole("norm.weight")}
    if not cfg.get("tie_word_embeddings", False):
        head = next((h for h in ("lm_head.weight", "output.weight") if h in native), "lm_head.weight")
        out["lm_head.weight"] = whole(head)
    q_runs, k_runs = _rope_rows(nh * hd, nh), _rope_rows(kv * hd, kv)
    for i in layers:
        p, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = Piece(p + qkv + "wq.weight", (nh * hd, hidden), runs=q_runs)
        out[h + "self_attn.k_proj.weight"] = Piece(p + qkv + "wk.weight", (kv * hd, hidden), runs=k_runs)
        out[h + "self_attn.v_proj.weight"] = whole(p + qkv + "wv.weight")
        out[h + "self_attn.o_proj.weight"] = whole(p + "attention.wo.weight")
        out[h + "mlp.gate_proj.weight"] = whole(p + "feed_forward.w1.weight")
        out[h + "mlp.down_proj.weight"] = whole(p + "feed_forward.w2.weight")
        out[h + "mlp.up_proj.weight"] = whole(p + "feed_forward.w3.weight")
        out[h + "input_layernorm.weight"] = whole(p + "attention_norm.weight")
        out[h + "post_attention_layernorm.weight"] = whole(p + "ffn_norm.weight")
    return out


FORMAT = TorchtitanFormat()
