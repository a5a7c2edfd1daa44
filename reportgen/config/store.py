"""The schema registered in Hydra's ConfigStore, and the checks of command-line overrides made before Hydra runs.

Registration adds one `model/<name>` option per torchvision architecture and one `analysis/<name>` per registered
analysis (typed by its Config dataclass), so `analysis=[a,b]` and `analysis.a.opt=x` are type-checked.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from reportgen.config.schema import Config, ModelConfig, ModelSource, torchvision_model_names
from reportgen.errors import ConfigError
from reportgen.inputs.paths import escape_name
from reportgen.inputs.resources import resource_dir

CONFIG_GROUPS = ("model", "dataset", "analysis", "report", "runtime", "experiment")
_REGISTERED = False


def register_configs() -> None:
    """Store the schema, one `model/<name>` option per torchvision architecture, and one `analysis/<name>` per
    registered analysis (typed by its Config dataclass, placed at `analysis.<name>`)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from reportgen.analyses import ANALYSES

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in torchvision_model_names():
        cs.store(group="model", name=name, node=ModelConfig(source=ModelSource.torchvision, name=name))
    for name, analysis_cls in ANALYSES.items():
        cs.store(group="analysis", name=name, node=analysis_cls.Config(), package=f"analysis.{name}")
    _REGISTERED = True


def conf_dir() -> Path:
    """The `conf/` folder every command composes from (the checkout's, or the installed package's copy)."""
    return resource_dir("conf")


def group_options(group: str) -> List[str]:
    """Names selectable for a config group: yaml files in conf/<group>/ plus ConfigStore entries."""
    register_configs()
    names = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
    repo = ConfigStore.instance().repo.get(group, {})
    names.update(k[: -len(".yaml")] for k in repo if k.endswith(".yaml"))
    return sorted(names)


def schema_for(path: List[str]) -> Any:
    """The dataclass (or None for free-form nodes) that holds the config key at `path`, e.g. ['runtime']."""
    from reportgen.analyses import ANALYSES

    node: Any = Config
    for i, part in enumerate(path):
        if node is None:
            return None
        if node is Config and part == "analysis":
            if i + 1 < len(path):
                analysis_cls = ANALYSES.get(path[i + 1])
                if analysis_cls is None:
                    raise ConfigError("analysis", path[i + 1], "a registered analysis", sorted(ANALYSES))
                return schema_for_fields(analysis_cls.Config, path[i + 2 :])
            return None
        node = _field_type(node, part, ".".join(path[: i + 1]))
    return node


def schema_for_fields(node: Any, path: List[str]) -> Any:
    for i, part in enumerate(path):
        if node is None:
            return None
        node = _field_type(node, part, ".".join(path[: i + 1]))
    return node


def _field_type(node: Any, name: str, full_key: str) -> Any:
    """The type of field `name` of dataclass `node` if it is itself a dataclass, None for leaf/free-form fields;
    ConfigError listing the valid keys when the field does not exist."""
    if not is_dataclass(node):
        return None
    hints = get_type_hints(node)
    if name not in hints:
        raise ConfigError(full_key, name, f"a key of {node.__name__}", sorted(f.name for f in fields(node)))
    return hints[name] if is_dataclass(hints[name]) else None


def check_cli_overrides(overrides: List[str]) -> None:
    """Fail before Hydra starts when an override names an unknown group option or key, with close matches.

    Hydra's own messages list options but do not suggest; this also catches keys of analyses. `+key` (append)
    and `hydra.*` overrides are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for argument in overrides:
        _check_utf8(argument)
    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or key.startswith("hydra") or override.package:
            continue
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in CONFIG_GROUPS:
            choices = group_options(parts[0])
            for value in _override_values(override):
                if value is not None and value not in choices:
                    raise ConfigError(key, value, f"a config in group '{key}'", choices)
            continue
        if parts[0] == "model" and len(parts) > 2 and parts[1] in ("target", "kwargs"):
            continue  # free-form: builder arguments
        parent = schema_for(parts[:-1])
        if parent is not None:
            _field_type(parent, parts[-1], key)


def _check_utf8(argument: str) -> None:
    """A value whose bytes are not UTF-8 (a folder named in another locale) cannot go into the config: Hydra's
    parser and its UTF-8 YAML copy of the config refuse it, with a traceback. Files with such names inside
    dataset.root are fine (inputs/paths.py)."""
    try:
        argument.encode("utf-8")
    except UnicodeEncodeError:
        key, _, value = argument.partition("=")
        raise ConfigError(key, escape_name(value), "a value that is valid UTF-8 (Hydra writes the config as UTF-8 "
                          "YAML); link the folder under a UTF-8 name (ln -s) and pass the link") from None


def _override_values(override: Any) -> List[Any]:
    """Plain values of an override: one, a list (`analysis=[a,b]`) or a sweep (`model=a,b`)."""
    if override.is_sweep_override():
        values = list(override.sweep_string_iterator())
    else:
        values = [override.value()]
    flat: List[Any] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(value)
        elif isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            flat.extend(v.strip() for v in value[1:-1].split(",") if v.strip())
        else:
            flat.append(value)
    return flat


def config_from_container(container: Dict[str, Any]) -> DictConfig:
    """The typed config again from a manifest's or state's plain dict (e.g. to merge shards of a finished run)."""
    from reportgen.analyses import get_analysis

    register_configs()
    plain = {k: v for k, v in container.items() if k != "analysis"}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), plain)
    for name, options in (container.get("analysis") or {}).items():
        cfg.analysis[name] = OmegaConf.merge(OmegaConf.structured(get_analysis(name).Config), options or {})
    return cfg  # type: ignore[return-value]
