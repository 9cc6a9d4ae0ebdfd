"""The embedded default: a tiny, real pretraining trajectory built offline.

Checkpoint merging only shows its effect on a real trajectory: checkpoints
taken from one run at a constant learning rate bounce around the walls of a
valley, and their weighted average lands closer to its floor. So instead of
shipping weights, the demo trains a model, in about a minute on one CPU thread:

- corpus: the ``.py`` sources of the running Python's standard library
  (about 10 MB, always present, no download), split by file into train and
  held-out; out-of-domain sets are a sample of the stdlib's own test suite
  and the documentation prose in ``pydoc_data.topics``;
- tokenizer: byte-level BPE trained on the train split;
- model: a 2-layer Llama of about 0.66M parameters, AdamW with a linear
  warm-up then a constant (the stable phase of warmup-stable-decay) or a
  cosine learning rate, saved as ``num_checkpoints`` HF folders.

Everything is keyed by a hash of the :class:`DemoConf` and the Python
version (the corpus depends on it) and cached; a build is published with
:func:`publishing_dir`, so a killed build never leaves half a cache behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DemoConf
from .io import atomic_write_json, atomic_write_text, publishing_dir

__all__ = [
    "Trajectory",
    "build_trajectory",
    "cache_key",
    "split_corpus",
    "train_tokenizer",
    "pack",
    "checkpoint_steps",
    "lr_factor",
    "train",
    "write_corpus",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the recipe changes, so old caches are not reused
EOS = "<|endoftext|>"  # the one special token: document separator, EOS and BOS
MARKER = "trajectory.json"  # written last: a folder without it is not a trajectory
# Folders that hold tests, or that are not ordinary Python source, and
# pydoc_data (its prose is the "pydoc" out-of-domain set, so it must not be trained on).
_SKIP_DIRS = {"site-packages", "encodings", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}


@dataclass
class Trajectory:
    """A built (or cached) demo trajectory; every path lies under ``root``."""

    root: Path
    checkpoints: list[Path]
    heldout: Path
    ood: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)
    cached: bool = False


def cache_key(conf: DemoConf) -> str:
    """Short hash of everything the trajectory depends on.

    That is every ``DemoConf`` field except ``enabled`` (which says whether to
    use the demo, not what it is) and ``save_pause_s`` (how the live demo writes), ``sys.version`` (the stdlib text changes
    between Python releases) and :data:`FORMAT_VERSION`.
    """
    fields = dataclasses.asdict(conf)
    fields.pop("enabled", None)
    fields.pop("save_pause_s", None)  # how the live demo writes, not what it trains
    if conf.lr_schedule != "wsd":
        fields.pop("decay_frac", None)  # only WSD reads it (and older caches were keyed without it)
    blob = json.dumps({"conf": fields, "python": sys.version, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text``; splits by it do not depend on file order."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 2**32


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _sources(root: Path) -> list[Path]:
    """Sorted stdlib ``.py`` files, pruning skipped folders (site-packages can be huge)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        found += [Path(folder) / n for n in names
                  if n.endswith(".py") and not n.startswith("_sysconfigdata")]
    return sorted(found)


def split_corpus(conf: DemoConf, stdlib: str | Path | None = None) -> dict[str, list[Path]]:
    """Split the stdlib sources into ``train``, ``heldout`` and ``stdlib_tests`` file lists.

    Held-out files are chosen by a hash of their relative path (not by
    position), so the split is deterministic and a file's side never depends
    on which other files exist. ``max_train_bytes`` keeps the train files in
    hash order until the cap is reached: a small but still varied corpus.
    ``stdlib_tests`` takes ``Lib/test/*.py`` files in hash order until they
    weigh as much as the held-out set, so the two losses are comparable.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    train: list[Path] = []
    heldout: list[Path] = []
    for path in _sources(root):
        held = _unit_hash(path.relative_to(root).as_posix()) < conf.heldout_frac
        (heldout if held else train).append(path)

    def in_hash_order(paths: list[Path], salt: str) -> list[Path]:
        def key(p: Path) -> bytes:
            return hashlib.sha1((salt + p.relative_to(root).as_posix()).encode()).digest()

        return sorted(paths, key=key)

    def take_until(paths: list[Path], budget: int) -> list[Path]:
        out, total = [], 0
        for p in paths:
            if total >= budget:
                break
            out.append(p)
            total += p.stat().st_size
        return sorted(out)

    if conf.max_train_bytes is not None:
        train = take_until(in_hash_order(train, "train:"), conf.max_train_bytes)
    heldout_bytes = sum(p.stat().st_size for p in heldout)
    tests = in_hash_order(sorted((root / "test").glob("*.py")), "ood:")
    return {"train": train, "heldout": heldout, "stdlib_tests": take_until(tests, heldout_bytes)}


def _texts(paths: list[Path], cap: int | None = None) -> list[str]:
    """Read files (utf-8, bad bytes replaced), dropping unreadable and blank ones."""
    texts = [t for t in map(_read, paths) if t and t.strip()]
    if cap is not None:  # trim the file that overshoots (chars ~ bytes: the stdlib is ASCII)
        out, total = [], 0
        for t in texts:
            if total >= cap:
                break
            out.append(t[: cap - total])
            total += len(out[-1])
        texts = out
    return texts


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    return atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; return it as a ``PreTrainedTokenizerFast``.

    Byte-level means no unknown tokens, whatever bytes the held-out or
    out-of-domain text holds. ``<|endoftext|>`` is EOS and BOS, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def pack(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize ``texts`` and concatenate them, EOS after each, into one 1-D int64 tensor."""
    eos = [tokenizer.eos_token_id]
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = itertools.chain.from_iterable(e.ids + eos for e in encoded)
    return torch.tensor(list(ids), dtype=torch.long)


