"""Finding checkpoints: local folders and files, hub repos at a revision, folders of many.

A configured source is one of:

- a checkpoint: an HF folder (safetensors or ``pytorch_model.bin``, single or
  sharded), a DeepSpeed ZeRO training folder, or a ``.ckpt``/``.bin``/
  ``.safetensors`` file;
- a folder of checkpoints (``step900/``, ``step1000/``, ``checkpoint-500/`` ...),
  expanded into its children sorted numerically (``step900`` before
  ``step1000``); an HF Trainer output folder that also holds the final model
  is read as its ``checkpoint-N`` children, with that model as the newest only
  when it differs from them (see :func:`_run_with_final_model`);
- a hub repo at a revision, ``org/name@rev`` (or ``hf://org/name@rev``),
  resolved through ``huggingface_hub`` and its cache (offline when cached).

An existing local path always wins over a hub reading of the same string. A
:class:`Selector` then narrows the resolved list (explicit names, a step
range, every n-th, the last n), always in training order.

Training frameworks' checkpoints (``formats/``: torchtitan and other DCP folders,
Megatron ``torch_dist``, OLMo-core, LitGPT, nanoGPT), and folders of them, are
resolved with each format's completion rule: an unfinished newest checkpoint of a
folder is skipped with a warning, an unfinished one named explicitly is refused.
Formats recognised but not read (PEFT adapters, GGUF, legacy Megatron) are
refused by name, with what to do instead (``unread.py``).

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import formats
from .checkpoints import Checkpoint, CheckpointError, is_checkpoint
from .completion import TRAINER_FILES as _TRAINER_WEIGHTLESS, incomplete
from .unread import unread_format

__all__ = ["Selector", "step_of", "step_key", "resolve_sources"]

log = logging.getLogger(__name__)

# Files HF Trainer writes beside the weights of each checkpoint-N/ (training state, never a checkpoint).
_TRAINER_FILES = _TRAINER_WEIGHTLESS
# A final model at most this large is compared with the newest checkpoint byte for byte; a larger
# one by a sample of tensors (a training step changes every trained tensor, so equal samples mean
# the same weights): 16 reads rather than two whole models.
_FULL_COMPARE_BYTES = 256 * 2**20
_SAMPLE = 16


def step_key(p: Path) -> tuple:
    """Sort key that orders ``step900`` before ``step1000`` (numbers compared as numbers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name) if t)


def _trainer_state(folder: Path) -> dict:
    """HF Trainer's ``trainer_state.json`` in ``folder`` ({} when absent or unreadable)."""
    f = folder / "trainer_state.json"
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); its step is taken from the folder name", f, e)
        return {}
    return state if isinstance(state, dict) else {}


def _checkpoint_dirs(p: Path) -> list[Path]:
    """The child folders of ``p`` that are checkpoints, in training order."""
    return sorted((c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and is_checkpoint(c)),
                  key=step_key)


def step_of(p: Path) -> int | None:
    """The training step of a checkpoint: ``global_step`` in its ``trainer_state.json`` (HF Trainer),
    else the last number in its name. A run folder's final model (a checkpoint that has checkpoint
    folders inside it) has only the former: its name is the run's, not a step."""
    if p.is_dir():
        step = _trainer_state(p).get("global_step")
        if isinstance(step, int):
            return step
        if is_checkpoint(p) and _checkpoint_dirs(p):
            return None
    nums = re.findall(r"\d+", p.stem if p.is_file() else p.name)
    return int(nums[-1]) if nums else None


@dataclass
class Selector:
    """Which of the resolved checkpoints to keep, applied in this order.

    ``names``: keep only these folder/file names. ``steps``: ``[lo, hi]``
    inclusive range of steps (from the names). ``every``: keep every n-th
    counting back from the newest, so the newest is always kept. ``last``:
    keep the newest n.
    """

    names: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    every: int | None = None
    last: int | None = None

    def apply(self, paths: list[Path]) -> list[Path]:
        if self.names:
            by_name = {p.name: p for p in paths}
            missing = [n for n in self.names if n not in by_name]
            if missing:
                raise CheckpointError(f"checkpoints.names: {missing} not found among "
                                      f"{[p.name for p in paths][:10]}")
            paths = [p for p in paths if p.name in set(self.names)]
        if self.steps:
            if len(self.steps) != 2:
                raise CheckpointError(f"checkpoints.steps must be [lo, hi], got {list(self.steps)}")
            lo, hi = self.steps
            unnumbered = [p.name for p in paths if step_of(p) is None]
            if unnumbered:
                raise CheckpointError(f"checkpoints.steps: {unnumbered[:3]} have no step number (in their name or a "
                                      "trainer_state.json)")
            paths = [p for p in paths if lo <= step_of(p) <= hi]
        if self.every:
            paths = paths[::-1][:: self.every][::-1]
        if self.last:
            paths = paths[-self.last:]
        return paths


