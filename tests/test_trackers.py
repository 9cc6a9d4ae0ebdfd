"""Experiment trackers (``report.loggers``), read back with each backend's own reader.

One module fixture logs a two-session run (the second session resumes the
first after a "crash") to all four backends, with W&B offline and its server
address pointed at a local socket that counts connections, so any network
attempt would show. The tests then read it back: ``metrics.csv`` with the csv
module, the TensorBoard event files with TensorBoard's ``EventAccumulator``,
the W&B ``.wandb`` transaction log parsed into wandb's own protobuf
``Record`` messages, and the MLflow file store through ``MlflowClient``.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from lightning_merge.trackers import BACKENDS, Trackers, metric_name, wandb_mode

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

SOURCES = ["ckpt-1000", "ckpt 2000, final [ü]"]  # the second one needs metric_name
RESULTS = {"best": {"heldout_loss": 1.0, "ood_loss": {"code": 3.0}, "weights": [0.25, 0.75]},
           "candidates": [{"name": "ckpt-1000", "kind": "checkpoint", "heldout_loss": 2.5, "ood_loss": {"code": 4.5}},
                          {"name": "ckpt-2000", "kind": "checkpoint", "heldout_loss": 2.0, "ood_loss": {"code": 4.0}},
                          {"name": "LAWA", "kind": "baseline", "heldout_loss": 1.5},
                          {"name": "EMA", "kind": "baseline", "heldout_loss": 1.75},
                          {"name": "best merge", "kind": "search", "heldout_loss": 1.0}],
           "seconds": {"search": 3.0, "write merged model": 0.5}, "trials": 4, "gain_vs_last_percent": 50.0}
TABLE = [{"name": "LAWA", "loss": 1.5}, {"name": "EMA", "loss": 1.75, "weights": [0.5, 0.5]}]


def _trial(i: int, loss: float, origin: str) -> dict:
    return {"trial": i, "status": "completed", "weights": [0.25, 0.75], "objective": loss, "heldout_loss": loss,
            "origin": origin, "seconds": 1.5}


class _Listener:
    """A local TCP socket that counts connections: W&B's server address points here during the run."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two sessions of one run on all backends; the second resumes the first (same save_dir and run_name)."""
    root = tmp_path_factory.mktemp("trackers")
    from PIL import Image

    png = root / "objective.png"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(png)
    listener = _Listener()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY",
                    "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_BASE_URL", listener.url)
        mp.setenv("NETRC", str(root / "no-netrc"))
        for var, sub in (("WANDB_CONFIG_DIR", "wb-config"), ("WANDB_CACHE_DIR", "wb-cache"),
                         ("WANDB_DATA_DIR", "wb-data")):
            mp.setenv(var, str(root / sub))
        mp.setattr("builtins.input", lambda *a: pytest.fail("a tracker prompted for input"))
        save = root / "trackers"
        ids = []
        # session 1: hparams, trials (one failed), an image, a table; then it is preempted
        tr = Trackers(list(BACKENDS), save, run_name="tiny/paper", experiment="tiny", strict=True)
        ids.append(dict(tr.ids))
        tr.log_hparams({"search": {"alpha": 0.5, "name": "paper"}, "seed": 1})
        tr.log_trial(_trial(0, 3.0, "baseline:LAWA"), step=1, last_loss=4.0, source_names=SOURCES)
        tr.log_trial({**_trial(1, 9.9, "ei"), "status": "failed"}, step=2, last_loss=4.0, source_names=SOURCES)
        tr.log_trial(_trial(2, 2.0, "ei"), step=3, last_loss=4.0, source_names=SOURCES)
        tr.log_images([png], step=3)
        tr.log_table("candidates", TABLE, step=3)
        tr.finalize("preempted")
        statuses = [_mlflow_status(tr)]
        # session 2: the resumed run; hparams again (skipped), one more trial, the summary
        tr = Trackers(list(BACKENDS), save, run_name="tiny/paper", experiment="tiny", strict=True)
        ids.append(dict(tr.ids))
        resumed = tr.resumed
        tr.log_hparams({"search": {"alpha": 0.9, "name": "other"}, "seed": 2})
        tr.log_trial(_trial(3, 1.0, "gp_hedge"), step=11, last_loss=4.0, source_names=SOURCES)
        tr.log_summary(RESULTS, step=12)
        statuses.append(_mlflow_status(tr))
        tr.finalize()
    listener.sock.close()
    return {"save": save, "ids": ids, "resumed": resumed, "connections": listener.connections,
            "mlflow_statuses": statuses}


