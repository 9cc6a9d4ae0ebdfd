"""Experiment trackers (``report.loggers``): CSV, TensorBoard, W&B and MLflow through Lightning's own loggers.

Pretraining teams already watch a dashboard, so a search run (or a watch
round) is logged where they look, through ``lightning.pytorch.loggers``
(``CSVLogger``, ``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``)
rather than four hand-rolled clients. The driver calls :class:`Trackers` on
rank 0 only; nothing else logs to them.

Three rules shape this module:

- **One run, however many restarts.** A requeued job must continue the run it
  started, not open a second one on every dashboard. The ids of each backend's
  run (CSV/TB version folder, W&B run id, MLflow run id) are kept in
  ``save_dir/run_ids.json`` (written atomically, before the runs start where
  the id is ours to choose), keyed by ``run_name``, and reused on resume.
- **Names valid everywhere.** MLflow is the strictest backend (and Lightning's
  ``MLFlowLogger`` silently strips what it dislikes), so every metric and
  param name goes through :func:`metric_name`, which maps a name to one every
  backend stores unchanged.
- **A tracker never kills a run.** After start-up (where a bad name, a
  missing package or an unreachable store fail at once, naming the option), a
  backend that raises while logging is reported once per kind of call and
  skipped; ``strict=True`` raises instead (the tests use it).

W&B starts offline unless the user configured it (``WANDB_MODE``, an API key
in ``WANDB_API_KEY`` / ``WANDB_IDENTITY_TOKEN_FILE`` or ``.netrc``), and it is
never allowed to prompt for a login. An offline run is uploaded later with
``wandb sync save_dir/wandb/offline-run-*``; a resumed offline run is a second
folder with the same run id. MLflow without ``MLFLOW_TRACKING_URI`` uses a
file store under ``save_dir/mlruns``; MLflow 3.x only opens one when
``MLFLOW_ALLOW_FILE_STORE`` is true, so this module sets it (for the process)
unless the user set it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import netrc
import numbers
import os
import re
import secrets
import string
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlparse

from .io import atomic_write_json, atomic_write_text

__all__ = ["BACKENDS", "metric_name", "wandb_mode", "Trackers"]

log = logging.getLogger(__name__)
BACKENDS = ("csv", "tensorboard", "wandb", "mlflow")
IDS_FILE = "run_ids.json"
_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow)"}
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's set, less ':' (Lightning's MLFlowLogger strips it)
_MAX_NAME = 250  # MLflow's MAX_ENTITY_KEY_LENGTH


def metric_name(name: str) -> str:
    """A metric/param name valid on every backend (MLflow allows only alphanumerics, _ - . space : /;
    W&B and TB accept those). Anything else (commas, brackets, '%', '=', unicode...) becomes '_'; no
    leading '/', no empty segments. Deterministic, so the same input always gives the same name.

    ':' also becomes '_' (MLflow accepts it, but Lightning's MLFlowLogger deletes it), and leading dots
    of a segment become '_' (MLflow refuses names that resolve like the paths '.' or '..'). A name
    longer than MLflow's 250 characters is cut and given a hash of the original, so it stays unique.
    """
    parts = []
    for seg in _BAD_CHARS.sub("_", str(name)).split("/"):
        seg = seg.strip()
        if seg:
            dots = len(seg) - len(seg.lstrip("."))
            parts.append("_" * dots + seg[dots:])
    out = "/".join(parts) or "_"
    if len(out) > _MAX_NAME:
        out = out[:_MAX_NAME - 9] + "_" + hashlib.sha1(str(name).encode("utf-8")).hexdigest()[:8]
    return out


def _leaf(name: str) -> str:
    """One path segment: a source, OOD set or stage name that must not open a sub-hierarchy."""
    return metric_name(str(name).replace("/", "_"))


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric_name(name)).strip(".") or "table"


def _finite(v) -> bool:
    """A real number (Python, numpy) that is finite; None, text and NaN/inf are not."""
    return isinstance(v, numbers.Real) and math.isfinite(float(v))


def _cell(v):
    """A table cell every backend stores: scalars as they are, anything else as JSON text."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)


def _flatten(params: Mapping, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in params.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[metric_name(key)] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _parse_names(names) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        key = str(n).strip().lower()
        if key not in BACKENDS:
            raise ValueError(f"report.loggers: unknown tracker {n!r}; choose any of {', '.join(BACKENDS)}")
        if key not in out:
            out.append(key)
    for key in out:
        if key in _INSTALL and find_spec(key) is None and not (key == "tensorboard" and find_spec("tensorboardX")):
            raise ValueError(f"report.loggers={key} needs the `{key}` package, which is not installed: "
                             f"pip install {_INSTALL[key]} (or pip install 'lightning_merge[trackers]')")
    return out


def wandb_mode() -> str:
    """The W&B mode a run starts in: ``WANDB_MODE`` if set, else online only when credentials exist."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's legacy spellings
    return "online" if _wandb_credentials() else "offline"


def _wandb_credentials() -> bool:
    """Whether wandb would find credentials without prompting: its env variables or a .netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackers:
    """The run's experiment trackers; every method is a cheap no-op when none is configured."""

    def __init__(self, names, save_dir, run_name: str, experiment: str, *, strict: bool = False) -> None:
        """names: subset of BACKENDS (unknown name -> ValueError naming `report.loggers`, the bad name and the
        allowed ones; a backend whose package is not installed -> ValueError saying which pip package to install).
        save_dir: the folder the file-based backends write under (the run directory's `trackers/`):
        csv -> save_dir/csv, tensorboard -> save_dir/tensorboard, wandb -> save_dir/wandb (offline unless the user
        configured W&B: honour WANDB_MODE / WANDB_API_KEY env as wandb does; never prompt for login), mlflow ->
        tracking URI from MLFLOW_TRACKING_URI if set, else a local file store under save_dir/mlruns.
        A second Trackers with the same save_dir and run_name (a resumed run after a crash) continues the SAME run
        on every backend (same CSV/TB version folder, same W&B run id (resume="allow"), same MLflow run id,
        kept in save_dir/run_ids.json written atomically) instead of starting a new one.
        strict: raise a backend's logging error instead of warning once and skipping it."""
        self.names = _parse_names(names)
        self.save_dir, self.run_name, self.experiment = Path(save_dir), str(run_name), str(experiment)
        self.strict = strict
        self.loggers: dict = {}
        self._last_step: int | None = None
        self._warned: set = set()
        self._closed = False
        self.ids: dict = {}
        self.resumed = False
        if not self.names:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self._all_ids = self._read_ids()
        self.ids = self._all_ids.setdefault(self.run_name, {})
        self.resumed = bool(self.ids)
        version = _file_stem(self.run_name)
        if version in {r.get("csv_version", r.get("tensorboard_version")) for k, r in self._all_ids.items()
                       if k != self.run_name}:  # another run name that maps to the same folder name
            version += "-" + hashlib.sha1(self.run_name.encode("utf-8")).hexdigest()[:6]
        try:
            for name in self.names:
                getattr(self, f"_start_{name}")(version)
        except BaseException:
            self.strict = False  # close what did start, quietly: the error raised names the backend at fault
            self.finalize("failed")
            raise
        self._save_ids()

    # --- start-up and resume ---------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.names) and not self._closed

    def _read_ids(self) -> dict:
        path = self.save_dir / IDS_FILE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable tracker run ids ({e}); delete it to start new tracker runs") from e

    def _save_ids(self) -> None:
        atomic_write_json(self.save_dir / IDS_FILE, self._all_ids)

    def _start_csv(self, version: str) -> None:
        from lightning.pytorch.loggers import CSVLogger

        lg = CSVLogger(self.save_dir, name="csv", version=self.ids.get("csv_version", version))
        # Lightning's CSV writer deletes metrics.csv of an existing version folder; a resumed run keeps it:
        # move it aside while the writer starts, put it back, and tell the writer the columns it holds.
        path = Path(lg.log_dir) / "metrics.csv"
        kept = path.with_name(".metrics.csv.resume")
        if path.exists():
            os.replace(path, kept)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = lg.experiment
        if kept.exists():
            os.replace(kept, path)
            with path.open(newline="", encoding="utf-8") as fh:
                writer.metrics_keys = list(csv.DictReader(fh).fieldnames or [])
        self.ids["csv_version"] = lg.version
        self.loggers["csv"] = lg

    def _start_tensorboard(self, version: str) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        lg = TensorBoardLogger(self.save_dir, name="tensorboard",
                               version=self.ids.get("tensorboard_version", version), default_hp_metric=False)
        _ = lg.experiment  # opens this session's event file in the (same) version folder
        self.ids["tensorboard_version"] = lg.version
        self.loggers["tensorboard"] = lg

    def _start_wandb(self, version: str) -> None:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode()
        if mode == "online" and not _wandb_credentials():
            raise ValueError("report.loggers=wandb: WANDB_MODE=online but no W&B credentials were found; set "
                             "WANDB_API_KEY (or run `wandb login`), or WANDB_MODE=offline to sync later")
        run_id = self.ids.get("wandb_id") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                      for _ in range(8))
        project = os.environ.get("WANDB_PROJECT") or re.sub(r"[^A-Za-z0-9_.-]", "_", self.experiment) or "runs"
        self.ids.update(wandb_id=run_id, wandb_project=project)
        self._save_ids()  # before the run starts: a crash in between still resumes this id
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True, save_code=False)
        lg = WandbLogger(name=self.run_name, save_dir=str(self.save_dir), id=run_id, project=project,
                         mode=mode, settings=settings)  # resume="allow" is WandbLogger's default
        lg._wandb_init.pop("anonymous", None)  # Hack: WandbLogger always passes it; wandb 0.31 warns it is unused
        if wandb.run is not None and wandb.run.id != run_id:
            raise ValueError(f"report.loggers=wandb: another W&B run ({wandb.run.id}) is active in this process; "
                             "call wandb.finish() first")
        _ = lg.experiment
        self.loggers["wandb"] = lg

    def _start_mlflow(self, version: str) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.save_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses its file store otherwise
        run_id = self.ids.get("mlflow_run_id") if self.ids.get("mlflow_tracking_uri") == uri else None
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            if client.get_experiment_by_name(self.experiment) is None:  # (MLFlowLogger warns when it creates it)
                client.create_experiment(self.experiment)
            if run_id is not None:
                try:
                    client.get_run(run_id)
                except Exception as e:  # noqa: BLE001 - the store lost the run: start a new one, say so
                    log.warning("MLflow run %s not found at %s (%s); starting a new run", run_id, uri, e)
                    run_id = None
            lg = MLFlowLogger(experiment_name=self.experiment, run_name=self.run_name, tracking_uri=uri, run_id=run_id)
            if run_id is not None:
                lg.experiment.update_run(run_id, status="RUNNING")  # it was FINISHED/KILLED, or died RUNNING
            _ = lg.run_id
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"report.loggers=mlflow: could not start an MLflow run at {uri} "
                             f"(MLFLOW_TRACKING_URI): {e}") from e
        self.ids.update(mlflow_run_id=lg.run_id, mlflow_tracking_uri=uri, mlflow_experiment=self.experiment)
        self.loggers["mlflow"] = lg

    # --- plumbing --------------------------------------------------------------------------
    @contextmanager
    def _guard(self, backend: str, what: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - see the module docstring: a tracker never kills a run
            if self.strict:
                raise
            if (backend, what) not in self._warned:
                self._warned.add((backend, what))
                log.warning("tracker %s: %s failed (%s: %s); later failures of this call are not reported",
                            backend, what, type(e).__name__, e)

    def _step(self, step: int) -> int:
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            if "step" not in self._warned:
                self._warned.add("step")
                log.warning("tracker step went back from %d to %d; logging at %d (steps must not decrease)",
                            self._last_step, step, self._last_step)
            return self._last_step
        self._last_step = step
        return step

    def _flush(self, name: str, lg) -> None:
        if name == "csv":
            lg.save()
        elif name == "tensorboard":
            lg.experiment.flush()

    # --- what the driver logs ---------------------------------------------------------------
    def log_hparams(self, params: dict) -> None:
        """Nested dicts flattened ("search/alpha"); once per run (skipped on a resumed run that logged them)."""
        if not self.enabled or self.ids.get("hparams_logged"):
            return
        flat = _flatten(params)
        for name, lg in self.loggers.items():
            with self._guard(name, "log_hparams"):
                lg.log_hyperparams(flat)
                if name == "tensorboard":
                    table = _markdown(["param", "value"], [[k, v] for k, v in flat.items()])
                    lg.experiment.add_text("hparams", table, 0)
                    lg.save()
                self._flush(name, lg)
        self.ids["hparams_logged"] = True
        self._save_ids()

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Names through metric_name; non-finite values (and non-numbers) are skipped."""
        if not self.enabled:
            return
        clean = {metric_name(k): float(v) for k, v in metrics.items() if _finite(v)}
        if not clean:
            return
        step = self._step(step)
        for name, lg in self.loggers.items():
            with self._guard(name, "log_metrics"):
                lg.log_metrics(clean, step=step)
                self._flush(name, lg)

    def log_trial(self, rec: dict, step: int, last_loss: float | None, source_names) -> None:
        """One trial. rec is a ledger record of lightning_merge (see lightning_merge/ledger.py, loop.py): keys
        'trial', 'status', 'weights' (one per source, in source_names order), 'objective', 'heldout_loss' (maybe),
        'origin' (e.g. 'init', 'ei', 'gp_hedge'..., 'baseline:LAWA'), 'seconds'. Logs trial/objective,
        trial/weight/<source name>, trial/gain_vs_last_percent (100*(last_loss-objective)/last_loss when
        last_loss is given and rec has heldout_loss; use heldout_loss), trial/is_baseline (1/0), and the origin
        as text where the backend takes text (a tag/param or the table). Only completed trials log metrics."""
        if not self.enabled or rec.get("status") != "completed":
            return
        origin = str(rec.get("origin", ""))
        m = {"trial/index": rec.get("trial"), "trial/objective": rec.get("objective"),
             "trial/is_baseline": int(origin.startswith("baseline:")), "trial/seconds": rec.get("seconds")}
        for key, w in zip(_unique_leaves(source_names), rec.get("weights", [])):
            m[f"trial/weight/{key}"] = w
        loss = rec.get("heldout_loss")
        if loss is not None:
            m["trial/heldout_loss"] = loss
            if last_loss:
                m["trial/gain_vs_last_percent"] = 100.0 * (last_loss - loss) / last_loss
        clean = {metric_name(k): float(v) for k, v in m.items() if _finite(v)}
        step, idx = self._step(step), rec.get("trial")
        for name, lg in self.loggers.items():
            with self._guard(name, "log_trial"):
                if name == "wandb":  # W&B takes text in a history row: the origin goes in the trial's own row
                    lg.log_metrics({**clean, "trial/origin": origin}, step=step)
                    continue
                lg.log_metrics(clean, step=step)
                if name == "tensorboard":
                    lg.experiment.add_text("trial/origin", f"trial {idx}: {origin}", step)
                elif name == "mlflow":
                    lg.experiment.set_tag(lg.run_id, f"trial/{metric_name(str(idx))}/origin", origin)
                self._flush(name, lg)

    def log_summary(self, results: dict, step: int, prefix: str = "run") -> None:
        """A run's (or a watch round's, prefix 'round') results dict (see lightning_merge/report.py
        results_dict and driver.py _search: 'best' with 'heldout_loss', 'ood_loss' {name: loss}, 'weights';
        'candidates' list of {'name','kind' ('checkpoint'|'baseline'|'search'),'heldout_loss','ood_loss'};
        'seconds' {stage: s}; 'gain_vs_last_percent'). Logs <prefix>/best_loss, <prefix>/last_checkpoint_loss
        (the last candidate of kind 'checkpoint'), <prefix>/best_baseline_loss (min over kind 'baseline'),
        <prefix>/gain_vs_last_percent, <prefix>/ood/<name>/best_loss (and last_checkpoint_loss),
        <prefix>/seconds/<stage>, <prefix>/trials. Missing parts of results are skipped."""
        if not self.enabled:
            return
        p = metric_name(prefix)
        best = results.get("best") or {}
        cands = results.get("candidates") or []
        singles = [c for c in cands if c.get("kind") == "checkpoint"]
        last = singles[-1] if singles else {}
        baselines = [c["heldout_loss"] for c in cands if c.get("kind") == "baseline" and _finite(c.get("heldout_loss"))]
        m = {f"{p}/best_loss": best.get("heldout_loss"), f"{p}/last_checkpoint_loss": last.get("heldout_loss"),
             f"{p}/best_baseline_loss": min(baselines) if baselines else None,
             f"{p}/gain_vs_last_percent": results.get("gain_vs_last_percent"), f"{p}/trials": results.get("trials")}
        for kind, src in (("best_loss", best), ("last_checkpoint_loss", last)):
            for name, v in (src.get("ood_loss") or {}).items():
                m[f"{p}/ood/{_leaf(name)}/{kind}"] = v
        for stage, s in (results.get("seconds") or {}).items():
            m[f"{p}/seconds/{_leaf(stage)}"] = s
        self.log_metrics(m, step)

    def log_images(self, paths, step: int) -> None:
        """PNG files: TB add_image (HWC uint8), W&B log_image, MLflow log_artifact (under plots/), CSV: skip."""
        if not self.enabled:
            return
        files = [Path(p) for p in paths]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            log.warning("tracker images not found, skipped: %s", ", ".join(missing))
        files = [p for p in files if p.is_file()]
        if not files:
            return
        step = self._step(step)
        for name, lg in self.loggers.items():
            with self._guard(name, "log_images"):
                for path in files:
                    tag = f"plots/{_leaf(path.stem)}"
                    if name == "tensorboard":
                        lg.experiment.add_image(tag, _rgb(path), step, dataformats="HWC")
                    elif name == "wandb":
                        lg.log_image(key=tag, images=[str(path)], step=step)
                    elif name == "mlflow":
                        lg.experiment.log_artifact(lg.run_id, str(path), "plots")
                self._flush(name, lg)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """W&B log_table, MLflow a JSON artifact tables/<name>.json ({'step','columns','data'}), TB a markdown
        table via add_text, CSV: save_dir/csv/<name>.csv. The latest call for a name replaces the file ones."""
        if not self.enabled:
            return
        columns: list[str] = []
        for r in rows:
            columns += [str(k) for k in r if str(k) not in columns]
        data = [[_cell(r.get(c)) for c in columns] for r in rows]
        key, stem, step = metric_name(name), _file_stem(name), self._step(step)
        for backend, lg in self.loggers.items():
            with self._guard(backend, "log_table"):
                if backend == "csv":
                    buf = io.StringIO()
                    writer = csv.writer(buf)
                    writer.writerow(columns)
                    writer.writerows(data)
                    atomic_write_text(self.save_dir / "csv" / f"{stem}.csv", buf.getvalue())
                elif backend == "tensorboard":
                    lg.experiment.add_text(key, _markdown(columns, data), step)
                    lg.experiment.flush()
                elif backend == "wandb":
                    lg.log_table(key=key, columns=columns, data=data, step=step)
                elif backend == "mlflow":
                    lg.experiment.log_dict(lg.run_id, {"step": step, "columns": columns, "data": data},
                                           f"tables/{stem}.json")

    def finalize(self, status: str = "success") -> None:
        """Flush and close every backend (W&B finish, MLflow end run); later calls are no-ops.

        ``status``: "success", "failed", or anything else for a run that stops to be resumed (MLflow KILLED,
        W&B marked preempting)."""
        if not self.enabled:
            return
        self._closed = True
        for name, lg in self.loggers.items():
            with self._guard(name, "finalize"):
                if name == "wandb":
                    if status not in ("success", "failed"):
                        lg.experiment.mark_preempting()
                    lg.finalize(status)
                    lg.experiment.finish(exit_code=0 if status == "success" else 1)
                elif name == "mlflow":
                    lg.finalize({"success": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))
                else:
                    lg.finalize(status)
                    lg.save()


def _unique_leaves(names: Iterable) -> list[str]:
    """Source names as single segments, made distinct when two only differ in characters mapped to '_'."""
    out: list[str] = []
    for i, n in enumerate(names):
        key = _leaf(n)
        out.append(key if key not in out else f"{key}_{i}")
    return out


def _markdown(columns: Sequence, data: Sequence[Sequence]) -> str:
    def fmt(v) -> str:
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in data])


def _rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
