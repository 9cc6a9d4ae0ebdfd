"""Hub sources, tested offline against a cache laid out by huggingface_hub itself.

There is no internet here, so a tiny HTTP server on 127.0.0.1 mimics the few Hub
endpoints ``snapshot_download`` uses (revision info, tree listing, HEAD/GET on
``/resolve/``) and serves two revisions of a real tiny Llama. huggingface_hub
downloads them into a temp cache (blobs/, snapshots/<sha>/, refs/<rev>). The
server is then stopped, and every assertion runs against that cache alone.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file

import huggingface_hub
from huggingface_hub import constants

from lightning_merge.checkpoints import CheckpointError
from lightning_merge.hub import HubSourceError, parse_hub_source, resolve_hub_source

REPO = "org/tiny"


def _tiny_llama(path: Path, seed: int, tokenizer) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


class _FakeHub(BaseHTTPRequestHandler):
    """The Hub endpoints snapshot_download needs, over ``revisions[rev] = (sha, {filename: bytes})``."""

    revisions: dict[str, tuple[str, dict[str, bytes]]] = {}
    log: list[str] = []
    timeout = 5  # a stuck client cannot hold a handler thread forever

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _lookup(self, repo: str, rev: str):
        if repo != REPO:
            self._send(404, headers={"X-Error-Code": "RepoNotFound"})
            return None
        for name, (sha, files) in self.revisions.items():
            if rev in (name, sha):
                return sha, files
        self._send(404, headers={"X-Error-Code": "RevisionNotFound"})
        return None

    def do_GET(self):
        self.log.append(f"{self.command} {self.path}")
        path = unquote(urlsplit(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            found = self._lookup("/".join(parts[2:4]), "/".join(parts[5:]))
            if found is None:
                return
            sha, files = found
            if parts[4] == "revision":  # GET /api/models/{repo}/revision/{rev}
                return self._json({"id": REPO, "sha": sha, "private": False,
                                   "siblings": [{"rfilename": f} for f in sorted(files)]})
            entries = []  # GET /api/models/{repo}/tree/{sha}?recursive=...
            for f, data in sorted(files.items()):
                e = {"type": "file", "path": f, "size": len(data),
                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                if f.endswith(".safetensors"):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._json(entries)
        if len(parts) >= 5 and parts[2] == "resolve":  # HEAD/GET /{repo}/resolve/{rev}/{file}
            found = self._lookup("/".join(parts[:2]), parts[3])
            if found is None:
                return
            sha, files = found
            name = "/".join(parts[4:])
            if name not in files:
                return self._send(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            data = files[name]
            return self._send(200, data, {"X-Repo-Commit": sha,
                                          "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"})
        self._send(404)

    do_HEAD = do_GET


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer):
    """Serve step100/step200 of org/tiny, let huggingface_hub download both, then stop the server."""
    root = tmp_path_factory.mktemp("hub")
    served, revisions = {}, {}
    for seed, rev in enumerate(("step100", "step200")):
        src = root / "src" / rev
        served[rev] = _tiny_llama(src, seed, tokenizer)
        files = {p.name: p.read_bytes() for p in src.iterdir()}
        files["pytorch_model.bin"] = b"a stale .bin duplicate: must not be downloaded"
        files["logs/optimizer.pt"] = b"not part of a model"
        revisions[rev] = (hashlib.sha1(rev.encode()).hexdigest(), files)
    handler = type("Hub", (_FakeHub,), {"revisions": revisions, "log": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    cache = root / "cache"
    online, errors = {}, {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(constants, "HF_HUB_OFFLINE", False)
            # huggingface_hub 2.4 also GETs {ENDPOINT}/api/agent-harnesses and caches it in HF_HOME.
            mp.setattr(constants, "AGENT_HARNESSES_PATH", str(root / "agent_harnesses.json"), raising=False)
            mp.setattr(constants, "ENDPOINT", url)
            mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
            for rev in ("step100", "step200"):
                online[rev] = resolve_hub_source(REPO, rev, cache)
            for repo, rev in ((REPO, "step999"), ("org/missing", "main")):
                with pytest.raises(HubSourceError) as ei:
                    resolve_hub_source(repo, rev, cache)
                errors[repo, rev] = str(ei.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        huggingface_hub.close_session()  # drop pooled connections to the dead server
    return {"cache": cache, "url": url, "served": served, "revisions": revisions, "online": online,
            "errors": errors, "log": list(handler.log)}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_parse_hub_source():
    assert parse_hub_source("EleutherAI/pythia-410m@step140000") == ("EleutherAI/pythia-410m", "step140000")
    assert parse_hub_source("baichuan-inc/Baichuan2-7B-Intermediate-Checkpoints@train_02200B") == (
        "baichuan-inc/Baichuan2-7B-Intermediate-Checkpoints", "train_02200B")
    assert parse_hub_source("hf://org/tiny@step100") == ("org/tiny", "step100")
    assert parse_hub_source("org/tiny") == ("org/tiny", "main")
    assert parse_hub_source("hf://org/tiny") == ("org/tiny", "main")
    assert parse_hub_source("org/tiny@refs/pr/4") == ("org/tiny", "refs/pr/4")
    for not_hub in ("/abs/path", "/abs/path@x", "./x", "./x/y", "../x/y", "~", "~/x", "~/x/y", "a/b/c",
                    "a/b/c@rev", "x", "", "org/tiny@", "org/ti ny", "org//tiny", "org/tiny@a b",
                    "org/.hidden", "org/tiny@../x", "C:\\models\\x"):
        assert parse_hub_source(not_hub) is None, not_hub
    for bad in ("hf://a/b/c", "hf://datasets/org/x", "hf://x", "hf://org/tiny@"):
        with pytest.raises(HubSourceError, match="not a Hub model spec"):
            parse_hub_source(bad)
    assert issubclass(HubSourceError, CheckpointError)


def test_cache_laid_out_by_huggingface_hub(hub):
    store = hub["cache"] / "models--org--tiny"
    for rev, (sha, _) in hub["revisions"].items():
        assert (store / "refs" / rev).read_text() == sha
        assert hub["online"][rev] == store / "snapshots" / sha
    assert any((store / "blobs").iterdir())
    # Only model files came down: the .bin duplicate (safetensors exist) and logs/ were skipped.
    got = {p.name for p in hub["online"]["step100"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= got
    assert "pytorch_model.bin" not in got and "logs" not in got
    assert not any("pytorch_model.bin" in line or "optimizer.pt" in line for line in hub["log"])


def test_resolve_offline_from_cache(hub, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for rev in ("step100", "step200"):
        folder = resolve_hub_source(REPO, rev, hub["cache"])
        assert hub["cache"].resolve() in folder.resolve().parents
        weights = load_file(folder / "model.safetensors")
        for k, v in weights.items():
            assert torch.equal(v, hub["served"][rev][k]), (rev, k)
        folders[rev] = folder
    assert folders["step100"] != folders["step200"]
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(load_file(folders["step100"] / "model.safetensors")[w],
                           load_file(folders["step200"] / "model.safetensors")[w])
    model = AutoModelForCausalLM.from_pretrained(folders["step200"])
    assert torch.equal(model.state_dict()[w], hub["served"]["step200"][w])
    AutoTokenizer.from_pretrained(folders["step200"])


def test_cached_revision_needs_no_network(hub, monkeypatch):
    """Offline mode off, server dead: a cached revision still resolves (the cache is tried first)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub["url"])
    assert resolve_hub_source(REPO, "step100", hub["cache"]) == hub["online"]["step100"]


