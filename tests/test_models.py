"""reportgen.inputs.models.load_model for the three sources, and reportgen.config.validate's model checks.

Everything runs offline: pretrained weights are faked by saving a seeded state_dict into a temporary
$TORCH_HOME/hub/checkpoints, exactly where torch.hub looks for a weights URL's file.
"""
from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from reportgen.config.schema import Config, ModelConfig, ModelSource, PreprocessConfig
from reportgen.config.validate import validate
from reportgen.errors import ConfigError, ModelLoadError
from reportgen.inputs.models import hub_checkpoint_path, is_torchscript, load_model, resolve_weights

R18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
R18_FILE = Path(R18_V1.url).name  # resnet18-f37072fd.pth
IMAGENET_CATEGORIES = list(R18_V1.meta["categories"])


def model_cfg(**fields):
    """The `cfg.model` node load_model receives: the structured schema with some fields set."""
    return OmegaConf.structured(ModelConfig(**fields))


def assert_same_state(module: torch.nn.Module, state: dict) -> None:
    got = module.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def seeded_resnet18(seed: int = 1234, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Hydra `_target_` factories (located by their dotted path, built from this module's own __name__)


class TinyNet(torch.nn.Module):
    def __init__(self, in_features: int = 4, out_features: int = 3):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.fc(x).relu() * 2 + 1


def make_tiny(in_features: int = 4, out_features: int = 3, names=None, random_init: bool = False):
    module = TinyNet(in_features, out_features)
    if names is not None:
        module.class_names = list(names)
    if random_init:
        module.random_init = True
    return module


def make_not_a_module():
    return {"weights": [1, 2, 3]}


def make_failing():
    raise RuntimeError("factory exploded")


def target_of(fn) -> str:
    return f"{__name__}.{fn.__name__}"


# ---------------------------------------------------------------------------------------------------------------
# source=torchvision


def test_torchvision_random_init_resnet18():
    loaded = load_model(model_cfg(source=ModelSource.torchvision, name="resnet18", weights=None))
    assert isinstance(loaded.module, torchvision.models.ResNet)
    assert loaded.name == "resnet18"
    assert loaded.source == "torchvision"
    assert loaded.random_init is True
    assert loaded.weights == "random initialisation"
    assert loaded.module.training is False  # eval mode
    assert loaded.module.fc.out_features == 1000
    # preprocessing and class names come from the DEFAULT weights' metadata even without the weights
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.preprocess.std == pytest.approx((0.229, 0.224, 0.225))
    assert loaded.preprocess.interpolation == "bilinear"
    assert loaded.class_names == IMAGENET_CATEGORIES
    assert len(loaded.class_names) == 1000
    assert loaded.class_names[0] == "tench"


def test_torchvision_preprocess_config_overrides_weights_meta():
    cfg = model_cfg(source=ModelSource.torchvision, name="mobilenet_v3_small", weights=None,
                    preprocess=PreprocessConfig(crop=160, interpolation="nearest", mean=[0.5, 0.5, 0.5]))
    loaded = load_model(cfg)
    assert loaded.preprocess.crop == 160
    assert loaded.preprocess.resize == 256  # not overridden: weights' meta
    assert loaded.preprocess.interpolation == "nearest"
    assert loaded.preprocess.mean == (0.5, 0.5, 0.5)
    assert loaded.preprocess.std == pytest.approx((0.229, 0.224, 0.225))


def test_torchvision_bad_interpolation_is_config_error():
    cfg = model_cfg(source=ModelSource.torchvision, name="mobilenet_v3_small", weights=None,
                    preprocess=PreprocessConfig(interpolation="bicubik"))
    with pytest.raises(ConfigError, match="bicubic") as info:
        load_model(cfg)
    assert info.value.key == "model.preprocess.interpolation"


def test_torchvision_interpolation_comes_from_weights_meta():
    loaded = load_model(model_cfg(source=ModelSource.torchvision, name="efficientnet_b0", weights=None))
    assert torchvision.models.EfficientNet_B0_Weights.DEFAULT.transforms().interpolation.value == "bicubic"
    assert loaded.preprocess.interpolation == "bicubic"


def test_torchvision_num_classes_kwarg_drops_imagenet_names():
    cfg = model_cfg(source=ModelSource.torchvision, name="mobilenet_v3_small", weights=None,
                    kwargs={"num_classes": 10})
    loaded = load_model(cfg)
    assert loaded.module(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert len(loaded.class_names) in (0, 10)


def test_torchvision_unknown_kwarg_is_model_load_error():
    # (resnet: ResNet.__init__ has no **kwargs, so the TypeError comes before any layer is built)
    cfg = model_cfg(source=ModelSource.torchvision, name="resnet18", weights=None, kwargs={"no_such_argument": 1})
    with pytest.raises(ModelLoadError, match="model.kwargs"):
        load_model(cfg)


def test_torchvision_unknown_name_is_config_error():
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'") as info:
        load_model(model_cfg(source=ModelSource.torchvision, name="resnet19", weights=None))
    assert info.value.key == "model.name"


# --- the hub cache


@pytest.fixture(scope="module")
def fake_hub_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a seeded resnet18 state_dict under IMAGENET1K_V1's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    state = seeded_resnet18(seed=1234).state_dict()
    target = home / "hub" / "checkpoints" / R18_FILE
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return home, state


@pytest.fixture
def hub_home(fake_hub_home, monkeypatch):
    home, state = fake_hub_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home, state


def test_hub_dir_follows_torch_home_each_call(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "one"))
    assert torch.hub.get_dir() == str(tmp_path / "one" / "hub")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "two"))
    assert torch.hub.get_dir() == str(tmp_path / "two" / "hub")
    assert hub_checkpoint_path(R18_V1.url) == tmp_path / "two" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_hub_cache_default_weights(hub_home):
    home, state = hub_home
    loaded = load_model(model_cfg(source=ModelSource.torchvision, name="resnet18", weights="DEFAULT"))
    assert loaded.random_init is False
    assert "IMAGENET1K_V1" in loaded.weights
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert_same_state(loaded.module, state)
    assert loaded.module.training is False
    assert loaded.class_names == IMAGENET_CATEGORIES
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)
    # the fake file really was the one used (a fresh build would differ)
    assert not torch.equal(seeded_resnet18(seed=99).conv1.weight, loaded.module.conv1.weight)


