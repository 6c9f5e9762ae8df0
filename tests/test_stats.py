import numpy as np

from gere.stats import RunningStats


def test_large_mean_statistics_match_float64_where_naive_float32_fails():
    rng = np.random.default_rng(0)
    data = (1e4 + rng.standard_normal((20000, 8))).astype(np.float32)
    running = RunningStats(8)
    for start in range(0, len(data), 777):
        running.update(data[start : start + 777])
    ref = data.astype(np.float64)
    np.testing.assert_allclose(running.mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(running.std, ref.std(0), rtol=1e-9)
    # The naive formula in float32 loses the variance entirely at this mean.
    x = data
    naive_var = (x * x).mean(0, dtype=np.float32) - np.square(x.mean(0, dtype=np.float32))
    assert np.max(np.abs(np.sqrt(np.maximum(naive_var, 0)) - ref.std(0))) > 0.5


def test_merge_equals_single_pass():
    rng = np.random.default_rng(1)
    a, b = rng.normal(5, 2, (300, 4)), rng.normal(-3, 0.5, (1000, 4))
    left, right, whole = RunningStats(4), RunningStats(4), RunningStats(4)
    left.update(a)
    right.update(b)
    whole.update(np.concatenate([a, b]))
    left.merge(right)
    assert left.count == 1300
    np.testing.assert_allclose(left.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(left.m2, whole.m2, rtol=1e-10)


def test_zero_variance_and_empty():
    s = RunningStats(3)
    assert (s.std == 0).all()
    s.update(np.ones((10, 3)))
    assert (s.std == 0).all() and np.isfinite(s.std).all()