def _is_trainer_file(c: Path) -> bool:
    return c.name in _TRAINER_FILES or (c.name.startswith("rng_state") and c.suffix == ".pth")


def _framework_checkpoints(p: Path) -> list[Path] | None:
    """A training framework's checkpoint, or a folder of them (torchtitan's ``checkpoint/``, a Megatron
    save folder, a LitGPT ``out_dir``), as checkpoint paths; None when ``p`` is neither.

    Each format's completion rule decides whether a checkpoint is finished. One named explicitly
    must be; in a folder series the newest may still be being written (a run in flight saves while
    we read), so an unfinished one is skipped with a warning. An unfinished one older than a
    finished one (a save that crashed) is skipped too, and said.
    """
    fmt = formats.find(p)
    if fmt is not None:
        if not fmt.complete(p):
            raise CheckpointError(f"checkpoints.sources: {p} is a {fmt.name} checkpoint that is not complete (still "
                                  "being written, or its save crashed): wait for it to finish, or give another")
        return [p]
    found = formats.find_series(p) if p.is_dir() else None
    if found is None:
        return None
    fmt, kids = found
    kids = sorted(kids, key=step_key)
    done = [k for k in kids if fmt.complete(k)]
    for k in kids:
        if k not in done:
            log.warning("%s: %s is a %s checkpoint that is not complete (%s): skipped", p, k.name, fmt.name,
                        "the newest: still being written?" if k == kids[-1] else "a crashed save?")
    if not done:
        raise CheckpointError(f"checkpoints.sources: {p} holds {len(kids)} {fmt.name} checkpoints "
                              f"({[k.name for k in kids][:5]}) but none is complete yet")
    return done


def _whole(p: Path, kids: list[Path]) -> list[Path]:
    """The HF checkpoints of the folder ``p`` that are written completely (``completion.py``), in order.

    As for the frameworks' formats: an unfinished newest (a save in flight) or an unfinished older one
    (a crashed save) is skipped with a warning; a folder with none finished is refused.
    """
    done = []
    for k in kids:
        why = incomplete(k)
        if why is None:
            done.append(k)
        else:
            log.warning("%s: %s is not completely written (%s; %s): skipped", p, k.name, why,
                        "the newest: still being written?" if k == kids[-1] else "a crashed save?")
    if kids and not done:
        raise CheckpointError(f"checkpoints.sources: {p} holds {len(kids)} checkpoints "
                              f"({[k.name for k in kids][:5]}) but none is completely written yet")
    return done


def _named_whole(p: Path) -> list[Path]:
    """A checkpoint named explicitly must be whole: refused, with the reason, while it is being written."""
    why = incomplete(p)
    if why is not None:
        raise CheckpointError(f"checkpoints.sources: {p} is not completely written ({why}): still being saved, "
                              "or its save crashed; wait for it to finish, or give another")
    return [p]


def _expand_local(p: Path) -> list[Path]:
    """One local source as checkpoint paths: itself, its checkpoint children, or a refusal naming it."""
    framework = _framework_checkpoints(p)
    if framework is not None:
        return framework
    if p.is_dir():
        if is_checkpoint(p):
            kids = _whole(p, _checkpoint_dirs(p))
            return _run_with_final_model(p, kids) if kids else _named_whole(p)
        what = unread_format(p)  # a PEFT folder holds files that look readable
        if what:
            raise CheckpointError(f"checkpoints.sources: {what}")
        kids = sorted((c for c in p.iterdir() if not c.name.startswith(".") and not _is_trainer_file(c)
                       and is_checkpoint(c)), key=step_key)
        if kids:
            unread = [c.name for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")
                      and not is_checkpoint(c) and unread_format(c)]
            if unread:
                log.warning("%s: %s not read (a format lightning_merge does not read yet; give one of them as "
                            "a source to see how to convert it)", p, unread[:5])
            return _whole(p, kids)
    elif is_checkpoint(p):
        return _named_whole(p)
    what = unread_format(p)
    if what:
        raise CheckpointError(f"checkpoints.sources: {what}")
    if p.is_dir():
        raise CheckpointError(f"checkpoints.sources: {p} is neither a checkpoint nor a folder of checkpoints "
                              f"(found: {sorted(c.name for c in p.iterdir())[:8]})")
    raise CheckpointError(f"checkpoints.sources: {p} is not a checkpoint file "
                          f"(expected one of .safetensors, .bin, .ckpt, .pt, .pth)")


