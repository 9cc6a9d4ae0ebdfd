"""Training frameworks' own checkpoint formats, each behind :class:`~lightning_merge.formats.base.Format`.

``find(path)`` says which format a path is (None: one of the HF-family formats that
``checkpoints.py`` reads itself: HF folders, ``.bin``/``.pt``/``.ckpt`` state dicts,
DeepSpeed ZeRO folders). ``open_mapped(path, ...)`` opens a checkpoint and picks
the name map from its layout (or the user's ``checkpoints.name_map``).

Adding a format: one module here with a ``FORMAT`` instance, its name in
``_MODULES`` (most specific first), and one test.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import CheckpointError
from .base import Format, NativeCheckpoint, Opened, Piece, check_map

__all__ = ["find", "formats", "open_mapped", "load_name_map", "Format", "NativeCheckpoint", "Piece", "Opened"]

# Most specific first: OLMo-core and Megatron folders are DCP folders too.
_MODULES = ("olmo_core", "megatron", "torchtitan", "litgpt", "nanogpt")
_LOADED: list[Format] | None = None


def formats() -> list[Format]:
    """The registered formats, in detection order."""
    global _LOADED
    if _LOADED is None:
        _LOADED = [importlib.import_module(f"{__name__}.{m}").FORMAT for m in _MODULES]
    return _LOADED


def find(path: Path) -> Format | None:
    """The framework format ``path`` is one checkpoint of, or None."""
    path = Path(path)
    for fmt in formats():
        if fmt.detect(path):
            return fmt
    return None


def find_series(folder: Path) -> tuple[Format, list[Path]] | None:
    """A folder of one framework's checkpoints (torchtitan's ``checkpoint/``, Megatron's save folder, a
    LitGPT ``out_dir``) -> its format and checkpoints (unsorted; finished or not), or None."""
    for fmt in formats():
        kids = fmt.series_children(Path(folder))
        if kids:
            return fmt, kids
    return None


def load_name_map(spec: str):
    """``mypkg.maps:to_hf`` -> the callable. It takes ``(native_tensors, hf_config)`` (``name ->
    NativeTensor``, the parsed config.json) and returns ``hf_name -> Piece`` or ``hf_name -> native_name``."""
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise CheckpointError(f"checkpoints.name_map={spec!r}: give it as 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"checkpoints.name_map={spec!r}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise CheckpointError(f"checkpoints.name_map={spec!r}: {attr} is not callable")
    return fn


def _user_pieces(native: NativeCheckpoint, out: dict, spec: str) -> dict[str, Piece]:
    pieces = {}
    for hf, p in dict(out).items():
        if isinstance(p, str):
            t = native.tensors.get(p)
            if t is None:
                raise CheckpointError(f"checkpoints.name_map={spec!r}: maps {hf!r} from {p!r}, which "
                                      f"{native.path} does not hold")
            p = Piece(p, t.shape)
        if not isinstance(p, Piece):
            raise CheckpointError(f"checkpoints.name_map={spec!r}: {hf!r} maps to a {type(p).__name__}; return "
                                  "a native tensor name or a lightning_merge.formats.Piece")
        pieces[hf] = p
    return pieces


def hf_config_of(native: NativeCheckpoint, fmt: Format, config_dir: Path | None) -> dict:
    """The parsed HF config.json for ``native``: from ``config_dir`` when given, else derived by the format."""
    if config_dir is not None and (config_dir / "config.json").is_file():
        return json.loads((config_dir / "config.json").read_text())
    if native.hf_config is not None:
        return native.hf_config
    raise CheckpointError(f"{native.path}: a {fmt.name} checkpoint carries no Hugging Face config, so the model to "
                          f"evaluate it with is unknown: set checkpoints.config_dir to an HF folder with this model's "
                          f"config.json and tokenizer{fmt.needs_config_dir}")


def open_mapped(path: Path, fmt: Format, config_dir: Path | None = None, name_map: str | None = None) -> Opened:
    """Open ``path`` (a checkpoint of ``fmt``) and choose its map to HF names; refuse an unknown layout
    before any tensor is read, naming a few of its keys and the layouts known."""
    native = fmt.open(Path(path))
    cfg = hf_config_of(native, fmt, config_dir)
    if name_map:
        pieces = _user_pieces(native, load_name_map(name_map)(native.tensors, cfg), name_map)
        layout = name_map
    else:
        known = list(fmt.maps())
        chosen = next((m for m in known if m.matches(native.tensors)), None)
        if chosen is None:
            keys = sorted(native.tensors)
            raise CheckpointError(
                f"{path}: a {fmt.name} checkpoint whose key layout no built-in map knows (keys such as "
                f"{keys[:6]}); known {fmt.name} layouts: {', '.join(f'{m.name} -> {m.hf_architecture}' for m in known)}. "
                "Give a map of your own: checkpoints.name_map=mypkg.maps:to_hf, a function of (native tensors, "
                "HF config dict) returning {hf_name: native_name or lightning_merge.formats.Piece}")
        pieces, layout = chosen.build(native.tensors, cfg), chosen.name
    check_map(Path(path), native.tensors, pieces, layout, native.merged_only)
    return Opened(native=native, fmt=fmt, layout=layout, pieces=pieces)
