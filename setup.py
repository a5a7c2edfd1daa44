"""Packaging, beyond pyproject.toml: which packages and data files the wheel holds.

The wheel carries the top-level conf/ and templates/ folders inside the package, as reportgen/conf and
reportgen/templates (reportgen/inputs/resources.py finds them in either place), so an installed `reportgen` runs
without a checkout, while a checkout keeps them where they are. Data folders are listed as (namespace) packages,
as setuptools wants every importable folder listed.
"""
from setuptools import find_namespace_packages, setup

SHIPPED = {"reportgen.conf": "conf", "reportgen.templates": "templates"}  # package in the wheel: folder here
DATA = {"reportgen.inputs": ["imagenet_1k_synsets.tsv"], "reportgen.inputs.demo.weights": ["*.pt", "*.md"]}
SHIPPED_FILES = ["*.yaml", "*.html", "*.css", "*.js"]


def shipped_packages():
    """Each shipped folder and its subfolders (conf/model, conf/hydra/launcher, ...) as data-only packages."""
    for package, folder in SHIPPED.items():
        yield package
        yield from (f"{package}.{sub}" for sub in find_namespace_packages(where=folder, exclude=["*__pycache__"]))


shipped = list(shipped_packages())
setup(packages=find_namespace_packages(include=["reportgen", "reportgen.*"], exclude=["*__pycache__"]) + shipped,
      package_dir=SHIPPED, package_data={**DATA, **{package: SHIPPED_FILES for package in shipped}})