def test_hub_cache_named_weights(hub_home):
    home, state = hub_home
    loaded = load_model(model_cfg(source=ModelSource.torchvision, name="resnet18", weights="IMAGENET1K_V1"))
    assert loaded.random_init is False
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(loaded.module.fc.weight, state["fc.weight"])
    assert torch.equal(loaded.module.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_hub_weights_with_conflicting_num_classes_is_model_load_error(hub_home):
    cfg = model_cfg(source=ModelSource.torchvision, name="resnet18", weights="DEFAULT", kwargs={"num_classes": 10})
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model(cfg)


def test_unknown_weights_name_lists_choices_and_close_match():
    valid = [m.name for m in torchvision.models.get_model_weights("resnet18")]
    assert valid == ["IMAGENET1K_V1"]  # so IMAGENET1K_V2 really does not exist for resnet18
    with pytest.raises(ConfigError) as info:
        resolve_weights("resnet18", "IMAGENET1K_V2")
    message = str(info.value)
    assert info.value.key == "model.weights"
    assert "'IMAGENET1K_V2'" in message
    assert "Did you mean 'IMAGENET1K_V1'?" in message
    assert "valid choices: DEFAULT, IMAGENET1K_V1" in message
    # and through load_model, before anything is built or downloaded
    with pytest.raises(ConfigError, match="Did you mean 'IMAGENET1K_V1'"):
        load_model(model_cfg(source=ModelSource.torchvision, name="resnet18", weights="IMAGENET1K_V2"))


def test_resolve_weights_null_default_and_member():
    assert resolve_weights("resnet18", None) is None
    assert resolve_weights("resnet18", "DEFAULT") is R18_V1
    assert resolve_weights("resnet18", "IMAGENET1K_V1") is R18_V1


def test_offline_without_cached_file_explains_where_to_put_it(tmp_path, monkeypatch):
    home = tmp_path / "empty_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    expected = home / "hub" / "checkpoints" / R18_FILE
    attempts = []

    def no_network(url, dst, *args, **kwargs):  # hermetic: the same failure as a machine without network
        attempts.append((url, dst))
        raise urllib.error.URLError("[Errno -2] Name or service not known (simulated)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelLoadError) as info:
        load_model(model_cfg(source=ModelSource.torchvision, name="resnet18", weights="DEFAULT"))
    assert attempts == [(R18_V1.url, str(expected))]  # it did look in, and try to fill, the cache
    message = str(info.value)
    assert "URLError" in message
    assert f"'{R18_FILE}'" in message
    assert str(expected) in message
    assert R18_V1.url in message
    assert "model.weights=null" in message
    assert not expected.exists()  # no partial file left behind that a later run would trust


# ---------------------------------------------------------------------------------------------------------------
# source=checkpoint


@pytest.fixture(scope="module")
def ten_class_state():
    return seeded_resnet18(seed=7, num_classes=10).state_dict()


def test_checkpoint_infers_num_classes(tmp_path, ten_class_state):
    path = tmp_path / "r18_10.pt"
    torch.save(ten_class_state, path)
    assert is_torchscript(path) is False
    loaded = load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path), weights=None))
    assert loaded.source == "checkpoint"
    assert loaded.name == "resnet18"
    assert loaded.random_init is False
    assert loaded.weights == "checkpoint r18_10.pt"
    assert loaded.module.fc.out_features == 10
    assert loaded.notes == ["num_classes=10 inferred from the checkpoint's classifier"]
    assert_same_state(loaded.module, ten_class_state)
    with torch.no_grad():
        assert loaded.module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)


