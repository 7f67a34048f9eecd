"""The set-level audit's statistics and aggregation, checked against independent computations
(textbook formulas, exact enumeration, scikit-learn)."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lightning_mia.setlevel.curve import reference_size, size_grid, smallest_size
from lightning_mia.setlevel.scorer import fit_scorer, logistic_regression
from lightning_mia.setlevel.stats import (
    Outcome,
    auc_greater,
    batch_p_values,
    benjamini_hochberg,
    choose_test,
    cohens_d,
    one_sided_test,
    permutation_greater,
    skewness,
    welch_greater,
)


def test_welch_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    s, r = rng.normal(0.4, 1.0, 40), rng.normal(0.0, 2.0, 70)
    vs, vr = s.var(ddof=1) / len(s), r.var(ddof=1) / len(r)
    t = (s.mean() - r.mean()) / math.sqrt(vs + vr)
    df = (vs + vr) ** 2 / (vs**2 / (len(s) - 1) + vr**2 / (len(r) - 1))
    got_t, got_p = welch_greater(s, r)
    assert got_t == pytest.approx(t, rel=1e-12)
    assert got_p == pytest.approx(stats.t.sf(t, df), rel=1e-9)
    # one-sided: the reversed comparison gives the other tail
    assert welch_greater(r, s)[1] == pytest.approx(1 - got_p, rel=1e-9)


def test_welch_on_constant_scores_is_no_evidence():
    assert welch_greater(np.ones(5), np.ones(5)) == (0.0, 1.0)


def test_permutation_test_is_exact_on_tiny_sets():
    # 6 ways to pick 2 of {1, 2, 3, 4} as "suspect"; only {3, 4} reaches the observed difference
    _, p = permutation_greater(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 9999, seed=0)
    assert p == pytest.approx(1 / 6)
    _, p = permutation_greater(np.array([1.0, 2.0]), np.array([3.0, 4.0]), 9999, seed=0)
    assert p == pytest.approx(1.0)


def test_effect_sizes_match_their_definitions():
    rng = np.random.default_rng(1)
    s, r = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 50)
    pooled = math.sqrt(((29 * s.var(ddof=1)) + 49 * r.var(ddof=1)) / 78)
    assert cohens_d(s, r) == pytest.approx((s.mean() - r.mean()) / pooled)
    labels = np.r_[np.ones(30), np.zeros(50)]
    assert auc_greater(s, r) == pytest.approx(roc_auc_score(labels, np.r_[s, r]))
    ties = np.array([1.0, 1.0]), np.array([1.0, 1.0])
    assert auc_greater(*ties) == 0.5 and cohens_d(*ties) == 0.0


def test_auc_and_skewness_equal_scipys_with_ties_and_constant_rows():
    rng = np.random.default_rng(3)
    s, r = rng.integers(0, 6, 37).astype(float), rng.integers(1, 7, 53).astype(float)  # ties
    u = stats.mannwhitneyu(s, r, alternative="greater").statistic
    assert auc_greater(s, r) == pytest.approx(u / (37 * 53), rel=1e-12)
    rows = np.stack([rng.exponential(size=40), rng.normal(size=40), np.full(40, 2.5)])
    want = [stats.skew(rows[0]), stats.skew(rows[1]), 0.0]
    np.testing.assert_allclose(skewness(rows), want, rtol=1e-10, atol=1e-12)
    assert skewness(rows[0]) == pytest.approx(want[0], rel=1e-10)


def test_auto_takes_welch_only_where_it_is_safe():
    rng = np.random.default_rng(2)
    normal = rng.normal(size=200), rng.normal(size=200)
    assert choose_test(*normal, "auto")[0] == "welch"
    assert choose_test(normal[0][:10], normal[1], "auto")[0] == "permutation"  # too few
    skewed = rng.exponential(size=200) ** 2, rng.exponential(size=200) ** 2
    assert choose_test(*skewed, "auto")[0] == "permutation"
    # a big shift between two normal sides is signal, not skewness
    assert choose_test(normal[0] + 10, normal[1], "auto")[0] == "welch"
    assert choose_test(*skewed, "welch")[0] == "welch"


def test_one_sided_test_reports_its_numbers():
    rng = np.random.default_rng(3)
    s, r = rng.normal(0.5, 1, 100), rng.normal(0, 1, 120)
    o = one_sided_test(s, r)
    assert o.test == "welch" and o.p_value == pytest.approx(welch_greater(s, r)[1])
    assert (o.suspect_n, o.reference_n) == (100, 120)
    assert o.mean_difference == pytest.approx(s.mean() - r.mean())
    assert Outcome.from_dict(o.to_dict()) == o
    with pytest.raises(ValueError, match="2 scores a side"):
        one_sided_test(s[:1], r)


def test_outcome_json_has_no_nan():
    o = Outcome("welch", float("nan"), math.inf, 0.0, 0.0, 0.5, 2, 2, "x")
    d = o.to_dict()
    assert d["p_value"] is None and d["statistic"] is None
    assert math.isnan(Outcome.from_dict(d).p_value)


def test_batch_p_values_equal_single_tests():
    rng = np.random.default_rng(4)
    s, r = rng.normal(0.3, 1, (6, 40)), rng.normal(0, 1, (6, 50))
    single = [welch_greater(a, b)[1] for a, b in zip(s, r)]
    np.testing.assert_allclose(batch_p_values(s, r, "auto"), single, rtol=1e-10)
    tiny_s, tiny_r = np.array([[3.0, 4.0], [1.0, 2.0]]), np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(batch_p_values(tiny_s, tiny_r, "auto"), [1 / 6, 1.0])


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.012])
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    expected = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty_like(p)
    q[order] = np.minimum(expected, 1)
    np.testing.assert_allclose(benjamini_hochberg(p), q)
    assert benjamini_hochberg(np.array([])).size == 0


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_logistic_regression_matches_scikit_learn(l2):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 7))
    y = (x @ rng.normal(size=7) + rng.normal(size=300) > 0.3).astype(float)
    w, b = logistic_regression(x, y, l2)
    ref = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-5)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_logistic_regression_stays_finite_on_separable_data():
    x = np.r_[np.full((20, 1), 5.0), np.full((20, 1), -5.0)]
    y = np.r_[np.ones(20), np.zeros(20)]
    w, b = logistic_regression(x, y, 1.0)
    assert np.isfinite(w).all() and w[0] > 0 and abs(b) < 1e-6


def test_scorer_reduces_embeddings_drops_constants_and_ranks_members_higher():
    rng = np.random.default_rng(6)
    n = 200
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    emb = rng.normal(size=(n, 16))
    names = ["loss/t1", "pixel/const"] + [f"blind/img_emb_{i}" for i in range(16)]
    x = np.c_[y * 1.5 + rng.normal(size=n), np.ones(n), emb]
    scorer = fit_scorer(x, y, names, components=3)
    assert scorer.used == ("loss/t1", "blind/img_emb_pc0", "blind/img_emb_pc1", "blind/img_emb_pc2")
    scores = scorer.score(x)
    assert scores.shape == (n,)
    assert roc_auc_score(y, scores) > 0.8
    np.testing.assert_array_equal(scorer.score(x[:5]), scores[:5])  # row by row the same


def test_size_grid_and_smallest_size():
    grid = size_grid(300, 16)
    assert grid[0] == 5 and grid[-1] == 300 and grid == sorted(set(grid))
    assert size_grid(4, 16) == []
    with_quoted = size_grid(300, 16, extra=(100, 300, 1000, 2))  # 1000 > |S|, 2 < the start
    assert {100, 300} <= set(with_quoted) and 1000 not in with_quoted and 2 not in with_quoted
    assert set(grid) <= set(with_quoted)
    assert smallest_size([5, 10, 20, 40], [0.5, 0.005, 0.02, 0.001]) == 40  # must stay below
    assert smallest_size([5, 10, 20], [0.5, 0.005, 0.002]) == 10
    assert smallest_size([5, 10], [0.5, 0.2]) is None
    assert reference_size(10, 100, 300) == 30 and reference_size(1, 100, 300) == 5
    assert reference_size(100, 100, 40) == 40
