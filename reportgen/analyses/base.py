"""The Analysis interface and the registry that finds analyses by name.

An analysis is one class: it declares what it needs from the pass (`requires`), sees every batch once
(`update`), keeps only bounded, mergeable state (`state_dict` / `merge`), and turns that state into a data-only
report section (`finalize`). The pipeline owns the loop; adding an analysis is one module with `@register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple, Type

import torch

from reportgen.engine.capture import CaptureEngine, Consumer
from reportgen.errors import ConfigError
from reportgen.inputs.tasks import TASKS

if TYPE_CHECKING:
    from reportgen.engine.capture import Captures
    from reportgen.inputs.models import LoadedModel
    from reportgen.inputs.tasks import ModelOutputs
    from reportgen.report.elements import Section

ANALYSES: Dict[str, Type["Analysis"]] = {}
ALL_TASKS = frozenset(TASKS)


def register(name: str):
    """Class decorator: make an analysis selectable as `analysis=[..., name]`."""

    def decorate(cls: Type["Analysis"]) -> Type["Analysis"]:
        if name in ANALYSES:
            raise ValueError(f"analysis '{name}' is registered twice ({ANALYSES[name]} and {cls})")
        cls.name = name
        ANALYSES[name] = cls
        return cls

    return decorate


def get_analysis(name: str) -> Type["Analysis"]:
    """The analysis class registered as `name`; ConfigError listing the known names otherwise."""
    if name not in ANALYSES:
        raise ConfigError("analysis", name, "a registered analysis", sorted(ANALYSES))
    return ANALYSES[name]


@dataclass
class Requirements:
    """What an analysis needs captured during the pass. Names are qualified module names (`layer4.1.conv2`)."""

    activations: List[str] = field(default_factory=list)  # outputs captured on every call of these modules
    gradients: List[str] = field(default_factory=list)  # outputs made autograd leaves (d score / d activation);
    # `layer` is its first call, `layer#2` the second
    attention: List[str] = field(default_factory=list)  # nn.MultiheadAttention modules whose per-head weights
    # are forced on (need_weights=True, average_attn_weights=False) and captured as `<name>` -> (B, heads, N, N)
    streamed: List[str] = field(default_factory=list)  # outputs handed to `consume` inside the forward, as each
    # call returns, and not kept: no copy of the layer is held to the end of the forward


@dataclass
class Batch:
    """One batch as analyses see it."""

    indices: torch.Tensor  # (B,) position of each image in the sorted file list
    paths: List[str]  # (B,) paths relative to the dataset root, posix separators
    images: torch.Tensor  # (B, 3, H, W) uint8 on the CPU: the resized, cropped input as a person would see it
    inputs: torch.Tensor  # (B, 3, H, W) float, normalised, on the run device: what the model got
    labels: torch.Tensor  # (B,) dataset class index per image on the run device, -1 when unlabelled
    sizes: Optional[torch.Tensor] = None  # (B, 2) int64 on the CPU: each image's (height, width) as decoded, before
    #   resizing (segmentation scores and draws its predictions at this size)


@dataclass
class RunContext:
    """Facts about the run every analysis may read; filled by the pipeline before analyses are built."""

    model: torch.nn.Module
    loaded: "LoadedModel"
    dataset_classes: List[str]  # folder class names, in label-index order (empty when unlabelled)
    num_images: int  # images the scan found (before decode failures)
    device: torch.device
    results_dir: Path  # where an analysis may stream per-image rows (e.g. predictions.csv)
    report: Any  # the ReportConfig node (thumbnail size, gallery size, ...)
    stream_rows: Optional[int] = None  # images this process streams rows for (its shard's slice); None: num_images
    dataset_root: Optional[Path] = None  # the scanned folder (batch paths are relative to it), to decode an image
    #   again at finalize (e.g. the nearest neighbours found only once every image is seen)
    dataset: Any = None  # the DatasetConfig node (segmentation reads its masks, ignore_index and mask_mapping)
    paths: Sequence[str] = ()  # every scanned image (escaped relative paths, sorted): detection matches its
    #   annotations to them before the pass

    @property
    def row_capacity(self) -> int:
        """Rows a per-image store needs here: the slice for a shard (so copied shard folders stay small)."""
        return self.stream_rows if self.stream_rows is not None else self.num_images


class Analysis:
    """Base class. Subclasses set `Config` (a dataclass of their options) and override the hooks they need."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    title: ClassVar[str] = ""  # the report section's title (for the "not applicable" line of another task)
    tasks: ClassVar[FrozenSet[str]] = ALL_TASKS  # the model tasks (model.task) this analysis applies to
    why_not: ClassVar[str] = ""  # why it does not apply to the other tasks, e.g. "they output no class scores"
    reads: ClassVar[Tuple[str, ...]] = ()  # analyses whose results files this one reads in `finalize` (they are
    #   finalized first when they run; see `finalize_order`)
    oom_safe: ClassVar[bool] = False  # True when `update` does all its device work before changing any state, so
    #   an out-of-memory error inside it leaves the state as it was and the pass may retry with half the batch
    layer_option: ClassVar[Optional[str]] = None  # the option choosing its layer (`analysis.gradcam.layer`), named
    #   when it fails on a model and is switched off (another layer may work)

    def __init__(self, cfg: Any, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ConfigError for option values the Config types cannot rule out (called before any work)."""

    def requires(self) -> Requirements:
        """Layers and signals this analysis needs from the pass (resolved names, checked by the capture engine).
        Called after `begin`, so defaults may use what a probe forward found."""
        return Requirements()

    def begin(self, example: Batch) -> None:
        """Called once with the first batch, before the loop (e.g. a one-image probe for shapes and FLOPs)."""

    def consume(self, batch: Batch, key: str, output: torch.Tensor) -> None:
        """Fold one call of a `streamed` layer into the state, inside the forward (`key`: `layer`, `layer#2`, ...;
        `output` detached, valid only during this call). `update` follows once the forward is done."""

    def update(self, batch: Batch, outputs: "ModelOutputs", captures: "Captures") -> None:
        """Fold one batch into the state (`outputs`: the forward's output, typed by task). Keep work on the device;
        move only small results to the CPU."""

    def state_dict(self) -> Dict[str, Any]:
        """The mergeable state (tensors, arrays, plain Python) from which `finalize` can be computed."""
        return {}

    def merge(self, state: Dict[str, Any]) -> None:
        """Fold another shard's `state_dict()` into this one; merging is exact and order-independent."""

    def finalize(self) -> Optional["Section"]:
        """Turn the state into a data-only report section (None: nothing to show)."""
        return None


class NotApplicable(Analysis):
    """Stands in for an analysis asked for on a model task it does not apply to: its section is one line saying
    why, never numbers. Keeps no state, so runs, shards and merges treat it like any other analysis."""

    def __init__(self, analysis: Type[Analysis], task: str):
        super().__init__(None, None)  # type: ignore[arg-type]
        self.name = analysis.name  # type: ignore[misc]
        self.line = f"not applicable to {task} models because {analysis.why_not}"
        self.section_title = analysis.title or analysis.name


SWITCHED_OFF = "switched_off"  # the key of a switched-off analysis's saved state: its line


class SwitchedOff(Analysis):
    """Stands in, for the rest of a run, for an analysis that failed on this model (its `begin`, `consume`, `update`
    or `finalize` raised): its section is one line saying why. Its state is that line alone, so a resumed run and
    a merge of shards keep it switched off (see `one_pass.restore_analyses`) and never mix partial states."""

    def __init__(self, name: str, title: str, line: str):
        super().__init__(None, None)  # type: ignore[arg-type]
        self.name = name  # type: ignore[misc]
        self.section_title = title
        self.line = line

    @classmethod
    def after(cls, analysis: Analysis, exc: BaseException, where: Optional[str] = None) -> "SwitchedOff":
        """The stand-in for `analysis` after `exc` (raised in module or layer `where`, when known); the line names
        the analysis's layer option, when it has one."""
        title = analysis.title or analysis.name
        message = " ".join(str(exc).split())  # one line, whatever the exception's text holds
        line = f"{title}: failed on this model, so it was switched off: {type(exc).__name__}: {message}"
        line += f" (in {where})." if where else "."
        if analysis.layer_option:
            line += f" Another layer may work: {analysis.layer_option}=<name>."
        return cls(analysis.name, title, line)

    @classmethod
    def from_state(cls, name: str, state: Dict[str, Any]) -> Optional["SwitchedOff"]:
        """The stand-in a saved state records (None: the state is a working analysis's)."""
        return cls(name, state["title"], state[SWITCHED_OFF]) if SWITCHED_OFF in state else None

    def state_dict(self) -> Dict[str, Any]:
        return {SWITCHED_OFF: self.line, "title": self.section_title}

    def finalize(self) -> "Section":
        from reportgen.report.elements import Alert, Section

        return Section(id=self.name, title=self.section_title, summary="switched off: it failed on this model",
                       elements=[Alert("warning", self.line)])


def not_applicable_section(stand_ins: Sequence[NotApplicable]) -> List["Section"]:
    """One section listing the analyses asked for that do not apply to this model's task, a line each (none when
    every analysis applies)."""
    from reportgen.report.elements import Section, Table

    if not stand_ins:
        return []
    rows = [[a.section_title, a.line] for a in stand_ins]
    return [Section(id="not-applicable", title="Not applicable to this model",
                    summary=f"{len(rows)} of the analyses asked for do not apply to this model's task",
                    elements=[Table(columns=["analysis", "why"], rows=rows)])]


def finalize_order(analyses: Sequence[Analysis]) -> List[Analysis]:
    """The analyses in config order, except that one reading another's results files (`reads`) comes after it."""
    by_name = {a.name: a for a in analyses}
    ordered: List[Analysis] = []

    def place(analysis: Analysis, seen: tuple) -> None:
        if analysis in ordered or analysis.name in seen:
            return
        for name in analysis.reads:
            if name in by_name:
                place(by_name[name], seen + (analysis.name,))
        ordered.append(analysis)

    for analysis in analyses:
        place(analysis, ())
    return ordered


def build_analysis(name: str, cfg: Any, ctx: RunContext) -> Analysis:
    """The analysis `name` for this run, or its one-line stand-in when the model's task is not one it applies to."""
    cls = get_analysis(name)
    task = ctx.loaded.task or "classification"
    return cls(cfg, ctx) if task in cls.tasks else NotApplicable(cls, task)


def capture_engine_for(model: torch.nn.Module, analyses: Sequence[Analysis],
                       consumer: Optional[Callable[[Analysis], Consumer]] = None) -> CaptureEngine:
    """The pass's capture engine for these analyses (after `begin`): the union of the layers they capture, the
    gradient leaves and attention modules they ask for, and their streamed layers, each handed to the `consume`
    of every analysis that streams it (or to `consumer(analysis)`: the pass's guarded `consume`)."""
    requirements = [a.requires() for a in analyses]
    consumers: Dict[str, List[Consumer]] = {}
    for analysis, needs in zip(analyses, requirements):
        for name in needs.streamed:
            consumers.setdefault(name, []).append(consumer(analysis) if consumer else analysis.consume)
    return CaptureEngine(model, [n for r in requirements for n in r.activations],
                         [n for r in requirements for n in r.gradients],
                         [n for r in requirements for n in r.attention], consumers)
