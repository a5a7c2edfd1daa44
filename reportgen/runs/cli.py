"""The command line, shared by `reportgen ...` (the installed console script), `python -m reportgen ...` and
`python run.py ...` in a checkout: check the overrides (a typo fails before Hydra starts), compose the config from
conf/ (the checkout's or the installed package's, config.store.conf_dir), run, print the report path.

    reportgen                                       # the offline demo
    reportgen model=resnet50 dataset.root=DIR       # a torchvision model on your folder
    reportgen -m model=resnet18,convnext_tiny       # a sweep: one report per model
    reportgen runtime.shard=0/4 ...                 # one slice of the folder; python -m reportgen.merge joins them
    torchrun --nproc_per_node=4 run.py ...          # one slice per rank, rank 0 merges and renders
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from reportgen.config.store import check_cli_overrides, conf_dir, register_configs
from reportgen.errors import ConfigError

register_configs()
log = logging.getLogger("reportgen")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def run_job(cfg: DictConfig) -> None:
    """One Hydra job (the run, or one job of a sweep): its errors end in its manifest, never as a traceback."""
    from reportgen.errors import FolderBusy, ReportgenError
    from reportgen.runs.launch import launch
    from reportgen.runs.pipeline import record_failure
    from reportgen.runs.signals import RunInterrupted

    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        index = launch(cfg)
    except RunInterrupted as stop:  # checkpoint saved; a whole sweep stops too (a Ctrl-C means all of it)
        log.error("%s", stop)
        stop.hand_over()  # under submitit: its own handler saves the job, requeues it and exits
        sys.exit(stop.exit_code)
    except FolderBusy as exc:  # the folder belongs to a live run: write nothing into it
        log.error("%s", exc)
        if sweeping:
            return
        sys.exit(1)
    except ReportgenError as exc:  # a config, model or run problem the message explains
        log.error("%s", exc)
        record_failure(cfg, exc)
        if sweeping:
            return  # a sweep goes on with its other jobs; this one's manifest says it failed
        sys.exit(1)
    except Exception as exc:  # an unexpected error: in a sweep, record it and let the other jobs run
        if not sweeping:
            raise
        log.exception("job failed")
        record_failure(cfg, exc)
        return
    if index is None:
        return  # a torchrun rank other than 0: rank 0 prints the merged report
    if index.name == "state.pt":
        print(f"shard state: {index} (merge the shards: python -m reportgen.merge DIR... --out DIR)")
    else:
        print(f"report: {index}")


def main() -> None:
    """The entry point of every command name: exit 2 with the key and close matches on a bad override."""
    try:
        check_cli_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_job()
