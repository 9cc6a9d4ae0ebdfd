"""The model skeleton, its tokenizer, and what it needs from the checkpoints: all checked early.

Three things have given plausible but wrong numbers, so each is checked here
before any heavy work:

- **Tied embeddings.** With transformers 5.x, ``from_config`` under
  ``no_init_weights()`` leaves the output layer *untied* from the input
  embeddings (it holds uninitialised memory), and the merge skips it as a tied
  alias: every loss is NaN or overflows. :func:`build_model` ties it again
  and checks that the two are one tensor.
- **Tensors that do not cover the model.** A file of stray tensors (a
  training-state pickle, another framework's names) is refused against the
  model's own state-dict names and shapes (:func:`check_covers`), built on the
  ``meta`` device, so it costs no memory whatever the model's size.
- **Blocks longer than the model's positions.** A GPT-2 crashes with an
  ``IndexError`` inside the model, a RoPE model is silently scored past its
  context length: :func:`check_block_size` refuses both, naming the option.

Finding the tokenizer (:func:`tokenizer_dir`, :func:`load_tokenizer`) names
the folder it looked in and how to give one (``checkpoints.tokenizer_dir``).

Knows transformers, not ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoints import TOKENIZER_FILES, CheckpointError, has_tokenizer
from .series import CheckpointSeries

__all__ = ["build_model", "expected_tensors", "check_covers", "max_positions", "check_block_size",
           "tokenizer_dir", "load_tokenizer"]

log = logging.getLogger(__name__)

# Config keys that bound the positions a model can score, in the order they are looked up.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length",
                  "max_seq_len")


def _config(config_dir: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)


def _ties(config) -> bool:
    text = getattr(config, "get_text_config", lambda: config)()
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def build_model(config_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                *, meta: bool = False) -> torch.nn.Module:
    """The model skeleton from ``config.json``, without random init (every trial merges into it).

    ``meta=True`` builds it on the ``meta`` device (names and shapes only, no
    memory). Tied input/output embeddings are tied and checked: see the module
    docstring for the transformers 5.x behaviour this guards against.
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config_dir = Path(config_dir)
    config = _config(config_dir, trust_remote_code)
    with (torch.device("meta") if meta else no_init_weights()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if _ties(model.config):
        model.tie_weights()
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None and out.weight is not inp.weight:
            raise CheckpointError(f"{config_dir / 'config.json'}: tie_word_embeddings is true but "
                                  f"{type(model).__name__} did not tie its output layer to the input embeddings "
                                  "after tie_weights(); set tie_word_embeddings to what the checkpoints hold")
    return model.eval()


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What the model's state dict holds, by checkpoint name: parameters (tied ones once) and persistent buffers."""
    from .sharding import local_shards

    return {s.name: tuple(s.shape) for s in local_shards(model, "whole")}


def _sample(names, n: int = 6) -> str:
    names = list(names)
    return f"{names[:n]}{f' ... ({len(names)} in all)' if len(names) > n else ''}"


def check_covers(series: CheckpointSeries, model: torch.nn.Module) -> None:
    """Refuse checkpoints whose tensors are not the model's: names missing or extra, or shapes that differ.

    ``model`` may be on the ``meta`` device; the series takes its tie from it
    (``CheckpointSeries.tie``). The message names the checkpoint,
    what it holds and what the model needs, so a training-state file or another
    framework's names are seen at once. Extra tensors the model class itself
    ignores on load (``_keys_to_ignore_on_load_unexpected``) are allowed.
    """
    import re

    # The tie as transformers resolves the config (GPT2Config ties by default, so an older config.json
    # without the key is tied): series.names then leaves out the lm_head alias the model does not hold.
    series.tie = _ties(model.config)
    expected = expected_tensors(model)
    model_name = type(model).__name__
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    have = set(series.names)
    ck = series.newest
    where = series.config_dir / "config.json" if series.config_dir else "config.json"
    missing = [n for n in expected if n not in have]
    extra = [n for n in series.names if n not in expected and not any(p.search(n) for p in ignored)]
    if missing:
        share = f"none of the {len(expected)}" if len(missing) == len(expected) else \
            f"{len(expected) - len(missing)} of the {len(expected)}"
        raise CheckpointError(
            f"{ck.path}: holds {len(have)} tensors, {share} that {model_name} (from {where}) needs. "
            f"Missing: {_sample(missing)}. Found: {_sample(series.names)}. Is this a model checkpoint of that "
            "architecture, and is checkpoints.config_dir the right config? (A wrapper prefix on every key can "
            "be removed with checkpoints.strip_prefix=...)")
    if extra:
        raise CheckpointError(
            f"{ck.path}: holds tensors that {model_name} (from {where}) does not have: {_sample(extra)}; "
            "the checkpoints and config.json describe different models (set checkpoints.config_dir to the "
            "config they were trained with)")
    for name, shape in expected.items():
        info = ck.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)} but {model_name} "
                                  f"(from {where}) has {list(shape)}; set checkpoints.config_dir to the config "
                                  "the checkpoints were trained with")


