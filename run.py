"""Entry point: compose the Hydra config, run the pipeline, print the report path.

    python run.py                                   # the offline demo
    python run.py model=resnet50 dataset.root=DIR   # a torchvision model on your folder
    python run.py -m model=resnet18,convnext_tiny   # a sweep: one report per model
    python run.py runtime.shard=0/4 ...             # one slice of the folder; python -m reportgen.merge joins them
    torchrun --nproc_per_node=4 run.py ...          # one slice per rank, rank 0 merges and renders
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from reportgen.config.store import check_cli_overrides, register_configs
from reportgen.errors import ConfigError

register_configs()
log = logging.getLogger("reportgen")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from reportgen.errors import FolderBusy, ModelLoadError, RunError
    from reportgen.runs.launch import launch
    from reportgen.runs.pipeline import record_failure

    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        index = launch(cfg)
    except FolderBusy as exc:  # the folder belongs to a live run: write nothing into it
        log.error("%s", exc)
        if sweeping:
            return
        sys.exit(1)
    except (ConfigError, ModelLoadError, RunError) as exc:
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


if __name__ == "__main__":
    try:
        check_cli_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
