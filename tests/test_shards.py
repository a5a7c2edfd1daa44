"""Shards and merge: `runtime.shard=i/n` runs merged by `python -m reportgen.merge` equal one whole run."""
import json

import pytest

from reportgen.errors import ConfigError, RunError
from reportgen.inputs.shards import parse_shard, shard_bounds
from reportgen.runs.merge import main as merge_main
from reportgen.runs.merge import merge_runs
from reportgen.runs.pipeline import run
from reportgen.state.run_state import load_state
from reportgen.state.streams import RowFile
from tests.helpers import WIDE, WIDE_MODEL, compose_config, make_colour_folder
from tests.run_compare import assert_same_results


@pytest.fixture
def folder(tmp_path):
    """3 classes x 9 noisy images (so channel means differ from image to image) and two unreadable files."""
    root = make_colour_folder(tmp_path / "data", per_class=9, noise=60, seed=1)
    (root / "blue" / "blue_bad.jpg").write_bytes(b"broken")
    (root / "red" / "red_0_bad.png").write_bytes(b"")
    return root


def test_shard_bounds_cover_every_position_once():
    for total in (0, 1, 7, 29, 100):
        for count in (1, 2, 3, 8):
            covered = [p for i in range(count) for p in range(*shard_bounds(total, (i, count)))]
            assert covered == list(range(total))
    assert parse_shard("2/8") == (2, 8) and parse_shard(None) is None
    assert parse_shard("2", 8) == (2, 8) and parse_shard(2, 8) == (2, 8)  # runtime.num_shards=8 shard=range(0,8)
    with pytest.raises(ConfigError, match="num_shards"):
        parse_shard("2")
    for bad in ("8/8", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="runtime.shard"):
            parse_shard(bad)


def test_three_shards_merged_equal_one_run(folder, tmp_path):
    whole = tmp_path / "whole"
    run(compose_config(WIDE + [f"dataset.root={folder}"]), out_dir=whole)
    shard_dirs = []
    for i in range(3):
        out = tmp_path / "sweep" / str(i)
        path = run(compose_config(WIDE + [f"dataset.root={folder}", f"runtime.shard={i}/3",
                                          f"runtime.batch_size={3 + i}"]), out_dir=out)
        assert path == out / "results" / "state.pt" and not (out / "report").exists()
        manifest = json.loads((out / "results" / "manifest.json").read_text())
        assert manifest["status"] == "shard" and manifest["shard"] == [i, 3]
        rows = RowFile.open(out / "results" / ".gradcam" / "cams.npy")
        assert rows.shape[0] == len(range(*shard_bounds(29, (i, 3))))  # sized for the slice, not the folder
        rows.handle.close()
        shard_dirs.append(out)
    # given as the sweep folder, in any order: the merge finds and orders the shards itself
    assert merge_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "merged")]) == 0
    assert_same_results(whole, tmp_path / "merged")
    html = (tmp_path / "merged" / "report" / "index.html").read_text(encoding="utf-8")
    assert "3 shards side by side" in html and "blue/blue_bad.jpg" in html
    assert not (tmp_path / "merged" / "results" / "state.pt").exists()
    assert not list((tmp_path / "merged" / "results").glob(".*"))  # stream temporaries packed and removed
    states = [load_state(d / "results" / "state.pt") for d in shard_dirs]
    assert sum(s.processed for s in states) == 27 and [s.shard for s in states] == [(0, 3), (1, 3), (2, 3)]