def test_checkpoint_with_other_num_classes_has_no_imagenet_names(tmp_path, ten_class_state):
    path = tmp_path / "r18_10.pt"
    torch.save(ten_class_state, path)
    loaded = load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path)))
    assert len(loaded.class_names) in (0, 10)


def test_checkpoint_ddp_wrapped_state_dict(tmp_path, ten_class_state):
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in ten_class_state.items()}}, path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(10)) + "\n", encoding="utf-8")
    loaded = load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path),
                                  labels_file=str(labels)))
    assert_same_state(loaded.module, ten_class_state)
    assert loaded.class_names == [f"c{i}" for i in range(10)]


def test_checkpoint_mismatch_lists_missing_and_unexpected_keys(tmp_path, ten_class_state):
    state = dict(ten_class_state)
    del state["layer4.1.bn2.running_var"]
    state["extra_head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path)))
    message = str(info.value)
    assert "does not match architecture 'resnet18'" in message
    assert "missing keys (1): layer4.1.bn2.running_var" in message
    assert "unexpected keys (1): extra_head.weight" in message


def test_checkpoint_shape_mismatch_outside_head(tmp_path, ten_class_state):
    state = dict(ten_class_state)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem: not something num_classes explains
    path = tmp_path / "gray.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"shape of conv1.weight: checkpoint \(64, 1, 7, 7\) vs model "
                                             r"\(64, 3, 7, 7\)"):
        load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path)))


def test_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="does not hold a state_dict"):
        load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path)))


def test_checkpoint_missing_arch_and_path_are_config_errors(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ConfigError) as info:
        load_model(model_cfg(source=ModelSource.checkpoint, path=str(path)))
    assert info.value.key == "model.arch"
    with pytest.raises(ConfigError) as info:
        load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(tmp_path / "nope.pt")))
    assert info.value.key == "model.path"
    assert "nope.pt" in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, still supported
@pytest.mark.parametrize("compile_fn", ["script", "trace"])
def test_torchscript_checkpoint(tmp_path, compile_fn):
    torch.manual_seed(3)
    original = TinyNet(4, 3).eval()
    example = torch.randn(5, 4)
    scripted = torch.jit.script(original) if compile_fn == "script" else torch.jit.trace(original, example)
    path = tmp_path / "tiny_ts.pt"
    torch.jit.save(scripted, str(path))
    assert is_torchscript(path) is True
    loaded = load_model(model_cfg(source=ModelSource.checkpoint, path=str(path), weights=None))
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.name == "tiny_ts"
    assert loaded.weights == "TorchScript tiny_ts.pt"
    assert loaded.random_init is False
    assert loaded.class_names == []
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)  # nothing known: ImageNet recipe
    x = torch.randn(7, 4)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), original(x))


class _RunsCode:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_untrusted_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": _RunsCode(marker)}, path)
    assert not marker.exists()  # saving only records the call
    assert is_torchscript(path) is False
    with pytest.raises(ModelLoadError) as info:
        load_model(model_cfg(source=ModelSource.checkpoint, arch="resnet18", path=str(path)))
    message = str(info.value)
    assert "model.trust_checkpoint" in message
    assert "refused" in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# source=target


def test_target_factory_returns_module():
    cfg = model_cfg(source=ModelSource.target, weights=None,
                    target={"_target_": target_of(make_tiny), "in_features": 6, "out_features": 5})
    loaded = load_model(cfg)
    assert isinstance(loaded.module, TinyNet)
    assert loaded.module.fc.in_features == 6 and loaded.module.fc.out_features == 5
    assert loaded.module.training is False
    assert loaded.name == "TinyNet"
    assert loaded.source == "target"
    assert loaded.weights == target_of(make_tiny)
    assert loaded.random_init is False
    assert loaded.class_names == []