def _same_weights(a: Path, b: Path) -> bool | None:
    """Whether two checkpoints hold the same weights: None when their tensor names or shapes differ
    (not one model), False when dtypes or values differ. Headers first, then the values (all of
    them up to ``_FULL_COMPARE_BYTES``, else an evenly spread sample of ``_SAMPLE`` tensors)."""
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    try:
        if {n: t.shape for n, t in ca.tensors.items()} != {n: t.shape for n, t in cb.tensors.items()}:
            return None
        names = sorted(ca.tensors)
        if any(ca.tensors[n].dtype != cb.tensors[n].dtype for n in names):
            return False
        if ca.nbytes > _FULL_COMPARE_BYTES and len(names) > _SAMPLE:
            names = [names[round(i * (len(names) - 1) / (_SAMPLE - 1))] for i in range(_SAMPLE)]
        return all(torch.equal(ca.read(n), cb.read(n)) for n in names)
    finally:
        ca.close()
        cb.close()


def _readings(run: Path, kids: list[Path]) -> str:
    """The two readings of a run folder that holds a model and checkpoint folders, spelled as sources."""
    listed = ",".join(str(k) for k in kids)
    weights = next((run / f for f in ("model.safetensors", "pytorch_model.bin") if (run / f).is_file()), None)
    final = (f"checkpoints.sources=[{listed},{weights}]" if weights else
             f"move its sharded weights into a folder of their own (e.g. {run / 'final'}) and give {run}")
    return (f"its {len(kids)} checkpoint folders alone: checkpoints.sources=[{listed}]; or with its own model as "
            f"the newest: {final}")


def _run_with_final_model(run: Path, kids: list[Path]) -> list[Path]:
    """An HF Trainer output folder: ``checkpoint-N/`` folders and, beside them, the final model.

    The children are the series. The final save after the last step is usually the
    newest checkpoint again (dropped, not counted twice), or with
    ``load_best_model_at_end`` the best one (dropped too). A model that differs is
    the newest, at ``global_step`` from its ``trainer_state.json``; when that step is
    not after the newest child's, or its tensors are another model's, which reading
    is meant is unclear and both are spelled out.
    """
    newest = kids[-1]
    same = _same_weights(run, newest)
    if same:
        log.info("%s: its model is identical to its newest checkpoint %s (the trainer's final save): reading its "
                 "%d checkpoint folders as the series", run, newest.name, len(kids))
        return kids
    state = _trainer_state(run)
    best = Path(str(state.get("best_model_checkpoint") or "")).name
    if best and best != newest.name and run / best in kids and _same_weights(run, run / best):
        log.info("%s: its model is its best checkpoint %s, reloaded at the end of training (load_best_model_at_end): "
                 "reading its %d checkpoint folders as the series, %s not counted twice", run, best, len(kids), best)
        return kids
    if same is None:
        raise CheckpointError(f"checkpoints.sources: {run} holds a model whose tensor names or shapes differ from "
                              f"its newest checkpoint {newest.name}'s, so it is not that run's final model. "
                              "Say which reading you mean: " + _readings(run, kids))
    step, last = state.get("global_step"), step_of(newest)
    if isinstance(step, int) and last is not None and step <= last:
        raise CheckpointError(f"checkpoints.sources: {run} holds a model that differs from its newest checkpoint "
                              f"{newest.name}, but its trainer_state.json says global_step={step}, not after step "
                              f"{last}, so which is the newest is unclear. Say which reading you mean: "
                              + _readings(run, kids))
    if isinstance(step, int):
        log.info("%s: reading its %d checkpoint folders and, as the newest, its own model (step %d, from "
                 "trainer_state.json)", run, len(kids), step)
    else:
        log.warning("%s: its model differs from its newest checkpoint %s and there is no trainer_state.json to "
                    "give its step: taken as the newest, after %s. To read it otherwise, list the sources: %s",
                    run, newest.name, newest.name, _readings(run, kids))
    return [*kids, run]


def resolve_sources(sources: Iterable[str | Path], selector: Selector | None = None,
                    hub_cache: str | None = None) -> list[Path]:
    """Resolve configured sources into checkpoint paths (local), in training order: oldest first.

    A folder of checkpoints expands into its children (an HF Trainer run folder
    with its final model beside them: see :func:`_run_with_final_model`); a
    format recognised but not read is refused by name (``unread.py``).
    """
    from .hub import parse_hub_source, resolve_hub_source

    out: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.exists():
            out.extend(_expand_local(p))
            continue
        hub = parse_hub_source(str(s))
        if hub is None:
            raise CheckpointError(f"checkpoints.sources: {s} does not exist (and is not a hub repo "
                                  "spec like org/name@revision)")
        out.extend(_expand_local(resolve_hub_source(*hub, cache_dir=hub_cache)))
    if selector is not None:
        out = selector.apply(out)
    if not out:
        raise CheckpointError("checkpoints.sources: no checkpoints left after selection")
    return out