def test_merge_refuses_missing_duplicate_different_and_unfinished_shards(folder, tmp_path, capsys):
    def shard(i, n, name, *extra):
        out = tmp_path / name
        run(compose_config(WIDE_MODEL + [f"dataset.root={folder}", f"runtime.shard={i}/{n}",
                                        "analysis=[predictions]", *extra]), out_dir=out)
        return out

    a, b = shard(0, 2, "a"), shard(1, 2, "b")
    with pytest.raises(RunError, match=r"missing shards \['1/2'\] of 2"):
        merge_runs([a], tmp_path / "m1")
    with pytest.raises(RunError, match="more than once"):
        merge_runs([a, a, b], tmp_path / "m2")
    other = shard(1, 2, "other", "analysis.predictions.top_k=2")
    with pytest.raises(RunError, match=r"different config.*top_k: 5 -> 2"):
        merge_runs([a, other], tmp_path / "m3")
    with pytest.raises(RunError, match=r"split the folder differently"):
        merge_runs([a, shard(1, 3, "c")], tmp_path / "m4")
    state = load_state(b / "results" / "state.pt")
    state.done -= 1
    from reportgen.state.run_state import save_state

    save_state(b / "results" / "state.pt", state)
    assert merge_main([str(a), str(b), "--out", str(tmp_path / "m5")]) == 2
    assert "unfinished" in capsys.readouterr().err
    assert merge_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m6")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_torchrun_two_cpu_ranks_equal_one_run(folder, tmp_path):
    """`torchrun --nproc_per_node=2 run.py ...` on the CPU (gloo): each rank its half, rank 0 the one report."""
    import subprocess
    import sys

    from reportgen.config.store import conf_dir

    overrides = WIDE + [f"dataset.root={folder}"]
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py",
               *overrides, f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=conf_dir().parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith("report: ")]
    assert printed == [f"report: {out / 'report' / 'index.html'}"]  # only rank 0 reports
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0", "1"]
    halves = [load_state(out / "shards" / r / "results" / "state.pt") for r in ("0", "1")]
    assert [(s.start, s.end) for s in halves] == [(0, 14), (14, 29)]  # contiguous, nothing twice or missing
    run(compose_config(overrides), out_dir=tmp_path / "whole")
    assert_same_results(tmp_path / "whole", out)
    again = subprocess.run(command, cwd=conf_dir().parent, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr  # a requeued job: every part is already done
    assert [line for line in again.stdout.splitlines() if line.startswith("report: ")] == printed


def test_torchrun_a_failing_rank_fails_the_run_without_hanging(folder, tmp_path):
    """Rank 0's half holds the blue images that make exploding_net raise: both ranks stop with the reason."""
    import subprocess
    import sys

    from reportgen.config.store import conf_dir

    overrides = [o.replace("wide_net", "exploding_net") for o in WIDE_MODEL] + [f"dataset.root={folder}",
                                                                              "analysis=[predictions]"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "run.py", *overrides, f"hydra.run.dir={tmp_path / 'ranks'}"], cwd=conf_dir().parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "1 of 2 ranks failed: rank 0: RunError: the model's forward raised on the batch of files" in done.stdout
    assert not (tmp_path / "ranks" / "report").exists()


def test_shard_sweep_on_the_joblib_launcher_is_merged_at_the_end(folder, tmp_path):
    """`-m hydra/launcher=local_parallel runtime.num_shards=3 'runtime.shard=range(0,3)'`: three shard jobs in
    parallel processes, merged by the end-of-sweep callback into <sweep>/merged, listed in the sweep index."""
    import subprocess
    import sys

    from reportgen.config.store import conf_dir
    from reportgen.report.sweep import collect_jobs

    overrides = WIDE + [f"dataset.root={folder}"]
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2",
                           "runtime.num_shards=3", "runtime.shard=range(0,3)", *overrides, f"hydra.sweep.dir={sweep}"],
                          cwd=conf_dir().parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"report: {sweep / 'merged' / 'report' / 'index.html'}" in done.stdout
    rows = {r.name: r for r in collect_jobs(sweep)}
    assert [rows[k].status for k in ("0", "1", "2", "merged")] == ["shard", "shard", "shard", "ok"]
    assert rows["merged"].report == "merged/report/index.html" and rows["merged"].images == 27
    assert rows["1"].error == "slice 1/3 of the folder: its report is the merge of all 3 slices"
    assert 'href="merged/report/index.html"' in (sweep / "index.html").read_text(encoding="utf-8")
    run(compose_config(overrides), out_dir=tmp_path / "whole")
    assert_same_results(tmp_path / "whole", sweep / "merged")
    from reportgen.runs.merge import merge_sweep

    assert merge_sweep(sweep) == [sweep / "merged" / "report" / "index.html"]  # the sweep again: nothing to redo


