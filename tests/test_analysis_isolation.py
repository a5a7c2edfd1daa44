"""Nothing one analysis does stops the others: an analysis that raises in `begin`, `consume`, `update` or
`finalize`, or whose hooks make the forward raise, is switched off with one line saying why, and every other
section equals a run without it. A model whose plain forward raises, and a bad option, still stop the run."""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from markupsafe import escape
from omegaconf import OmegaConf, open_dict

from reportgen.analyses.base import ANALYSES, Analysis, Requirements, register
from reportgen.engine.capture import count_hooks
from reportgen.errors import ConfigError, RunError
from reportgen.report.elements import Section, Text
from reportgen.runs.merge import merge_runs
from reportgen.runs.pipeline import run
from reportgen.runs.signals import RunInterrupted
from reportgen.state.run_state import load_state
from tests.helpers import TINY, compose_config
from tests.tiny_models import TinyNet

OTHERS = "predictions,gradcam,activations"  # what must come out as in a run without the faulty one
STREAMED = "analysis.activations.layers=[conv,act,shared]"  # activations reduce `conv` and `act` in the forward
SCRATCH_NET = "tests.test_analysis_isolation.scratch_net"
BUILT: dict = {}  # the last ScratchNet built (its hooks are checked after a run)


class ScratchNet(TinyNet):
    """TinyNet that adds `act`'s output in place into a view made before `conv`. The pass runs the forward without
    gradients up to a gradient leaf and with them after it, and autograd forbids an in-place op with grad mode on
    into a view made without: so only a forward with a leaf on `conv` or `act` raises. The plain forward, and
    Grad-CAM's (its leaf comes later), run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = x.new_zeros(x.shape[0], 2, *x.shape[2:])[:, :]  # (B, 2, H, W), a view
        scratch += self.act(self.conv(x))
        x = self.shared(self.shared(scratch))
        return self.fc(self.pool(x).flatten(1))


def scratch_net() -> ScratchNet:
    BUILT["scratch_net"] = ScratchNet().eval()
    return BUILT["scratch_net"]


@dataclass
class FaultyConfig:
    fails_in: str = "update"  # begin | config | probe | consume | update | finalize | leaf
    layer: str = "conv"


class Faulty(Analysis):
    """Fails where `fails_in` says (while FAILING is true): `consume` streams `layer`, `leaf` asks for a gradient
    leaf on it, `update` fails on the second batch (after one batch was counted), `probe` runs the model in begin."""

    Config = FaultyConfig
    title = "Faulty"
    layer_option = "analysis.faulty.layer"
    FAILING = True
    updates = 0  # calls of update in this process, over every instance

    def requires(self) -> Requirements:
        if self.cfg.fails_in == "consume":
            return Requirements(streamed=[self.cfg.layer])
        if self.cfg.fails_in == "leaf":
            return Requirements(gradients=[self.cfg.layer])
        return Requirements()

    def _fails(self, where: str) -> bool:
        return self.FAILING and self.cfg.fails_in == where

    def begin(self, example) -> None:
        self.batches = 0
        if self._fails("config"):
            raise ConfigError("analysis.faulty.layer", self.cfg.layer, "a layer it can use")
        if self._fails("begin"):
            raise KeyError("begin exploded")
        if self._fails("probe"):
            self.ctx.model(example.inputs)

    def consume(self, batch, key, output) -> None:
        if self._fails("consume"):
            raise IndexError(f"consume exploded on {key}")

    def update(self, batch, outputs, captures) -> None:
        type(self).updates += 1
        self.batches += 1
        if self._fails("update") and self.batches == 2:
            raise ZeroDivisionError("update exploded")

    def state_dict(self):
        return {"batches": self.batches}

    def merge(self, state) -> None:
        self.batches += state["batches"]

    def finalize(self) -> Optional[Section]:
        if self._fails("finalize"):
            raise AttributeError("finalize exploded")
        return Section(id="faulty", title=self.title, elements=[Text(f"faulty saw {self.batches} batches")])


@pytest.fixture(autouse=True)
def faulty():
    """`faulty` registered for one test only (the registry is global)."""
    register("faulty")(Faulty)
    Faulty.FAILING, Faulty.updates = True, 0
    yield Faulty
    ANALYSES.pop("faulty")


def config(folder: Path, fails_in: Optional[str], *overrides: str, analyses: str = OTHERS, model: str = SCRATCH_NET):
    """TINY on `folder` with `analyses` (batches of 4 unless `overrides` say otherwise), and `faulty` failing in
    `fails_in` (None: no faulty)."""
    cfg = compose_config(TINY + [f"dataset.root={folder}", "runtime.batch_size=4", f"analysis=[{analyses}]",
                                 f"model.target._target_={model}", *overrides]
                         + ([STREAMED] if analyses == OTHERS else []))
    if fails_in is not None:
        with open_dict(cfg):
            cfg.analysis["faulty"] = OmegaConf.structured(FaultyConfig(fails_in=fails_in))
    return cfg


@pytest.fixture
def reference(colour_folder, tmp_path) -> Path:
    """The OTHERS' results without `faulty` (none of them switched off)."""
    run(config(colour_folder, None), out_dir=tmp_path / "reference")
    assert json.loads((tmp_path / "reference" / "results" / "manifest.json").read_text())["warnings"] == []
    return tmp_path / "reference"


