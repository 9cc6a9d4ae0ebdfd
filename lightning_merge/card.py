"""The merged model's card (``README.md``), and the verdict when merging did not help.

Every merged folder gets a card: a searched merge states its losses next to
the candidates; a ``mode=merge`` folder states the weights it was given and
that nothing was evaluated. Both end with the command that made them.

When the best merge of a search is a single checkpoint (one-hot weights, e.g.
``lam=1``), the honest result is "merging did not help", and the card says so,
with the likely reason where the trajectory shows one:

- the HF Trainer's ``trainer_state.json`` beside the newest checkpoint says
  the learning rate there is far below its peak: a decayed learning rate
  leaves the checkpoints little apart to average (the paper's and WSD's
  observation: merging pays in the stable, constant-LR phase);
- the candidates show the last checkpoint beating every average by a wide
  margin: the older checkpoints are far behind, so any weight on them costs.

``trainer_state.json`` is read lazily and defensively: a missing, torn or
foreign file only means no reason is given.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple, Sequence

from .formatting import _gain, _w, command_line, lmeval_table

__all__ = ["model_card", "merging_verdict", "trainer_lr", "DECAYED", "WIDE_MARGIN_PERCENT"]

log = logging.getLogger(__name__)

#: The learning rate at the checkpoint over its peak below which it counts as decayed.
DECAYED = 0.25
#: The last checkpoint beats every average "by a wide margin" when the closest is this much worse (%).
WIDE_MARGIN_PERCENT = 1.0


class TrainerLR(NamedTuple):
    """The learning rate at a checkpoint and its peak so far, from ``trainer_state.json``."""

    at: float
    peak: float
    step: int
    path: Path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def trainer_lr(checkpoint: str | Path) -> TrainerLR | None:
    """The learning rate at ``checkpoint`` and its peak, from the HF Trainer's ``trainer_state.json``; else None.

    The Trainer saves ``trainer_state.json`` in every ``checkpoint-N`` folder:
    ``global_step`` and ``log_history``, whose logging entries carry
    ``learning_rate`` and ``step``. The rate at the checkpoint is the last one
    logged at or before ``global_step``; the peak is the largest up to there.
    """
    folder = Path(checkpoint)
    path = (folder if folder.is_dir() else folder.parent) / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        history = state.get("log_history") or []
        logged = sorted((e["step"], e["learning_rate"]) for e in history if isinstance(e, dict)
                        and _finite(e.get("step")) and _finite(e.get("learning_rate")))
        step = state.get("global_step")
        step = step if _finite(step) else (logged[-1][0] if logged else 0)
        logged = [(s, lr) for s, lr in logged if s <= step]
    except (OSError, ValueError, AttributeError, TypeError):  # missing, torn or not the Trainer's
        return None
    if not logged or max(lr for _, lr in logged) <= 0:
        return None
    return TrainerLR(at=logged[-1][1], peak=max(lr for _, lr in logged), step=int(step), path=path)


def _one_hot(weights: Sequence[float], tol: float = 1e-6) -> int | None:
    """The index of the only non-zero weight when the weights pick a single checkpoint; else None."""
    hot = [i for i, w in enumerate(weights) if abs(w - 1.0) <= tol]
    if len(hot) == 1 and all(abs(w) <= tol for i, w in enumerate(weights) if i != hot[0]):
        return hot[0]
    return None


def merging_verdict(paths: Sequence[str | Path], best: dict, candidates: Sequence[dict]) -> str | None:
    """When the best merge is one checkpoint: "merging did not help", and the likely reason; else None."""
    i = _one_hot(best.get("weights") or [])
    if i is None or i >= len(paths):
        return None
    name = Path(paths[i]).name
    words = [f"Merging did not help: the best merge found is the single checkpoint `{name}` "
             f"(weight 1 on it, 0 on the others)."]
    if i != len(paths) - 1:
        return " ".join(words + ["The newest checkpoint is worse than this older one."])
    lr = trainer_lr(paths[-1])
    if lr is not None and lr.at <= DECAYED * lr.peak:
        words.append(
            f"The learning rate at `{name}` (step {lr.step}) is {lr.at:.1e}, {100 * lr.at / lr.peak:.0f}% of "
            f"its peak {lr.peak:.1e} (decayed; from {lr.path.parent.name}/{lr.path.name}): a decayed learning "
            f"rate leaves little between the checkpoints to average; merge checkpoints from the stable "
            f"(constant-LR) phase.")
    singles = [c for c in candidates if c.get("kind") == "checkpoint" and _finite(c.get("heldout_loss"))]
    averages = [c for c in candidates if c.get("kind") not in ("checkpoint", "search")
                and _finite(c.get("heldout_loss")) and _one_hot(c.get("weights") or []) is None]
    if singles and averages:
        last = singles[-1]["heldout_loss"]
        closest = min(averages, key=lambda c: c["heldout_loss"])
        margin = 100.0 * (closest["heldout_loss"] - last) / last
        if margin >= WIDE_MARGIN_PERCENT:
            words.append(
                f"The last checkpoint beats every average by a wide margin: the closest, `{closest['name']}`, "
                f"has a {margin:.2f}% higher held-out loss ({closest['heldout_loss']:.4f} against {last:.4f}); "
                f"the older checkpoints are far behind the newest (the model was still improving fast between "
                f"them), so any weight on them costs loss.")
        elif margin >= 0:
            words.append(f"No average of the checkpoints beat it: the closest, `{closest['name']}`, has a "
                         f"{margin:.2f}% higher held-out loss ({closest['heldout_loss']:.4f} against {last:.4f}).")
        else:  # the search ranks on its subset of blocks, the table on the whole held-out set
            words[0] = words[0].replace("Merging did not help", "The search found no better merge", 1)
            words.append(f"But on the whole held-out set `{closest['name']}` beats it ({closest['heldout_loss']:.4f} "
                         f"against {last:.4f}): the search's subset of blocks (`data.search_blocks`) ranks them "
                         f"differently; a larger subset makes the search's choice follow the report.")
    return " ".join(words)


def _source_list(series, weights: Sequence[float]) -> str:
    return "\n".join(f"{i}. `{p}` (weight {w:.4f})" for i, (p, w) in enumerate(zip(series.paths, weights)))


def _reproduce(command: str) -> str:
    return f"""## Reproduce
