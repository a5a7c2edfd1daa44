"""Which attribution methods to trust for this model: each method's scores against the controls', in plain words.

A method is judged on three questions, each answered separately so that disagreeing metrics stay visible (Tomsett
et al. 2020 found faithfulness metrics often disagree; merging them into one number would hide it):
- deletion: does removing its top pixels drop the score faster (lower deletion AUC) than removing the pixels a
  random map or an edge map ranks first?
- insertion / ROAD: does restoring its top pixels raise the score faster (higher insertion AUC), and does its ROAD
  score (LeRF minus MoRF: removing its least relevant pixels keeps the score, its most relevant ones lose it) beat
  the same controls?
- sanity (Adebayo et al. 2018): do its maps change when the weights are randomised? At the last step of the
  top-down cascade (every block random) a map that still has a rank correlation of `SANITY_LIMIT` or more with the
  original depends on the image more than on the model (an edge detector passes none of the faithfulness tests and
  all of this one's invariance).
The centred Gaussian is a third control: a map that does no better than "look at the middle" explains little.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

SANITY_LIMIT = 0.5  # Spearman of |maps| at the last top-down step: at or above, the maps barely depend on the weights
CONTROLS_JUDGED = ("random", "sobel")  # the controls a method must beat (the Gaussian is shown, not required)


def _beats(value: Optional[float], controls: List[Optional[float]], higher: bool) -> Optional[bool]:
    known = [c for c in controls if c is not None]
    if value is None or not known:
        return None
    return value > max(known) if higher else value < min(known)


def verdict(scores: Mapping[str, Any], controls: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """One method's checks ({"deletion", "insertion", "road", "sanity"}: True / False / None when not measured)
    and its plain-language line. `scores` and each control's entry hold `deletion_auc`, `insertion_auc`, `road`
    and, for the method, `sanity_last` (Spearman at the last top-down step)."""
    judged = [controls[name] for name in CONTROLS_JUDGED if name in controls]
    checks = {
        "deletion": _beats(scores.get("deletion_auc"), [c.get("deletion_auc") for c in judged], higher=False),
        "insertion": _beats(scores.get("insertion_auc"), [c.get("insertion_auc") for c in judged], higher=True),
        "road": _beats(scores.get("road"), [c.get("road") for c in judged], higher=True),
    }
    last = scores.get("sanity_last")
    checks["sanity"] = None if last is None else bool(last < SANITY_LIMIT)
    return {"checks": checks, "line": _line(checks, last)}


def _line(checks: Mapping[str, Optional[bool]], last: Optional[float]) -> str:
    faithful = [name for name in ("deletion", "insertion", "road") if checks[name]]
    unfaithful = [name for name in ("deletion", "insertion", "road") if checks[name] is False]
    parts = []
    if checks["sanity"] is True:
        parts.append(f"maps change when the weights are randomised (rank correlation {last:.2f} with every block "
                     f"random)")
    elif checks["sanity"] is False:
        parts.append(f"maps barely change when the weights are randomised (rank correlation {last:.2f} with every "
                     f"block random): they show the image more than the model")
    if faithful and not unfaithful:
        parts.append("removing its top pixels drops the score faster than removing random or edge pixels"
                     if "deletion" in faithful else
                     f"it beats random and edge maps on {_names(faithful)}")
    elif faithful:
        parts.append(f"the metrics disagree: it beats random and edge maps on {_names(faithful)}, not on "
                     f"{_names(unfaithful)}")
    elif unfaithful:
        parts.append(f"it does no better than a random or an edge map on {_names(unfaithful)}")
    measured = [v for v in checks.values() if v is not None]
    if not measured:
        return "not scored"
    head = "passes" if all(measured) else "fails" if not any(measured) else "mixed"
    return f"{head}: " + "; ".join(parts)


def _names(checks: List[str]) -> str:
    words = {"deletion": "deletion", "insertion": "insertion", "road": "ROAD"}
    items = [words[c] for c in checks]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