def max_positions(config, raw: dict | None = None) -> tuple[str, int] | None:
    """The config key that bounds the model's positions and its value (None when no key says).

    Keys are looked up in ``raw`` (the ``config.json`` as written, so the
    message uses the name the user sees there, e.g. GPT-2's ``n_positions``)
    before the config object's attributes.
    """
    raw = raw or {}
    for cfg in (raw.get("text_config") or {}, raw):
        for key in _POSITION_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return key, value
    for cfg in (getattr(config, "get_text_config", lambda: config)(), config):
        for key in _POSITION_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return key, value
    return None


def check_block_size(config_dir: str | Path, sets: dict[str, int], trust_remote_code: bool = False) -> None:
    """Refuse held-out blocks longer than the model's positions. ``sets``: option name -> block size."""
    import json

    raw = json.loads((Path(config_dir) / "config.json").read_text())
    limit = max_positions(_config(Path(config_dir), trust_remote_code), raw)
    if limit is None:
        return
    key, value = limit
    for option, size in sets.items():
        if size > value:
            raise CheckpointError(
                f"config option `{option}`={size} is longer than the model's context: {key}={value} in "
                f"{Path(config_dir) / 'config.json'}. Blocks that long would run past its positions; set "
                f"{option}={value} (or less)")


def tokenizer_dir(series: CheckpointSeries, option: str | None = None) -> Path:
    """Where the tokenizer is: ``checkpoints.tokenizer_dir``, else the config folder, else the newest checkpoint with one.

    Raises :class:`CheckpointError` naming the folders looked in and what to set.
    """
    if option:
        path = Path(option).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoints.tokenizer_dir: {path} is not a folder")
        if not has_tokenizer(path):
            raise CheckpointError(f"checkpoints.tokenizer_dir: {path} holds no tokenizer (none of "
                                  f"{list(TOKENIZER_FILES)}; found {sorted(p.name for p in path.iterdir())[:8]})")
        return path
    looked = [series.tokenizer_dir, series.config_dir] + [c.path for c in reversed(series.checkpoints) if c.path.is_dir()]
    for folder in looked:
        if has_tokenizer(folder):
            return Path(folder)
    folders = list(dict.fromkeys(str(f) for f in looked if f is not None))
    raise CheckpointError(
        f"no tokenizer found: looked in {folders} for any of {list(TOKENIZER_FILES)}. Save the tokenizer beside "
        "the checkpoints (tokenizer.save_pretrained(folder)), or set checkpoints.tokenizer_dir=/path/to/folder "
        "holding only the tokenizer")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` from ``folder``; a failure names the folder and what it holds."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: the tokenizer there cannot be loaded ({first}); its files: "
                              f"{sorted(p.name for p in Path(folder).iterdir())[:10]}. Set "
                              "checkpoints.tokenizer_dir to a folder with a working tokenizer") from None
