"""The study's pretraining trajectories, built offline by the demo's own trainer and cached like the demo.

- ``tiny`` / ``tiny_s1``: the embedded default (``python -m lightning_merge``), seeds 0 and 1:
  a 2-layer Llama of ~0.66M parameters, 800 steps at a constant LR after warm-up, 10 checkpoints.
- ``large_wsd``: a 4-layer Llama of ~4.2M parameters, 1200 steps of 8 x 256 tokens, warmup-stable-decay:
  constant LR, then a linear decay over the last 25% of the steps; 12 checkpoints, the last 3 in the decay.
  Until its decay starts it *is* the constant-LR run (same init, data order and LR, bit for bit), so its
  first 9 checkpoints are the study's constant-LR trajectory ``large`` (no second run is trained for it).
- ``large_cosine``: the same model and data with a cosine decay to ~0 (the annealing control).

Both large runs are trained in about 20-30 minutes each on one thread of this 2-core machine
(``python benchmarks/study.py --build large_wsd`` and ``--build large_cosine`` run them side by side).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from lightning_merge.config import DemoConf
from lightning_merge.demo import Trajectory, build_trajectory, checkpoint_steps

log = logging.getLogger(__name__)

_LARGE = dict(enabled=True, steps=1200, num_checkpoints=12, lr=2e-3, warmup_frac=0.05, batch_size=8, seq_len=256,
              vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688, decay_frac=0.25)

CONFS: dict[str, DemoConf] = {
    "tiny": DemoConf(enabled=True),
    "tiny_s1": DemoConf(enabled=True, seed=1),
    "large_wsd": DemoConf(**_LARGE, lr_schedule="wsd"),
    "large_cosine": DemoConf(**_LARGE, lr_schedule="cosine"),
    # --quick's annealing controls: the demo's model on a 2 MB corpus, 150 steps, the last 3 of 6 saves decaying
    "tiny_wsd_q": DemoConf(enabled=True, steps=150, num_checkpoints=6, lr_schedule="wsd", decay_frac=0.34,
                           max_train_bytes=2_000_000),
    "tiny_cosine_q": DemoConf(enabled=True, steps=150, num_checkpoints=6, lr_schedule="cosine",
                              max_train_bytes=2_000_000),
}


@dataclass
class Run:
    """One trajectory as the study uses it: its checkpoints (oldest first), steps, LR phase and data."""

    name: str
    conf: DemoConf
    traj: Trajectory
    checkpoints: list[Path]
    steps: list[int]
    phase: list[str]  # per checkpoint: "stable" (constant LR after warm-up) or "decay"

    @property
    def stable(self) -> list[int]:
        """Indices of the stable-phase checkpoints."""
        return [i for i, p in enumerate(self.phase) if p == "stable"]


def decay_start(conf: DemoConf) -> int:
    """The first optimizer step whose LR is below the peak (``conf.steps`` for a constant run)."""
    if conf.lr_schedule == "constant":
        return conf.steps
    if conf.lr_schedule == "wsd":
        return conf.steps - max(1, round(conf.decay_frac * conf.steps))
    return round(conf.warmup_frac * conf.steps)  # cosine decays from the end of the warm-up


def build(name: str, cache_dir: str | Path, progress: bool = False) -> Trajectory:
    """Build (or open the cached) trajectory ``name`` (a key of :data:`CONFS`)."""
    return build_trajectory(CONFS[name], cache_dir, progress=progress)


def open_run(name: str, cache_dir: str | Path, progress: bool = False) -> Run:
    """A trajectory of the study: ``large`` is ``large_wsd`` up to its decay (the constant-LR run)."""
    base = "large_wsd" if name == "large" else name
    conf = CONFS[base]
    traj = build(base, cache_dir, progress)
    steps = checkpoint_steps(conf)
    start = decay_start(conf)
    phase = ["stable" if s <= start else "decay" for s in steps]
    ckpts = list(traj.checkpoints)
    if name == "large":
        keep = [i for i, p in enumerate(phase) if p == "stable"]
        ckpts, steps, phase = [ckpts[i] for i in keep], [steps[i] for i in keep], [phase[i] for i in keep]
    return Run(name=name, conf=dataclasses.replace(conf), traj=traj, checkpoints=ckpts, steps=steps, phase=phase)


def params_of(run: Run) -> int:
    """The model's parameter count, read from the newest checkpoint's safetensors header (no formula to drift)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(run.checkpoints[-1].glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total