def test_not_cached_and_offline_says_so(tmp_path, offline):
    empty = tmp_path / "empty"
    t0 = time.monotonic()
    with pytest.raises(HubSourceError) as ei:
        resolve_hub_source(REPO, "step300", empty)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    for part in (REPO, "step300", "not in the local Hugging Face cache", str(empty.resolve()), "HF_HUB_OFFLINE",
                 f"hf download {REPO} --revision step300", "cache_dir"):
        assert part in msg, (part, msg)


def test_interrupted_download_is_not_taken_for_a_model(hub, tmp_path, offline):
    """A snapshot missing a file its cached tree lists is refused, not half-loaded."""
    import shutil

    cache = tmp_path / "partial"
    shutil.copytree(hub["cache"], cache, symlinks=True)
    sha = hub["revisions"]["step100"][0]
    (cache / "models--org--tiny" / "snapshots" / sha / "model.safetensors").unlink()
    with pytest.raises(HubSourceError, match=r"org/tiny@step100: not in the local .*IncompleteSnapshotError"):
        resolve_hub_source(REPO, "step100", cache)
    assert resolve_hub_source(REPO, "step200", cache).name == hub["revisions"]["step200"][0]


def test_default_cache_is_hf_hub_cache(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(HubSourceError, match=r"org/tiny@main: not in the local Hugging Face cache .*hf_cache.*"
                                             r"set HF_HUB_CACHE"):
        resolve_hub_source(REPO, "main")


def test_not_cached_and_hub_unreachable_fails_fast(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub["url"])  # the stopped server: connection refused
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub["url"] + "/{repo_id}/resolve/{revision}/{filename}")
    empty = tmp_path / "empty"
    t0 = time.monotonic()
    with pytest.raises(HubSourceError) as ei:
        resolve_hub_source(REPO, "step300", empty)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    for part in (REPO, "step300", "not in the local Hugging Face cache", str(empty.resolve()), hub["url"],
                 "failed", f"hf download {REPO} --revision step300"):
        assert part in msg, (part, msg)


def test_hub_errors_name_repo_and_revision(hub):
    assert "no revision 'step999'" in hub["errors"][REPO, "step999"]
    assert "org/tiny@step999" in hub["errors"][REPO, "step999"]
    missing = hub["errors"]["org/missing", "main"]
    assert "org/missing@main" in missing and "not found on the Hub" in missing
