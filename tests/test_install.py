"""The installed package: a wheel built from this checkout, installed (not editable) into a fresh virtual
environment, runs as `reportgen` and `python -m reportgen` from another directory, with the configs and templates
it carries. The new environment sees this one's libraries through a .pth file (torch is not installed twice); a
.pth file's paths are not scanned for further .pth files, so this checkout's own (editable) reportgen stays out."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from reportgen.config.store import conf_dir

REPO = conf_dir().parent
NOT_SHIPPED = shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "bench", "tests")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the new environment, its bin folder, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so the build's own folders (build/, *.egg-info) never land in the checkout
    shutil.copytree(REPO, source, ignore=NOT_SHIPPED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # with this environment's setuptools when it has one (offline); else pip fetches it into an isolated build
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(pip + ["wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("reportgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"reportgen/conf/config.yaml", "reportgen/conf/hydra/launcher/slurm.yaml", "reportgen/templates/base.html",
            "reportgen/templates/elements/gallery.html", "reportgen/inputs/demo/weights/demo_cnn.pt",
            "reportgen/__main__.py", "reportgen/runs/cli.py"} <= names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "uses-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(pip + ["--python", str(python), "install", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return python, venv / "bin", elsewhere


def command(args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_the_installed_package_is_the_wheel_with_its_configs_and_templates(installed):
    python, _, elsewhere = installed
    done = command([python, "-c", "import reportgen; from reportgen.config.store import conf_dir; "
                                  "from reportgen.report.render import TEMPLATES; "
                                  "from reportgen.state.cpu_kernels import library; "
                                  "print(reportgen.__file__, conf_dir(), TEMPLATES, library()._name, sep='\\n')"],
                   elsewhere)
    assert done.returncode == 0, done.stderr
    package, conf, templates, kernels = (Path(line) for line in done.stdout.split())
    venv = python.parent.parent
    assert venv in package.parents and package.parent == conf.parent == templates.parent
    assert REPO not in package.parents
    assert kernels.parent == package.parent / "state", "the wheel carries the compiled CPU kernels"


def test_reportgen_runs_the_demo_from_another_directory(installed):
    _, bin_dir, elsewhere = installed
    done = command([bin_dir / "reportgen", "dataset.limit=16", "analysis=[summary,predictions]",
                    "runtime.num_workers=0", "runtime.progress=false", "hydra.run.dir=out/demo"], elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    index = elsewhere / "out" / "demo" / "report" / "index.html"
    assert f"report: {index}" in done.stdout
    page = index.read_text(encoding="utf-8")
    assert "Predictions" in page and "Architecture summary" in page
    assert (elsewhere / "out" / "demo" / "reportgen.log").exists()


def test_python_m_reportgen_composes_the_packaged_config(installed):
    python, _, elsewhere = installed
    done = command([python, "-m", "reportgen", "--cfg", "job"], elsewhere)
    assert done.returncode == 0, done.stderr
    assert "reportgen.inputs.demo.models.demo_cnn" in done.stdout and "batch_size: 32" in done.stdout
