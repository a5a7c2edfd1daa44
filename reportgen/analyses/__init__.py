"""Analyses register themselves by name on import; importing this package makes all of them selectable."""
from reportgen.analyses.base import ANALYSES, Analysis, Batch, Requirements, RunContext, get_analysis, register
from reportgen.analyses import predictions, summary  # noqa: F401  (registration side effect)

__all__ = ["ANALYSES", "Analysis", "Batch", "Requirements", "RunContext", "get_analysis", "register"]