def _mlflow_status(tr: Trackers) -> str:
    lg = tr.loggers["mlflow"]
    return lg.experiment.get_run(lg.run_id).info.status


# --- CSV -----------------------------------------------------------------------------------------

def test_csv_metrics_and_table(run):
    folders = list((run["save"] / "csv").iterdir())
    assert sorted(p.name for p in folders) == ["candidates.csv", "tiny_paper"]  # one version folder for both sessions
    with (run["save"] / "csv" / "tiny_paper" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    trials = [r for r in rows if r["trial/objective"]]
    assert [int(r["step"]) for r in trials] == [1, 3, 11]  # the failed trial logs no metrics
    assert [float(r["trial/objective"]) for r in trials] == [3.0, 2.0, 1.0]
    assert [float(r["trial/gain_vs_last_percent"]) for r in trials] == [25.0, 50.0, 75.0]
    assert [float(r["trial/is_baseline"]) for r in trials] == [1.0, 0.0, 0.0]
    assert float(trials[0]["trial/weight/ckpt-1000"]) == 0.25
    assert float(trials[0]["trial/weight/ckpt 2000_ final ___"]) == 0.75
    summary = [r for r in rows if r["run/best_loss"]]
    assert len(summary) == 1 and int(summary[0]["step"]) == 12
    s = {k: float(v) for k, v in summary[0].items() if k.startswith("run/") and v}
    assert s == {"run/best_loss": 1.0, "run/last_checkpoint_loss": 2.0, "run/best_baseline_loss": 1.5,
                 "run/gain_vs_last_percent": 50.0, "run/trials": 4.0, "run/ood/code/best_loss": 3.0,
                 "run/ood/code/last_checkpoint_loss": 4.0, "run/seconds/search": 3.0,
                 "run/seconds/write merged model": 0.5}
    with (run["save"] / "csv" / "candidates.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert table == [{"name": "LAWA", "loss": "1.5", "weights": ""},
                     {"name": "EMA", "loss": "1.75", "weights": "[0.5, 0.5]"}]
    hparams = (run["save"] / "csv" / "tiny_paper" / "hparams.yaml").read_text()
    assert "search/alpha: 0.5" in hparams and "0.9" not in hparams  # logged once, in the first session


# --- TensorBoard ---------------------------------------------------------------------------------

def test_tensorboard_scalars_image_text(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run["save"] / "tensorboard").iterdir()
    assert version.name == "tiny_paper" and len(list(version.glob("events.out.tfevents.*"))) == 2  # 2 sessions
    acc = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("trial/objective")]
    assert got == [(1, 3.0), (3, 2.0), (11, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("trial/gain_vs_last_percent")] == [(1, 25.0), (3, 50.0), (11, 75.0)]
    assert [(e.step, e.value) for e in acc.Scalars("run/best_baseline_loss")] == [(12, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("run/ood/code/last_checkpoint_loss")] == [(12, 4.0)]
    (img,) = acc.Images("plots/objective")
    assert (img.step, img.width, img.height) == (3, 8, 6)
    (table,) = acc.Tensors("candidates/text_summary")
    text = table.tensor_proto.string_val[0].decode()
    assert table.step == 3 and "| name | loss | weights |" in text and "| EMA | 1.75 | [0.5, 0.5] |" in text
    origins = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("trial/origin/text_summary")]
    assert origins == ["trial 0: baseline:LAWA", "trial 2: ei", "trial 3: gp_hedge"]


# --- W&B -----------------------------------------------------------------------------------------

def _wandb_records(path: Path):
    """The records of a ``.wandb`` transaction log, as wandb's own protobuf ``Record`` messages.

    wandb >= 0.2x no longer ships a Python reader, so this reads the framing (the
    LevelDB log format wandb-core writes: a 7-byte ``:W&B`` header, then 32 KiB
    blocks of chunks with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_history(path: Path):
    out, config, run_ids = [], {}, []
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            run_ids.append(rec.run.run_id)
    return out, config, run_ids


def test_wandb_offline_run_values(run):
    assert run["connections"] == 0  # nothing reached for the W&B server
    folders = sorted(glob.glob(str(run["save"] / "wandb" / "offline-run-*")))
    assert len(folders) == 2  # one offline folder per session ...
    run_id = run["ids"][0]["wandb_id"]
    assert all(f.endswith(f"-{run_id}") for f in folders)  # ... of the same run
    rows, config, seen_ids = [], {}, []
    for f in folders:
        h, c, ids = _wandb_history(Path(f) / f"run-{run_id}.wandb")
        rows, seen_ids = rows + h, seen_ids + ids
        config.update(c)
    assert set(seen_ids) == {run_id}
    assert config["search/alpha"] == 0.5 and config["search/name"] == "paper" and config["seed"] == 1
    trials = [r for r in rows if "trial/objective" in r]
    assert [(r["trainer/global_step"], r["trial/objective"], r["trial/origin"]) for r in trials] == \
        [(1, 3.0, "baseline:LAWA"), (3, 2.0, "ei"), (11, 1.0, "gp_hedge")]
    assert trials[2]["trial/weight/ckpt 2000_ final ___"] == 0.75 and trials[2]["trial/gain_vs_last_percent"] == 75.0
    (summary,) = [r for r in rows if "run/best_loss" in r]
    assert summary["trainer/global_step"] == 12 and summary["run/last_checkpoint_loss"] == 2.0
    assert summary["run/seconds/write merged model"] == 0.5
    (table_row,) = [r for r in rows if "candidates/_type" in r]
    table = json.loads((Path(folders[0]) / "files" / table_row["candidates/path"]).read_text())
    assert table["columns"] == ["name", "loss", "weights"]
    assert table["data"] == [["LAWA", 1.5, None], ["EMA", 1.75, "[0.5, 0.5]"]]
    (image_row,) = [r for r in rows if "plots/objective/_type" in r]
    assert image_row["trainer/global_step"] == 3
    assert (Path(folders[0]) / "files" / image_row["plots/objective/filenames"][0]).is_file()


def test_wandb_mode_never_online_without_credentials(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode() == "online"  # `wandb login` wrote credentials
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # what WandbLogger(offline=True) itself sets
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")  # asked for online, nothing to log in with: refused, no prompt
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        Trackers(["csv", "wandb"], tmp_path / "t", "r", "e")  # the CSV logger that did start is closed


# --- MLflow --------------------------------------------------------------------------------------

def test_mlflow_metrics_params_artifacts(run):
    from mlflow.tracking import MlflowClient

    ids = run["ids"]
    assert ids[0]["mlflow_run_id"] == ids[1]["mlflow_run_id"]
    uri = ids[0]["mlflow_tracking_uri"]
    assert uri == (run["save"] / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (r,) = client.search_runs([exp.experiment_id])  # one run across both sessions
    assert r.info.run_id == ids[0]["mlflow_run_id"] and r.info.status == "FINISHED"
    assert run["mlflow_statuses"] == ["KILLED", "RUNNING"]  # preempted, then running again once resumed
    assert r.info.run_name == "tiny/paper"
    hist = client.get_metric_history(r.info.run_id, "trial/objective")
    assert sorted((m.step, m.value) for m in hist) == [(1, 3.0), (3, 2.0), (11, 1.0)]
    hist = client.get_metric_history(r.info.run_id, "trial/weight/ckpt 2000_ final ___")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.75), (3, 0.75), (11, 0.75)]
    hist = client.get_metric_history(r.info.run_id, "run/best_baseline_loss")
    assert [(m.step, m.value) for m in hist] == [(12, 1.5)]
    assert r.data.params == {"search/alpha": "0.5", "search/name": "paper", "seed": "1"}
    assert r.data.tags["trial/0/origin"] == "baseline:LAWA" and r.data.tags["trial/3/origin"] == "gp_hedge"
    assert [a.path for a in client.list_artifacts(r.info.run_id, "plots")] == ["plots/objective.png"]
    assert [a.path for a in client.list_artifacts(r.info.run_id, "tables")] == ["tables/candidates.json"]
    local = Path(client.download_artifacts(r.info.run_id, "tables/candidates.json", str(run["save"].parent)))
    assert json.loads(local.read_text()) == {"step": 3, "columns": ["name", "loss", "weights"],
                                             "data": [["LAWA", 1.5, None], ["EMA", 1.75, "[0.5, 0.5]"]]}


def test_resume_continues_the_same_runs(run):
    first, second = run["ids"]
    assert run["resumed"]
    for key in ("csv_version", "tensorboard_version", "wandb_id", "mlflow_run_id"):
        assert first[key] == second[key], key
    saved = json.loads((run["save"] / "run_ids.json").read_text())
    assert list(saved) == ["tiny/paper"] and saved["tiny/paper"]["hparams_logged"] is True
    assert saved["tiny/paper"]["wandb_id"] == first["wandb_id"]


# --- names, errors, no-op, steps -----------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("trial/objective", "trial/objective"),
    ("loss, 10% [ood]=ü", "loss_ 10_ _ood___"),
    ("/a//b/ ", "a/b"),
    ("../x/./y", "__/x/_/y"),
    ("time: s", "time_ s"),
    ("", "_"),
])
def test_metric_name_exact(raw, want):
    assert metric_name(raw) == want


def test_metric_names_valid_for_mlflow_and_lightning():
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    names = ["loss, 10% [ood]=ü", "weights (a,b)", "naïve/日本語", "a\tb\nc", "..", "/lead", "x" * 400,
             "run/ood/code/best_loss", "trial/weight/ckpt 2000, final [ü]", "#$@!"]
    for raw in names:
        name = metric_name(raw)
        _validate_metric_name(name)
        _validate_param_name(name)
        assert re.sub("[^a-zA-Z0-9_/. -]+", "", name) == name  # what MLFlowLogger would otherwise strip
        assert metric_name(raw) == name and len(name) <= 250
    assert metric_name("x" * 400) != metric_name("x" * 401)  # a cut name keeps a hash of the whole


def test_unknown_backend_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as e:
        Trackers(["csv", "neptune"], tmp_path / "t", "r", "e")
    assert "report.loggers" in str(e.value) and "'neptune'" in str(e.value)
    assert "csv, tensorboard, wandb, mlflow" in str(e.value)
    import lightning_merge.trackers as trackers

    real = trackers.find_spec
    monkeypatch.setattr(trackers, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r"pip install wandb"):
        Trackers(["wandb"], tmp_path / "t", "r", "e")
    assert not (tmp_path / "t").exists()  # refused before anything is written


def test_empty_is_a_noop(tmp_path):
    tr = Trackers([], tmp_path / "t", "r", "e")
    assert not tr.enabled
    tr.log_hparams({"a": 1})
    tr.log_metrics({"a": 1.0}, step=0)
    tr.log_trial(_trial(0, 1.0, "ei"), 0, 2.0, ["a", "b"])
    tr.log_summary(RESULTS, 1)
    tr.log_images([tmp_path / "none.png"], 1)
    tr.log_table("t", TABLE, 1)
    tr.finalize()
    assert list(tmp_path.iterdir()) == []


def test_steps_backwards_and_non_finite(tmp_path, caplog):
    tr = Trackers(["csv"], tmp_path, "r", "e", strict=True)
    tr.log_metrics({"a": 1.0, "nan": math.nan, "inf": math.inf, "text": "x", "none": None}, step=5)
    with caplog.at_level(logging.WARNING, logger="lightning_merge.trackers"):
        tr.log_metrics({"a": 2.0}, step=3)  # backwards: logged at 5, warned once
        tr.log_metrics({"a": 3.0}, step=4)
    tr.log_metrics({"a": 4.0}, step=6)
    tr.finalize()
    assert sum("step went back" in r.message for r in caplog.records) == 1
    with (tmp_path / "csv" / "r" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["step"]), float(r["a"])) for r in rows] == [(5, 1.0), (5, 2.0), (5, 3.0), (6, 4.0)]
    assert set(rows[0]) == {"a", "step"}
    assert not tr.enabled
    tr.log_metrics({"a": 5.0}, step=7)  # after finalize: a no-op


def test_a_failing_backend_warns_once_and_the_others_go_on(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trackers(["csv", "tensorboard"], tmp_path, "r", "e")
    (tmp_path / "csv" / "t.csv").mkdir()  # the CSV table cannot be written where a folder stands
    with caplog.at_level(logging.WARNING, logger="lightning_merge.trackers"):
        tr.log_table("t", TABLE, step=1)
        tr.log_table("t", TABLE, step=2)
    tr.finalize()
    warned = [r.message for r in caplog.records if "tracker csv: log_table failed" in r.message]
    assert len(warned) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "r"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("t/text_summary")] == [1, 2]


def test_two_run_names_never_share_a_folder(tmp_path):
    for run_name, value in (("a/b", 1.0), ("a_b", 2.0), ("a/b", 3.0)):
        tr = Trackers(["csv"], tmp_path, run_name, "e", strict=True)
        tr.log_metrics({"x": value}, step=0)
        tr.finalize()
    ids = json.loads((tmp_path / "run_ids.json").read_text())
    assert ids["a/b"]["csv_version"] == "a_b" and ids["a_b"]["csv_version"].startswith("a_b-")
    values = {}
    for name in ("a/b", "a_b"):
        with (tmp_path / "csv" / ids[name]["csv_version"] / "metrics.csv").open(newline="") as fh:
            values[name] = [float(r["x"]) for r in csv.DictReader(fh)]
    assert values == {"a/b": [1.0, 3.0], "a_b": [2.0]}
