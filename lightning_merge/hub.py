"""Hub model sources: ``org/name@revision`` resolved to a folder in the Hugging Face cache.

Intermediate checkpoints are often published as revisions of one Hub repo
(``EleutherAI/pythia-410m@step140000``, ``baichuan-inc/Baichuan2-7B-Intermediate-Checkpoints@train_02200B``).
This module turns such a spec into the local snapshot folder that
``huggingface_hub`` lays out (``snapshots/<commit>/``, pointed to by
``refs/<revision>``), so the rest of the code sees an ordinary HF model folder.

The cache is tried first and without any network call: jobs on compute nodes
are usually offline, and every rank may resolve the same source. Only when the
revision is not cached, and offline mode is off, is the Hub contacted. Every
failure becomes a :class:`HubSourceError` that names the repo, the revision,
the cache folder and what to run to fix it.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["HubSourceError", "parse_hub_source", "resolve_hub_source", "MODEL_PATTERNS"]

#: What a model needs: config/tokenizer JSON, weights (+ index), sentencepiece/vocab/merges
#: files, remote code and chat templates. Everything else in a repo (logs, images,
#: optimizer states saved as *.pt) is never downloaded.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]
_HF_PREFIX = "hf://"
# Hub repo names: letters, digits, '-', '_', '.'; no '--' or '..'; not starting or ending with '-' or '.'.
_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_.\-/]+$")
_PROBE_TIMEOUT_S = 10.0


class HubSourceError(CheckpointError):
    """A Hub source cannot be parsed or resolved; the message names repo, revision and cache."""


def parse_hub_source(s: str) -> tuple[str, str] | None:
    """``"org/name@rev"`` or ``"hf://org/name@rev"`` -> ``("org/name", "rev")``; no ``@rev`` means ``main``.

    Returns ``None`` for anything that does not look like a Hub model spec
    (absolute or ``./``/``~`` paths, more than one ``/`` in the repo part, bad
    characters), so the caller can report it as a missing local path instead.
    The caller checks local paths first: an existing folder always wins. An
    explicit ``hf://`` prefix says the user meant the Hub, so a malformed one
    raises :class:`HubSourceError` rather than falling back to "no such path".
    """
    s = str(s).strip()
    explicit = s.startswith(_HF_PREFIX)
    body = s[len(_HF_PREFIX):] if explicit else s
    repo, sep, revision = body.partition("@")
    if not sep:
        revision = "main"
    parts = repo.split("/")
    ok = (len(parts) == 2 and all(_NAME.match(p) for p in parts)
          and bool(_REVISION.match(revision)) and ".." not in revision
          and not revision.startswith("/") and not revision.endswith("/"))
    if ok:
        return repo, revision
    if explicit:
        raise HubSourceError(f"{s!r}: not a Hub model spec; expected hf://org/name or hf://org/name@revision "
                             f"(datasets, spaces and paths inside a repo are not supported)")
    return None


def _patterns(files: list[str] | None) -> list[str]:
    """Drop ``*.bin`` when the revision has safetensors, so a repo holding both is not fetched twice.

    The same rule must be applied offline (to the cached listing) as online: the
    cache counts as complete only for the patterns it was downloaded with.
    """
    if files and any(f.endswith(".safetensors") for f in files):
        return [p for p in MODEL_PATTERNS if p != "*.bin"]
    return list(MODEL_PATTERNS)


def _fix_hint(repo: str, revision: str, cache: Path, explicit: bool) -> str:
    where = ("pass a cache_dir that holds it" if explicit else
             "set HF_HUB_CACHE to a cache folder that holds it (or HF_HOME to the folder above its hub/)")
    return (f"To fix: on a machine with network run `hf download {repo} --revision {revision} "
            f"--cache-dir {cache}` and copy that folder here, or {where}")


def resolve_hub_source(repo: str, revision: str, cache_dir: str | Path | None = None) -> Path:
    """Return the local snapshot folder of ``repo`` at ``revision`` (an HF model folder).

    Order: the cache only (``local_files_only``, no network call); then, unless
    offline mode is on (``HF_HUB_OFFLINE``), the Hub, downloading only
    :data:`MODEL_PATTERNS` into ``cache_dir`` (default: ``HF_HUB_CACHE``). A
    cached ``main`` is used as is, without asking the Hub whether it moved: pin a
    tag or commit if that matters. Raises :class:`HubSourceError` if the revision
    is neither cached nor downloadable, or the snapshot holds no model.
    """
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import (CachedRepoTreeNotFoundError, GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()
    where = f"{repo}@{revision}"
    hint = _fix_hint(repo, revision, cache, explicit=cache_dir is not None)
    stage = "cache"
    try:
        # 1. Cache only. Filtered with the patterns it was downloaded with (see _patterns).
        try:
            cached = [f.path for f in get_cached_repo_tree(repo, revision=revision, cache_dir=cache)]
        except CachedRepoTreeNotFoundError:
            cached = None
        try:
            folder = snapshot_download(repo, revision=revision, cache_dir=cache,
                                       allow_patterns=_patterns(cached), local_files_only=True)
            return _checked(Path(folder), where)
        except LocalEntryNotFoundError as e:  # includes IncompleteSnapshotError
            local_error = e
        if constants.is_offline_mode():
            raise HubSourceError(
                f"{where}: not in the local Hugging Face cache {cache} ({local_error.__class__.__name__}), "
                f"and offline mode is on (HF_HUB_OFFLINE=1), so the Hub was not asked. "
                f"{hint}; or unset HF_HUB_OFFLINE to download it.") from local_error

        # 2. The Hub. One bounded call first: the shared HTTP client has no timeout, so an
        #    unreachable (not refusing) endpoint would otherwise hang; it also lists the files.
        stage = "hub"
        info = HfApi().model_info(repo, revision=revision, timeout=_PROBE_TIMEOUT_S)
        files = [s.rfilename for s in info.siblings or []]
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=_patterns(files))
        return _checked(Path(folder), where)
    except HubSourceError:
        raise
    except HFValidationError as e:
        raise HubSourceError(f"{where}: not a valid Hub repo id or revision ({e})") from e
    except RevisionNotFoundError as e:
        raise HubSourceError(f"{where}: the Hub has repo {repo} but no revision {revision!r} "
                             f"(check the branch or tag name in the repo's 'Files and versions' tab)") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubSourceError(f"{where}: repo {repo} not found on the Hub, or private/gated and no valid token "
                             f"(run `hf auth login` or set HF_TOKEN); if {repo} was meant as a local folder, "
                             f"it does not exist") from e
    except Exception as e:  # connection refused/reset, timeouts, DNS, Hub 5xx, disk errors
        if stage == "cache":
            raise HubSourceError(f"{where}: cannot read the Hugging Face cache {cache}: "
                                 f"{e.__class__.__name__}: {_first_line(e)}") from e
        raise HubSourceError(
            f"{where}: not in the local Hugging Face cache {cache}, and downloading it from the Hub "
            f"({constants.ENDPOINT}) failed: {e.__class__.__name__}: {_first_line(e)}. "
            f"Is this machine offline? {hint}.") from e


def _checked(folder: Path, where: str) -> Path:
    """Refuse a snapshot without ``config.json`` or weights, naming what it does hold."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) and n != "training_args.bin"]
    if "config.json" not in names or not weights:
        raise HubSourceError(f"{where}: snapshot {folder} is not a model folder (needs config.json and "
                             f"*.safetensors or *.bin weights at the top level; found {names[:12]})")
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)