def assert_others_unchanged(reference: Path, out: Path) -> None:
    """Every results file of the run without `faulty` is in `out`, with the same content."""
    for path in sorted((reference / "results").iterdir()):
        if path.is_file() and path.name != "manifest.json":
            assert path.read_bytes() == (out / "results" / path.name).read_bytes(), path.name
    ours = json.loads((out / "results" / "manifest.json").read_text())
    theirs = json.loads((reference / "results" / "manifest.json").read_text())
    assert ours["counts"] == theirs["counts"]


def assert_switched_off(out: Path, error: str, where: Optional[str]) -> str:
    """The page shows the Faulty line (with `error` and, when given, the layer) and the other sections; the
    manifest lists it among the warnings. Returns the line."""
    warnings = json.loads((out / "results" / "manifest.json").read_text())["warnings"]
    lines = [w for w in warnings if w.startswith("Faulty: failed on this model, so it was switched off: ")]
    assert len(lines) == 1, warnings
    line = lines[0]
    assert error in line and "analysis.faulty.layer=<name>" in line
    if where:
        assert f"(in {where})" in line
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "Predictions" in page and "faulty saw" not in page and str(escape(line)) in page  # as the page escapes it
    assert count_hooks(BUILT["scratch_net"]) == 0
    return line


@pytest.mark.parametrize("fails_in, error, where", [
    ("begin", "KeyError: 'begin exploded'", None),
    ("consume", "IndexError: consume exploded on conv", "conv"),
    ("update", "ZeroDivisionError: update exploded", None),
    ("finalize", "AttributeError: finalize exploded", None),
])
def test_an_analysis_that_raises_is_switched_off_and_the_others_are_unchanged(colour_folder, tmp_path, reference,
                                                                              fails_in, error, where):
    run(config(colour_folder, fails_in), out_dir=tmp_path / "run")
    assert_switched_off(tmp_path / "run", error, where)
    assert_others_unchanged(reference, tmp_path / "run")


def test_hooks_that_break_the_forward_switch_their_analysis_off_and_the_batch_counts_once(colour_folder, tmp_path,
                                                                                        reference):
    """A gradient leaf on `conv` makes ScratchNet's in-place op raise; activations had already reduced `conv` and
    `act` of that batch inside the failed forward, and must not count them again when the batch is redone."""
    run(config(colour_folder, "leaf"), out_dir=tmp_path / "run")
    assert_switched_off(tmp_path / "run", "RuntimeError: A view was created in no_grad mode and is being modified "
                                          "inplace with grad mode enabled", "conv")
    assert_others_unchanged(reference, tmp_path / "run")
    assert Faulty.updates == 0


def test_a_model_whose_plain_forward_raises_still_stops_the_run(colour_folder, tmp_path):
    """ExplodingNet raises on blue images with or without hooks: the forward's error, naming the files."""
    cfg = config(colour_folder, "leaf", analyses="predictions", model="tests.tiny_models.exploding_net")
    with pytest.raises(RunError, match=r"the model's forward raised on the batch of files .*blue/blue_0.png.*boom"):
        run(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "report" / "index.html").exists()

    cfg = config(colour_folder, "probe", analyses="predictions", model="tests.tiny_models.exploding_net")
    with pytest.raises(RunError, match=r"analysis 'faulty' failed while probing the model .*blue/blue_0.png.*boom"):
        run(cfg, out_dir=tmp_path / "probe")


def test_a_bad_option_found_in_begin_still_stops_the_run(colour_folder, tmp_path):
    with pytest.raises(ConfigError, match="analysis.faulty.layer"):
        run(config(colour_folder, "config", analyses="predictions"), out_dir=tmp_path / "run")


def test_a_switched_off_analysis_stays_off_when_the_run_resumes(colour_folder, tmp_path, monkeypatch):
    """Switched off at its second batch, stopped after the third (checkpoint saved), resumed where it no longer
    fails: it stays off, its update is never called again, and the line keeps the first run's error."""
    import reportgen.runs.one_pass as one_pass

    cfg = config(colour_folder, "update", "runtime.batch_size=2", "runtime.checkpoint_every=1",
                 analyses="predictions")
    boundaries = iter(range(100))
    monkeypatch.setattr(one_pass, "stop_requested", lambda: signal.SIGTERM if next(boundaries) == 2 else None)
    with pytest.raises(RunInterrupted):
        run(cfg, out_dir=tmp_path / "run")
    state = load_state(tmp_path / "run" / "results" / "state.pt")
    assert state.done < 13 and "update exploded" in state.analyses["faulty"]["switched_off"]
    monkeypatch.undo()
    Faulty.FAILING, Faulty.updates = False, 0
    run(cfg, out_dir=tmp_path / "run")
    assert Faulty.updates == 0
    assert_switched_off(tmp_path / "run", "ZeroDivisionError: update exploded", None)


def test_a_merge_keeps_off_what_one_shard_switched_off(colour_folder, tmp_path):
    shards = []
    for index in range(2):
        Faulty.FAILING = index == 0  # only the first shard fails
        out = tmp_path / f"shard{index}"
        run(config(colour_folder, "update", "runtime.batch_size=2", f"runtime.shard={index}/2",
                   analyses="predictions"), out_dir=out)
        shards.append(out)
    Faulty.FAILING = False
    merge_runs(shards, tmp_path / "merged")
    assert_switched_off(tmp_path / "merged", "ZeroDivisionError: update exploded", None)
