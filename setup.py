"""Packaging, beyond pyproject.toml: which packages and data files the wheel holds.

The wheel carries the top-level conf/ and templates/ folders inside the package, as reportgen/conf and
reportgen/templates (reportgen/inputs/resources.py finds them in either place), so an installed `reportgen` runs
without a checkout, while a checkout keeps them where they are. Data folders are listed as (namespace) packages,
as setuptools wants every importable folder listed.

It also compiles reportgen/state/map_kernels.c, the fused CPU kernels of the activation statistics (loaded with
ctypes by reportgen/state/cpu_kernels.py), with OpenMP. The build is optional: without a C compiler the install
still succeeds and those statistics take the eager torch path (slower on a CPU, same results within the stated
bound).
"""
import sys

from setuptools import Extension, find_namespace_packages, setup

SHIPPED = {"reportgen.conf": "conf", "reportgen.templates": "templates"}  # package in the wheel: folder here
DATA = {"reportgen.inputs": ["imagenet_1k_synsets.tsv"], "reportgen.inputs.demo.weights": ["*.pt", "*.md"]}
SHIPPED_FILES = ["*.yaml", "*.html", "*.css", "*.js"]


def shipped_packages():
    """Each shipped folder and its subfolders (conf/model, conf/hydra/launcher, ...) as data-only packages."""
    for package, folder in SHIPPED.items():
        yield package
        yield from (f"{package}.{sub}" for sub in find_namespace_packages(where=folder, exclude=["*__pycache__"]))


def map_kernels() -> Extension:
    """The C kernels: a plain shared library (no Python API), OpenMP where the compiler has it (gcc, clang)."""
    openmp = [] if sys.platform in ("win32", "darwin") else ["-fopenmp"]
    return Extension("reportgen.state._map_kernels", sources=["reportgen/state/map_kernels.c"], optional=True,
                     extra_compile_args=["-O3", "-std=c99"] + openmp, extra_link_args=openmp)


shipped = list(shipped_packages())
setup(packages=find_namespace_packages(include=["reportgen", "reportgen.*"], exclude=["*__pycache__"]) + shipped,
      package_dir=SHIPPED, package_data={**DATA, **{package: SHIPPED_FILES for package in shipped}},
      ext_modules=[map_kernels()])
