"""``python -m lightning_merge``: the Hydra entry point. It only composes, checks and dispatches."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import ConfigError, register_configs, to_run_config

log = logging.getLogger("lightning_merge")

# conf/ sits next to the package in the source tree (the layout is fixed); an absolute
# path lets Hydra find it from any working directory.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .errors import DiskFullError, RankLostError
    from .merge import MergeError
    from .slurm import RequeueError

    try:
        run_cfg = to_run_config(cfg)
        # The run directory is Hydra's: `output_dir` for a single run, one deterministic
        # subfolder per point for a sweep (-m). Never a timestamp, so a rerun resumes.
        from hydra.core.hydra_config import HydraConfig

        run_cfg.output_dir = HydraConfig.get().runtime.output_dir
        from .driver import run

        run(run_cfg, on_accepted=_record_once_accepted(run_cfg.output_dir, cfg))
    except (ConfigError, CheckpointError, DataError, MergeError) as e:
        log.error("%s", e)
        print(f"lightning_merge: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RequeueError as e:  # preempted and saved, but SLURM would not requeue the job
        log.error("%s", e)
        print(f"lightning_merge: error: {e}", file=sys.stderr)
        sys.exit(3)
    except RankLostError as e:  # another rank died or hung; the state on disk is whole (docs/reliability.md)
        log.error("%s", e)
        print(f"lightning_merge: error: {e}", file=sys.stderr)
        sys.exit(4)
    except DiskFullError as e:
        log.error("%s", e)
        print(f"lightning_merge: error: {e}", file=sys.stderr)
        sys.exit(5)


def _record_once_accepted(output_dir: str, cfg: DictConfig):
    """The driver's ``on_accepted`` hook: Hydra's record (``.hydra/``) of a run it has accepted, from rank 0.

    conf/config.yaml turns Hydra's own record at job start off (``hydra.output_subdir: null``), so a
    run refused by its checks never overwrites the record of the run in its folder (see record.py).
    """
    def hook() -> None:
        from .driver import launched_rank
        from .record import write_hydra_record

        if launched_rank() == 0:
            write_hydra_record(output_dir, cfg)

    return hook


# Hydra's flags that take no value. argparse cannot mix them into the overrides, so
# `python -m lightning_merge +experiment=tiny -m search.alpha=0,0.5` would be refused; move them first.
_FLAGS = ("-m", "--multirun", "--run", "--resolve", "--help", "-h", "--hydra-help", "--version")


def cli() -> None:
    """The console entry: Hydra's flags may come anywhere among the overrides."""
    args = sys.argv[1:]
    if "--" not in args and any(a in _FLAGS for a in args):
        sys.argv[1:] = [a for a in args if a in _FLAGS] + [a for a in args if a not in _FLAGS]
    main()


if __name__ == "__main__":
    cli()
