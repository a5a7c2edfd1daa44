"""Analyses register themselves by name on import; importing this package imports every module in it, so a new
analysis is one new file here (with a `@register("name")` class) and nothing else to edit."""
import importlib
import pkgutil

from reportgen.analyses.base import ANALYSES, Analysis, Batch, Requirements, RunContext, get_analysis, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ANALYSES", "Analysis", "Batch", "Requirements", "RunContext", "get_analysis", "register"]
