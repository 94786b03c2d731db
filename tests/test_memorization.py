"""The memorization check's comparison (eval.memorization): shares of painted and real held-out faces
with a training face within each threshold, and nearest distances that find the closest face."""
import numpy as np
import pytest

from eval.memorization import STRICTER, by_threshold, nearest_distances


def test_nearest_distance_is_to_the_closest_training_face_whatever_the_chunking():
    rng = np.random.default_rng(0)
    train, queries = rng.normal(size=(1000, 128)), rng.normal(size=(7, 128))
    queries[3] = train[517] + 0.01  # a copy of a training face
    d = nearest_distances(queries, train, chunk=64)
    expected = np.linalg.norm(queries[:, None] - train[None], axis=-1).min(axis=1)
    assert d == pytest.approx(expected, rel=1e-5) and d[3] < 0.2


def test_a_copying_generator_shows_above_chance_at_the_stricter_thresholds():
    real = np.array([0.38, 0.45, 0.52, 0.58, 0.7])
    copied = np.array([0.05, 0.1, 0.2, 0.58, 0.7])
    table = by_threshold(copied, real)
    assert list(table) == [f"{t:g}" for t in STRICTER] and table["0.536"]["real"] == 0.6
    assert table["0.4"] == {"painted": 0.6, "real": 0.2}  # three copies under 0.4, one real face by chance
    assert table["0.6"]["painted"] == table["0.6"]["real"] == 0.8  # at 0.6 chance hides the copies