```
{command}
```
or re-run the recipe in `merge.yaml` (`python -m lightning_merge mode=merge merge.recipe=PATH/merge.yaml`)."""


_FRONT = """---
library_name: transformers
tags: [lightning_merge, checkpoint-merging]
---"""


def model_card(series, best: dict, candidates: list[dict], cfg, command: str | None = None,
               lmeval: dict | None = None) -> str:
    """The merged model's README.md: sources, weights, metric, gains (or that none was measured), and the command.

    ``best`` without ``heldout_loss`` is a ``mode=merge`` merge: the weights were
    given, nothing was evaluated. ``command`` defaults to :func:`formatting.command_line`.
    """
    command = command if command is not None else command_line()
    if "heldout_loss" not in best:
        return _given_card(series, list(best["weights"]), cfg, command)
    singles = [c for c in candidates if c.get("kind") == "checkpoint"]
    ref = singles[-1]["heldout_loss"] if singles else None
    rows = "\n".join(f"| {c['name']} | {_w(c['weights'])} | {c['heldout_loss']:.4f} | "
                     f"{_gain(c['heldout_loss'], ref):+.2f}% |" if ref else
                     f"| {c['name']} | {_w(c['weights'])} | {c['heldout_loss']:.4f} | |" for c in candidates)
    others = [c for c in candidates if c.get("kind") != "search"]
    gains = ""
    if ref and others:
        top = min(others, key=lambda c: c["heldout_loss"])
        gains = (f"\nThe merge's held-out loss is {best['heldout_loss']:.4f}: "
                 f"{_gain(best['heldout_loss'], ref):+.2f}% against the last checkpoint ({ref:.4f}) and "
                 f"{_gain(best['heldout_loss'], top['heldout_loss']):+.2f}% against the best other candidate "
                 f"({top['name']}, {top['heldout_loss']:.4f}); positive means lower loss.\n")
    verdict = merging_verdict(series.paths, best, candidates)
    verdict = f"\n**{verdict.split(':', 1)[0]}**:{verdict.split(':', 1)[1]}\n" if verdict else ""
    lm = "\n".join(["", "## lm-eval tasks", "", *lmeval_table(lmeval), ""]) if lmeval_table(lmeval) else ""
    return f"""{_FRONT}
# Merged checkpoint ({cfg.experiment})

A weighted average of pretraining checkpoints, found by `lightning_merge` with
`search.name={cfg.search.name}` (Bayesian optimisation of the merge weights, after
Liu et al., *Checkpoint Merging via Bayesian Optimization in LLM Pretraining*, arXiv 2403.19390).
{verdict}
## Sources (oldest first) and weights
{_source_list(series, best["weights"])}

## Held-out loss (token-weighted mean NLL, nats/token)
{gains}
| candidate | weights | held-out loss | gain vs last |
|---|---|---|---|
{rows}
{lm}
{_reproduce(command)}
"""


def _given_card(series, weights: list[float], cfg, command: str) -> str:
    """The card of a ``mode=merge`` folder: the weights were given, nothing was measured."""
    origin = f"the recipe `{cfg.merge.recipe}`" if cfg.merge.recipe else "the command line (`merge.weights`)"
    total = sum(weights)
    if abs(total - 1.0) <= 1e-6:
        scale = "The weights sum to 1."
    elif cfg.merge.normalize:
        scale = f"The weights sum to {total:.4f} and were divided by their sum (`merge.normalize=true`)."
    else:
        scale = (f"The weights sum to {total:.4f} and were used as given, so every parameter is the "
                 f"average scaled by {total:.4f}.")
    return f"""{_FRONT}
# Merged checkpoint ({cfg.experiment})

A weighted average of checkpoints written by `lightning_merge` (`mode=merge`), with the weights
given by {origin}. {scale}

**No evaluation was run**: this merge's loss is not known, and nothing here says it is better than
its sources. To measure it next to them, run the same command with `mode=evaluate` and a held-out set
from the training distribution (`data.heldout.path=...`), or search the weights with `mode=search`.

## Sources (oldest first) and weights
{_source_list(series, weights)}

{_reproduce(command)}
"""
