"""Every config file composes and validates; bad keys, names and values fail early with the valid choices."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from reportgen.config.schema import torchvision_model_names
from reportgen.config.store import check_cli_overrides, conf_dir, group_options
from reportgen.config.validate import validate
from reportgen.errors import ConfigError
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_validates_with_the_demo_analyses():
    cfg = compose_config([])
    typed = validate(cfg)
    assert list(typed) == ["summary", "predictions", "gradcam", "activations", "weights", "graph", "knn",
                           "embedding_maps", "segmentation", "detection"]  # knn, embedding_maps: backbones only;
    # segmentation, detection: those models only (each a line on a classifier's page)
    assert typed["predictions"].top_k == 5
    assert cfg.model.source.name == "target" and cfg.dataset.synthetic == "shapes"


@pytest.mark.parametrize("group", ["model", "dataset", "report", "runtime", "experiment"])
def test_every_yaml_file_composes(group):
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        cfg = compose_config([f"{group}={path.stem}"])
        assert cfg.runtime.batch_size >= 1, path


def test_every_torchvision_model_is_selectable_and_validates():
    names = torchvision_model_names()
    assert len(names) >= 70 and {"resnet18", "vit_b_16", "swin_t", "convnext_tiny"} <= set(names)
    assert set(names) <= set(group_options("model"))
    for name in names:
        cfg = compose_config([f"model={name}", "model.weights=null"])
        assert cfg.model.name == name
        validate(cfg)


def test_experiment_demo_vit_switches_model():
    cfg = compose_config(["experiment=demo_vit"])
    assert cfg.model.target._target_ == "reportgen.inputs.demo.models.demo_vit"


def test_typo_in_key_is_reported_with_the_close_match_and_valid_keys():
    with pytest.raises(ConfigError) as info:
        check_cli_overrides(["runtime.batch_sise=8"])
    message = str(info.value)
    assert "runtime.batch_sise" in message and "Did you mean 'batch_size'" in message and "num_workers" in message


def test_unknown_model_and_analysis_names_suggest_close_matches():
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        check_cli_overrides(["model=resnt18"])
    with pytest.raises(ConfigError, match="Did you mean 'predictions'"):
        check_cli_overrides(["analysis=[summary,predictons]"])
    with pytest.raises(ConfigError, match="Did you mean 'depth'"):
        check_cli_overrides(["analysis.summary.dept=2"])
    with pytest.raises(ConfigError, match="Did you mean 'convnext_tiny'"):
        check_cli_overrides(["-m", "model=resnet18,convnext_tiy"][1:])
    check_cli_overrides(["model=resnet18", "analysis=[summary]", "runtime.device=cpu", "+model.target.x=1",
                         "model.kwargs.num_classes=10", "hydra.run.dir=x"])  # all valid: no error


def test_wrong_enum_value_lists_valid_values():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["runtime.precision=fp33"])
    text = str(info.value) + str(info.value.__cause__)
    assert "fp32" in text and "bf16" in text


def test_missing_folder_and_bad_values_fail_validation_naming_the_key(tmp_path):
    cfg = compose_config([f"dataset.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="dataset.root"):
        validate(cfg)
    cfg = compose_config(["runtime.batch_size=0"])
    with pytest.raises(ConfigError, match="runtime.batch_size"):
        validate(cfg)
    cfg = compose_config(["model=resnet18", "model.weights=IMAGENET1K_V9"])
    with pytest.raises(ConfigError, match="Did you mean 'IMAGENET1K_V1'"):
        validate(cfg)
    cfg = compose_config(["model=checkpoint"])
    with pytest.raises(ConfigError, match="model.path"):
        validate(cfg)
    cfg = compose_config(["model=target"])
    with pytest.raises(ConfigError, match="model.target"):
        validate(cfg)


def test_analysis_options_are_typed():
    cfg = compose_config(["analysis.predictions.top_k=3"])
    assert validate(cfg)["predictions"].top_k == 3
    with pytest.raises(ConfigCompositionException):
        compose_config(["analysis.predictions.top_k=three"])


def test_run_py_exits_2_with_a_clear_message_before_any_work():
    result = subprocess.run([sys.executable, "run.py", "runtime.devise=cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "Did you mean 'device'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_launcher_configs_compose_with_their_documented_settings():
    """hydra/launcher=slurm (submitit) and local_parallel (joblib) are real launcher configs, overridable."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        slurm = compose(config_name="config", return_hydra_config=True,
                        overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                   "hydra.launcher.array_parallelism=8"]).hydra.launcher
        local = compose(config_name="config", return_hydra_config=True,
                        overrides=["hydra/launcher=local_parallel"]).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.array_parallelism, slurm.timeout_min) == ("gpu", 1, 8, 240)
    assert local._target_.endswith("joblib_launcher.JoblibLauncher") and local.n_jobs == 2
