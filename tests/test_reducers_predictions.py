"""Mergeable reducers and the predictions analysis's label matching and merge."""
import numpy as np

from reportgen.inputs.labels import display_names, match_labels, normalise_class_name
from reportgen.state.reducers import BoundedTop, FixedHistogram


def test_bounded_top_keeps_the_true_top_k_and_merges_exactly():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, size=200).astype(float)  # many ties: broken by the smaller index
    whole = BoundedTop(7)
    halves = [BoundedTop(7), BoundedTop(7)]
    for i, s in enumerate(scores):
        probe = np.array([s - 1, s, s, s + 1]), np.array([i, i - 1, i + 1, i])  # around the item itself
        assert whole.accepts_many(*probe).tolist() == [whole.accepts(a, b) for a, b in zip(*probe)]
        whole.push(s, i, {"i": i})
        halves[i % 2].push(s, i, {"i": i})
    halves[1].merge(halves[0])
    expected = sorted(range(200), key=lambda i: (-scores[i], i))[:7]
    assert [order for _, order, _ in whole.items()] == expected
    assert [payload["i"] for _, _, payload in halves[1].items()] == expected


def test_fixed_histogram_counts_clips_and_merges():
    edges = np.linspace(0, 1, 5)
    a, b, whole = FixedHistogram(edges), FixedHistogram(edges), FixedHistogram(edges)
    values = np.array([0.0, 0.1, 0.25, 0.5, 0.99, 1.0, 1.7, -3.0, np.nan, np.inf])
    a.add(values[:5])
    b.add(values[5:])
    whole.add(values)
    a.merge(b)
    assert whole.counts.tolist() == [3, 1, 1, 3] and whole.nan == 2
    assert a.counts.tolist() == whole.counts.tolist() and a.nan == whole.nan


def test_folder_names_match_model_classes_loosely():
    model = ["tench, Tinca tinca", "golden retriever", "Great White Shark"]
    assert normalise_class_name("Golden_Retriever") == "golden retriever"
    assert match_labels(["golden_retriever", "tench", "great-white-shark", "cat"], model).tolist() == [1, 0, 2, -1]
    assert display_names(["a"], 3) == ["a", "class 1", "class 2"]