def checkpoint_steps(conf: DemoConf) -> list[int]:
    """Evenly spaced save steps, the last one at ``conf.steps`` (strictly increasing)."""
    n = conf.num_checkpoints
    return [(i + 1) * conf.steps // n for i in range(n)]


def lr_factor(conf: DemoConf, step: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_frac`` of the steps, then either constant
    (what checkpoint merging is for: the stable phase of WSD), a cosine
    decay that reaches ~0 at the last step (merging then has little to gain),
    or warmup-stable-decay: constant, then a linear decay over the last
    ``decay_frac`` of the steps to ~0 at the last step. A WSD run is the
    constant run, bit for bit, until its decay starts (same init, data, LR).
    """
    warmup = round(conf.warmup_frac * conf.steps)
    if step < warmup:
        return (step + 1) / warmup
    if conf.lr_schedule == "constant":
        return 1.0
    if conf.lr_schedule == "wsd":
        decay = max(1, round(conf.decay_frac * conf.steps))
        return min(1.0, (conf.steps - step) / decay)
    progress = (step - warmup + 1) / max(1, conf.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _new_model(conf: DemoConf, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=conf.hidden_size, intermediate_size=conf.intermediate_size,
        num_hidden_layers=conf.num_layers, num_attention_heads=conf.num_heads,
        num_key_value_heads=conf.num_heads, max_position_embeddings=conf.seq_len,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=False,
    )
    torch.manual_seed(conf.seed)  # the init is part of the trajectory
    return LlamaForCausalLM(config)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not enabled)


@contextlib.contextmanager
def _no_hf_bars():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def train(conf: DemoConf, tokenizer, tokens: torch.Tensor, out: Path, progress: bool = True,
          save=None) -> list[Path]:
    """Train the tiny Llama on ``tokens`` and save its checkpoints under ``out``.

    Each step draws ``batch_size`` random windows of ``seq_len`` tokens from
    the packed stream with a seeded generator, so the run is reproducible.
    Weight decay applies to matrices only (nanoGPT's rule: decaying norms
    and biases only hurts). Returns the checkpoint folders, in training order.
    ``save(model, tokenizer, folder)`` writes one checkpoint (default: ``save_pretrained``;
    ``demo_live.py`` writes in place, as a run in flight does).
    """
    save = save or _save_checkpoint
    if tokens.numel() <= conf.seq_len:
        raise ValueError(f"demo: only {tokens.numel()} training tokens, need more than "
                         f"demo.seq_len={conf.seq_len}; raise demo.max_train_bytes")
    model = _new_model(conf, tokenizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=conf.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(conf.seed)
    save_at = set(checkpoint_steps(conf))
    saved: list[Path] = []
    from .report import live_logging

    with _progress(progress) as bar, live_logging(bar):  # log lines above the bar, not glued to it
        task = bar.add_task("train", total=conf.steps, loss="-")
        for step in range(conf.steps):
            for g in opt.param_groups:
                g["lr"] = conf.lr * lr_factor(conf, step)
            starts = torch.randint(0, tokens.numel() - conf.seq_len + 1, (conf.batch_size,), generator=gen)
            batch = torch.stack([tokens[s: s + conf.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.update(task, advance=1, loss=f"{loss.item():.3f}")
            if step + 1 in save_at:
                folder = out / f"step{step + 1}"
                save(model, tokenizer, folder)
                saved.append(folder)
                log.info("demo: saved %s (train loss %.3f)", folder.name, loss.item())
    return saved


def write_corpus(conf: DemoConf, folder: Path):
    """The demo's data in ``folder`` (``heldout.jsonl``, ``ood/*.jsonl``) and its tokenizer, trained here.

    Returns ``(tokenizer, packed training tokens, train texts, held-out texts, {ood name: texts})``.
    """
    files = split_corpus(conf)
    train_texts = _texts(files["train"], conf.max_train_bytes)
    heldout_texts = _texts(files["heldout"])
    from pydoc_data.topics import topics
    ood_texts = {"stdlib_tests": _texts(files["stdlib_tests"]),
                 "pydoc": [topics[k] for k in sorted(topics) if topics[k].strip()]}
    _write_jsonl(folder / "heldout.jsonl", heldout_texts)
    for name, texts in ood_texts.items():
        _write_jsonl(folder / "ood" / f"{name}.jsonl", texts)
    tokenizer = train_tokenizer(train_texts, conf.vocab_size)
    return tokenizer, pack(tokenizer, train_texts), train_texts, heldout_texts, ood_texts


def _save_checkpoint(model, tokenizer, folder: Path) -> None:
    with _no_hf_bars():  # one "Writing model shards" bar per save would bury ours
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # every checkpoint loads on its own, offline


def _load(root: Path) -> Trajectory | None:
    """Open a finished trajectory, or return None if ``root`` is not one (or is incomplete)."""
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        traj = Trajectory(root=root, checkpoints=[root / c for c in meta["checkpoints"]],
                          heldout=root / meta["heldout"], ood={k: root / v for k, v in meta["ood"].items()},
                          seconds={k: 0.0 for k in meta["seconds"]}, cached=True)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("demo: ignoring unreadable cache marker %s (%s)", marker, err)
        return None
    paths = [*traj.checkpoints, traj.heldout, *traj.ood.values()]
    if missing := [p for p in paths if not p.exists()]:
        log.warning("demo: cache %s lacks %s; rebuilding", root, missing[0])
        return None
    return traj


def build_trajectory(conf: DemoConf, cache_root: str | Path, progress: bool = True) -> Trajectory:
    """Return the demo trajectory for ``conf``, building it on the first call.

    The folder is ``cache_root/demo/<cache_key(conf)>``. It is reused when its
    marker ``trajectory.json`` exists; otherwise it is built in a temporary
    sibling and renamed into place only when complete. Torch's thread count
    is left to the caller.
    """
    root = Path(cache_root).expanduser() / "demo" / cache_key(conf)
    if (found := _load(root)) is not None:
        log.info("demo: using cached trajectory %s", root)
        return found

    log.info("demo: building trajectory in %s", root)
    seconds: dict[str, float] = {}
    with publishing_dir(root) as tmp:
        t0 = time.perf_counter()
        tokenizer, tokens, train_texts, heldout_texts, ood_texts = write_corpus(conf, tmp)
        seconds["corpus_tokenizer"] = time.perf_counter() - t0
        log.info("demo: corpus (%d train files, %.2f MB, %d tokens; %d held-out files, %.2f MB) "
                 "and tokenizer (%d tokens) in %.1fs", len(train_texts), sum(map(len, train_texts)) / 1e6,
                 tokens.numel(), len(heldout_texts), sum(map(len, heldout_texts)) / 1e6, len(tokenizer),
                 seconds["corpus_tokenizer"])

        t0 = time.perf_counter()
        ckpts = train(conf, tokenizer, tokens, tmp / "checkpoints", progress=progress)
        seconds["training"] = time.perf_counter() - t0
        log.info("demo: trained %d steps in %.1fs", conf.steps, seconds["training"])

        meta = {
            "format": FORMAT_VERSION, "python": sys.version, "conf": dataclasses.asdict(conf),
            "checkpoints": [p.relative_to(tmp).as_posix() for p in ckpts],
            "heldout": "heldout.jsonl", "ood": {k: f"ood/{k}.jsonl" for k in ood_texts},
            "seconds": seconds,
            "stats": {"train_files": len(train_texts), "train_chars": sum(map(len, train_texts)),
                      "train_tokens": tokens.numel(), "heldout_files": len(heldout_texts),
                      "heldout_chars": sum(map(len, heldout_texts)),
                      "ood_docs": {k: len(v) for k, v in ood_texts.items()}},
        }
        atomic_write_json(tmp / MARKER, meta)  # last: its presence means the folder is whole
    return Trajectory(root=root, checkpoints=[root / c for c in meta["checkpoints"]],
                      heldout=root / "heldout.jsonl", ood={k: root / v for k, v in meta["ood"].items()},
                      seconds=seconds, cached=False)