def test_row_store_resume_absorb_and_pack_keep_rows_in_order(tmp_path, monkeypatch):
    """The per-image stream behind gradcam.npz, attention.npz and embeddings.npz: rows written after a checkpoint
    are dropped on reopen, another store's rows are appended in order, and the packed .npz holds exactly them."""
    import numpy as np

    from reportgen.state import streams

    monkeypatch.setattr(streams, "COPY_ROWS", 3)  # copy and pack in several chunks
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(11, 2, 3)).astype(np.float32)
    names = [f"img_{i}.png" for i in range(11)]
    fields = {"maps": ((2, 3), np.float32), "cls": ((), np.int64)}
    first = streams.RowStore(tmp_path / "a", 20, fields)
    first.append(names[:4], maps=maps[:4], cls=np.arange(4))
    checkpoint = first.ref()
    first.append(names[4:6], maps=maps[4:6] + 100, cls=np.arange(4, 6))  # written, then the process was killed
    resumed = streams.absorb_rows(None, checkpoint, tmp_path / "a", 20)
    assert resumed.count == 4
    resumed.append(names[4:6], maps=maps[4:6], cls=np.arange(4, 6))
    other = streams.RowStore(tmp_path / "b", 20, fields)
    other.append(names[6:], maps=maps[6:], cls=np.arange(6, 11))
    merged = streams.absorb_rows(None, resumed.ref(), tmp_path / "merged", 20)
    merged = streams.absorb_rows(merged, other.ref(), tmp_path / "merged", 20)
    np.testing.assert_array_equal(merged.read("maps", 2, 9), maps[2:9])
    merged.pack(tmp_path / "out.npz", layer=np.array("conv"))
    packed = np.load(tmp_path / "out.npz")
    assert packed["paths"].tolist() == names and str(packed["layer"]) == "conv"
    np.testing.assert_array_equal(packed["maps"], maps)
    np.testing.assert_array_equal(packed["cls"], np.arange(11))
    assert (tmp_path / "merged" / "maps.npy").exists()  # kept until the run is finished (a crash may resume)
    (tmp_path / "merged").rename(tmp_path / ".gradcam")
    (tmp_path / ".other").mkdir()  # a hidden folder that is not a row store stays
    streams.remove_stream_folders(tmp_path)
    assert not (tmp_path / ".gradcam").exists() and (tmp_path / ".other").exists()


def test_vit_attention_shards_merge_into_the_whole(tmp_path):
    """The attention analysis's per-image maps and per-head statistics merge too (demo ViT, 2 shards)."""
    import numpy as np

    base = ["experiment=demo_vit", "analysis=[predictions,attention]", "dataset.limit=20", "runtime.batch_size=6",
            "runtime.num_workers=0", "runtime.progress=false"]
    run(compose_config(base), out_dir=tmp_path / "whole")
    for i in range(2):
        run(compose_config(base + [f"runtime.shard={i}/2"]), out_dir=tmp_path / "shards" / str(i))
    merge_runs([tmp_path / "shards"], tmp_path / "merged")
    whole, merged = (np.load(tmp_path / d / "results" / "attention.npz") for d in ("whole", "merged"))
    assert sorted(whole.files) == sorted(merged.files) and len(whole["paths"]) == 20
    for key in whole.files:
        if whole[key].dtype.kind == "f":
            np.testing.assert_allclose(merged[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(merged[key], whole[key], err_msg=key)


def test_shards_of_a_folder_where_nothing_decodes_finish_and_list_every_file_once(tmp_path):
    """5 shards over 3 unreadable files and a dangling link (found by the scan): every shard finishes, the merge
    lists each failure once."""
    import csv
    import os

    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for name in ("x.jpg", "y.png", "z.jpg"):
        (root / "a" / name).write_bytes(b"not an image")
    os.symlink(root / "nowhere.jpg", root / "a" / "w.jpg")
    for i in range(5):
        run(compose_config(WIDE_MODEL + [f"dataset.root={root}", "analysis=[predictions,gradcam]",
                                         f"runtime.shard={i}/5"]), out_dir=tmp_path / "shards" / str(i))
    merge_runs([tmp_path / "shards"], tmp_path / "merged")
    with open(tmp_path / "merged" / "results" / "failed.csv", newline="", encoding="utf-8") as handle:
        failed = [row[0] for row in csv.reader(handle)][1:]
    assert sorted(failed) == ["a/w.jpg", "a/x.jpg", "a/y.png", "a/z.jpg"]
    manifest = json.loads((tmp_path / "merged" / "results" / "manifest.json").read_text())
    assert manifest["counts"]["processed"] == 0 and manifest["counts"]["failed"] == 4


def test_a_state_pointing_outside_its_results_folder_is_refused(folder, tmp_path):
    from reportgen.state.run_state import save_state

    out = tmp_path / "s"
    run(compose_config(WIDE_MODEL + [f"dataset.root={folder}", "analysis=[predictions]", "runtime.shard=0/2"]),
        out_dir=out)
    state = load_state(out / "results" / "state.pt")
    state.analyses["predictions"]["csv"].location = "/etc/passwd"
    save_state(out / "results" / "state.pt", state)
    with pytest.raises(ValueError, match="points outside its results folder"):
        load_state(out / "results" / "state.pt")