def test_target_torch_class_directly():
    loaded = load_model(model_cfg(source=ModelSource.target,
                                  target={"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2}))
    assert isinstance(loaded.module, torch.nn.Linear)
    assert loaded.module.weight.shape == (2, 3)
    assert loaded.name == "Linear"


def test_target_random_init_attribute():
    loaded = load_model(model_cfg(source=ModelSource.target,
                                  target={"_target_": target_of(make_tiny), "random_init": True}))
    assert loaded.random_init is True


def test_target_non_module_is_model_load_error():
    with pytest.raises(ModelLoadError, match=r"returned dict, not an nn.Module"):
        load_model(model_cfg(source=ModelSource.target, target={"_target_": target_of(make_not_a_module)}))


def test_target_failure_and_missing_target():
    with pytest.raises(ModelLoadError, match="factory exploded"):
        load_model(model_cfg(source=ModelSource.target, target={"_target_": target_of(make_failing)}))
    with pytest.raises(ConfigError) as info:
        load_model(model_cfg(source=ModelSource.target, target=None))
    assert info.value.key == "model.target"


def test_target_class_names_attribute():
    loaded = load_model(model_cfg(source=ModelSource.target,
                                  target={"_target_": target_of(make_tiny), "names": ["ant", "bee", "cat"]}))
    assert loaded.class_names == ["ant", "bee", "cat"]


def test_labels_txt_overrides_class_names_attribute(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("  alpha \n\nbeta\r\ngamma\n\n", encoding="utf-8")
    loaded = load_model(model_cfg(source=ModelSource.target, labels_file=str(labels),
                                  target={"_target_": target_of(make_tiny), "names": ["ant", "bee", "cat"]}))
    assert loaded.class_names == ["alpha", "beta", "gamma"]


def test_labels_json_list_and_mapping(tmp_path):
    as_list = tmp_path / "labels.json"
    as_list.write_text(json.dumps(["zero", "one", "two"]), encoding="utf-8")
    loaded = load_model(model_cfg(source=ModelSource.target, labels_file=str(as_list),
                                  target={"_target_": target_of(make_tiny)}))
    assert loaded.class_names == ["zero", "one", "two"]

    mapping = tmp_path / "index.JSON"  # suffix check is case-insensitive; keys sort as integers, not strings
    mapping.write_text(json.dumps({str(i): f"n{i}" for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}), encoding="utf-8")
    loaded = load_model(model_cfg(source=ModelSource.target, labels_file=str(mapping),
                                  target={"_target_": target_of(make_tiny)}))
    assert loaded.class_names == [f"n{i}" for i in range(11)]


def test_missing_labels_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_model(model_cfg(source=ModelSource.target, labels_file=str(tmp_path / "none.txt"),
                             target={"_target_": target_of(make_tiny)}))
    assert info.value.key == "model.labels_file"


# ---------------------------------------------------------------------------------------------------------------
# reportgen.config.validate


@pytest.fixture
def full_cfg(tmp_path):
    """A whole run config that passes validation; tests then break one model field."""
    cfg = OmegaConf.structured(Config())
    cfg.model.source = ModelSource.torchvision
    cfg.model.name = "resnet18"
    cfg.model.weights = None
    cfg.dataset.root = str(tmp_path)
    cfg.analysis = {"predictions": {}}
    return cfg


def test_validate_accepts_good_config(full_cfg):
    typed = validate(full_cfg)
    assert list(typed) == ["predictions"]
    assert typed["predictions"].top_k == 5


def test_validate_unknown_torchvision_name(full_cfg):
    full_cfg.model.name = "resnet19"
    with pytest.raises(ConfigError) as info:
        validate(full_cfg)
    assert info.value.key == "model.name"
    message = str(info.value)
    assert "'resnet19'" in message
    assert "Did you mean 'resnet18'" in message


def test_validate_unknown_weights(full_cfg):
    full_cfg.model.weights = "IMAGENET1K_V2"
    with pytest.raises(ConfigError, match="Did you mean 'IMAGENET1K_V1'") as info:
        validate(full_cfg)
    assert info.value.key == "model.weights"


def test_validate_checkpoint_path(full_cfg, tmp_path):
    full_cfg.model.source = ModelSource.checkpoint
    full_cfg.model.arch = "resnet18"
    full_cfg.model.path = None
    with pytest.raises(ConfigError, match="model.path") as info:
        validate(full_cfg)
    assert info.value.key == "model.path"

    full_cfg.model.path = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="model.path") as info:
        validate(full_cfg)
    assert "missing.pt" in str(info.value)

    (tmp_path / "present.pt").write_bytes(b"")
    full_cfg.model.path = str(tmp_path / "present.pt")
    full_cfg.model.arch = "resnet181"
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'") as info:
        validate(full_cfg)
    assert info.value.key == "model.arch"


def test_validate_target_without_target_node(full_cfg):
    full_cfg.model.source = "target"  # a string is converted to the enum by the structured config
    assert full_cfg.model.source is ModelSource.target
    with pytest.raises(ConfigError) as info:
        validate(full_cfg)
    assert info.value.key == "model.target"
