"""What a run is called: its experiment name (from what it merges) and a sweep point's folder name.

Both are deterministic, so a requeued or re-run job finds its own folder, and
both are one path component, so folders never nest. They are Hydra resolvers
(``lm_experiment``, ``lm_dirname``) registered by ``config.register_configs``.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["run_dirname", "experiment_name"]


def run_dirname(overrides: str, limit: int = 180) -> str:
    """A sweep point's folder name from its overrides: one path component, deterministic.

    A path in an override (``checkpoints.sources=[/ckpts/run1]``) is shortened
    to its last component, so folders never nest; then, or when the name is
    over ``limit`` characters, a hash of the full overrides is appended, so two
    points never share a folder.
    """
    import hashlib
    import re

    name = re.sub(r"[^=,\[\]]*/([^=,\[\]/]+)", r"\1", overrides).replace("/", "_") or "default"
    if name != overrides or len(name) > limit:
        name = f"{name[:limit - 13]}-{hashlib.sha1(overrides.encode()).hexdigest()[:12]}"
    return name


#: Folder names that say "checkpoints live here", not which run they are: skipped when naming a run.
_GENERIC_DIRS = frozenset({
    "checkpoints", "checkpoint", "ckpts", "ckpt", "outputs", "output", "out", "models", "model", "weights",
    "saved", "save", "saves", "results", "hf", "huggingface", "lightning_logs", "snapshots", "hub", "merged",
    "final", "last", "latest", "best", "tmp"})
#: One checkpoint of a series (HF Trainer checkpoint-500, step900, torchtitan step-100, Megatron iter_0001000,
#: Lightning epoch=0-step=100.ckpt, version_0) or a commit hash (a hub cache snapshot).
_STEP_NAME = r"(?i)((checkpoint|ckpt|global_step|step|iter|iteration|epoch|version)[-_=]?\d+\S*|\d+|[0-9a-f]{40})"
_CKPT_FILE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp")
_HUB_SPEC = r"(hf://)?[\w.-]+/[\w.-]+(@[\w./-]+)?"


def _source_name(source: str) -> str | None:
    """The run a source belongs to: its hub repo's name, or its nearest folder that is not generic."""
    import os
    import re

    s = str(source).strip()
    local = os.path.expanduser(s)
    if re.fullmatch(_HUB_SPEC, s) and not os.path.exists(local):
        return s.removeprefix("hf://").partition("@")[0].split("/")[1]
    parts = [p for p in os.path.abspath(local).split(os.sep) if p]
    if parts and parts[-1].lower().endswith(_CKPT_FILE):
        parts.pop()  # a checkpoint file: the run is the folder it is in
    for i in range(len(parts) - 1, 0, -1):  # the embedded demo's cached trajectory (a recipe's sources)
        if parts[i - 1] == "demo" and os.path.isfile(os.path.join(os.sep, *parts[:i + 1], "trajectory.json")):
            return "tiny"
    for part in reversed(parts):
        if part.startswith("models--"):  # the HF hub cache: models--org--name/snapshots/<commit>
            return part.split("--")[-1]
        if part.lower() not in _GENERIC_DIRS and not re.fullmatch(_STEP_NAME, part):
            return part
    return parts[-1] if parts else None


def experiment_name(sources: Any = (), recipe: Optional[str] = None, default: str = "tiny") -> str:
    """The experiment a run is named after when none is given: what it merges.

    ``outputs/<experiment>/<search.name>`` and the titles of the report and the
    model card use it, so a run on one's own checkpoints must not be filed as
    the demo (``tiny``). Each source is named by its run folder: the nearest
    folder that is neither generic (``checkpoints``, ``ckpts``, ``outputs``, ...)
    nor one checkpoint of the series (``checkpoint-500``, ``step900``,
    ``step-100``, a file), or its hub repo's name. Different runs are joined
    with ``+``. The result is one safe path component (unsafe characters become
    ``_``; a long name is cut and given a hash). No sources (the embedded demo)
    gives ``default``; a ``merge.recipe`` with no sources is named by the
    sources it records.
    """
    import hashlib
    import re

    if isinstance(sources, str):
        sources = [sources]
    sources = [str(s) for s in (sources or [])]
    if not sources and recipe:
        sources = _recipe_sources(recipe)
    names: list[str] = []
    for s in sources:
        n = _source_name(s)
        n = re.sub(r"[^A-Za-z0-9._+-]+", "_", n or "").strip("._-")
        if n and n not in names:
            names.append(n)
    if not names:
        return default
    name = "+".join(names)
    if len(name) > 80:
        name = f"{name[:67].rstrip('+')}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def _recipe_sources(recipe: str) -> list[str]:
    """The sources a ``merge.yaml`` records; none when it cannot be read (the run refuses it later, by name)."""
    import os

    import yaml

    try:
        with open(os.path.expanduser(str(recipe)), encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        return [str(s) for s in data.get("sources") or []] if isinstance(data, dict) else []
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return []


def _lm_experiment(sources: Any = None, recipe: Any = None) -> str:
    """The ``lm_experiment`` resolver (``experiment: ${lm_experiment:${checkpoints.sources},${merge.recipe}}``)."""
    from omegaconf import ListConfig, OmegaConf

    if isinstance(sources, ListConfig):
        sources = OmegaConf.to_container(sources, resolve=True)
    return experiment_name(sources, recipe or None)


def _lm_run(mode: Any = "search", search_name: Any = "paper") -> str:
    """The run folder's last part: the search's name (``paper``), or ``watch`` for the watch service
    (``watch-<name>`` for another optimizer), so a watch never shares a folder with a search run."""
    if str(mode) != "watch":
        return str(search_name)
    return "watch" if str(search_name) == "paper" else f"watch-{search_name}"
