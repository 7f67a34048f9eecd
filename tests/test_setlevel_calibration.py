"""Calibration under the null and power of the set-level audit, on score tables built here.

Null: suspect and reference sets both drawn from non-members, many random splits; the share of
splits "detected" at alpha must lie inside the central 95% range of Binomial(splits, alpha) (a
fixed seed makes each check deterministic). A deliberately wrong procedure — fitting the
aggregation on the very samples it tests — must fail the same check, so the check has teeth.
Power: a mean shift so small that each feature alone has a per-sample AUC of about 0.53.
"""

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from lightning_mia.setlevel import AuditOptions, FeatureRows, dataset_inference
from lightning_mia.setlevel.audit import difficulty_weights
from lightning_mia.setlevel.scorer import fit_scorer
from lightning_mia.setlevel.stats import one_sided_test

SPLITS = 300
SHIFT_053 = float(np.sqrt(2) * stats.norm.ppf(0.53))  # unit-variance mean shift of AUC 0.53


def features(n: int, rng: np.random.Generator, shift: np.ndarray | float = 0.0) -> np.ndarray:
    """(n, 12): 8 normal columns, then skewed and heavy-tailed ones; `shift` added per column."""
    cols = [rng.normal(size=(n, 8))]
    cols.append(rng.exponential(size=(n, 1)))  # skewed, like a loss
    cols.append(rng.standard_t(3, size=(n, 1)))  # heavy tails
    cols.append(rng.lognormal(sigma=0.5, size=(n, 1)))
    cols.append(rng.gamma(2.0, size=(n, 1)))
    return np.concatenate(cols, 1) + shift


MEMBERSHIP = [f"loss/f{i}" for i in range(12)]
BLIND = ["blind/mean_r", "blind/std_r", "blind/hf_energy"]


def rows(name: str, ids: np.ndarray, x: np.ndarray, blind: np.ndarray, member) -> FeatureRows:
    feats = {n: x[:, j] for j, n in enumerate(MEMBERSHIP)}
    feats.update({n: blind[:, j] for j, n in enumerate(BLIND)})
    return FeatureRows(name, ids, feats, np.asarray(member, bool))


def shadow_rows(rng: np.random.Generator, n: int, shift: float, start: int) -> FeatureRows:
    member = np.arange(n) < n // 2
    x = features(n, rng) + shift * member[:, None]
    return rows(f"shadow {start}", np.arange(start, start + n), x, rng.normal(size=(n, 3)), member)


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    n = 3000
    return rows("pool", np.arange(n), features(n, rng), rng.normal(size=(n, 3)), np.zeros(n))


def _take(rows_: FeatureRows, index: np.ndarray, name: str) -> FeatureRows:
    feats = {k: v[index] for k, v in rows_.features.items()}
    return FeatureRows(name, rows_.sample_id[index], feats, rows_.is_member[index])


def null_p_values(pool, options, size, shadows=(), splits=SPLITS):
    rng = np.random.default_rng(options.seed)
    out, shift_p = [], []
    for _ in range(splits):
        order = rng.permutation(len(pool.sample_id))
        s = _take(pool, order[:size], "suspect set")
        r = _take(pool, order[size : 2 * size], "reference set")
        res = dataset_inference(s, r, shadows, options=options)
        out.append(res.p_value)
        shift_p.append(res.shift.outcome.p_value)
    return np.array(out), np.array(shift_p)


def assert_calibrated(p: np.ndarray, alpha: float) -> None:
    n = len(p)
    low, high = stats.binom.ppf([0.025, 0.975], n, alpha)
    hits = int((p < alpha).sum())
    assert low <= hits <= high, f"{hits} of {n} detected at {alpha} (95% range {low}-{high})"


@pytest.fixture(scope="module")
def held_out_null(pool):
    options = AuditOptions(aggregation="held-out", subset_repeats=0, permutations=999, seed=1)
    return null_p_values(pool, options, size=150)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_held_out_audit_is_calibrated_under_the_null(held_out_null, alpha):
    p, shift_p = held_out_null
    assert len(p) >= 200
    assert_calibrated(p, alpha)
    assert_calibrated(shift_p, alpha)  # the shift guard is a test like any other


def test_held_out_null_p_values_are_uniform(held_out_null):
    assert stats.kstest(held_out_null[0], "uniform").pvalue > 0.01


@pytest.fixture(scope="module")
def shadow_null(pool):
    rng = np.random.default_rng(7)
    shadows = [shadow_rows(rng, 600, 0.3, 10_000 + 1000 * i) for i in range(2)]
    options = AuditOptions(aggregation="shadow", subset_repeats=0, permutations=999, seed=2)
    return null_p_values(pool, options, size=120, shadows=shadows, splits=240)[0]


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_shadow_audit_is_calibrated_under_the_null(shadow_null, alpha):
    assert_calibrated(shadow_null, alpha)


def test_permutation_test_on_small_sets_is_calibrated(pool):
    options = AuditOptions(
        aggregation="held-out", test="auto", permutations=499, subset_repeats=0, seed=3
    )
    p, _ = null_p_values(pool, options, size=24, splits=240)  # 12 tested a side: permutation
    assert_calibrated(p, 0.05)
    assert_calibrated(p, 0.01)


def test_the_check_catches_an_aggregation_fitted_on_the_tested_samples(pool):
    """Negative control: in-sample fitting inflates the detection rate far past the range."""
    rng = np.random.default_rng(4)
    p = []
    for _ in range(200):
        order = rng.permutation(len(pool.sample_id))
        s, r = pool.matrix(MEMBERSHIP)[order[:150]], pool.matrix(MEMBERSHIP)[order[150:300]]
        scorer = fit_scorer(np.r_[s, r], np.r_[np.ones(150), np.zeros(150)], MEMBERSHIP)
        p.append(one_sided_test(scorer.score(s), scorer.score(r)).p_value)
    with pytest.raises(AssertionError, match="detected at 0.05"):
        assert_calibrated(np.array(p), 0.05)


def planted(rng: np.random.Generator, n: int, member: bool, start: int) -> FeatureRows:
    """Rows whose 8 normal features are shifted by SHIFT_053 for members (per-sample AUC 0.53
    each); the 4 others are noise."""
    shift = np.r_[np.full(8, SHIFT_053), np.zeros(4)] * member
    x = features(n, rng, shift)
    return rows("rows", np.arange(start, start + n), x, rng.normal(size=(n, 3)), np.full(n, member))


def test_each_planted_feature_alone_is_near_chance():
    rng = np.random.default_rng(5)
    m, nm = planted(rng, 20_000, True, 0), planted(rng, 20_000, False, 10**6)
    labels = np.r_[np.ones(20_000), np.zeros(20_000)]
    aucs = [roc_auc_score(labels, np.r_[m.features[f], nm.features[f]]) for f in MEMBERSHIP[:8]]
    assert all(0.52 < a < 0.54 for a in aucs), aucs


def planted_audit(seed: int, size: int, repeats: int):
    rng = np.random.default_rng(100 + seed)
    suspect = planted(rng, size, True, 0)
    reference = planted(rng, size, False, 10**5)
    shadows = []
    for i in range(2):  # 2 shadow models, 1,000 rows each, half members
        a, b = planted(rng, 500, True, 10**6 + 2000 * i), planted(rng, 500, False, 10**7 + 2000 * i)
        feats = {k: np.r_[a.features[k], b.features[k]] for k in a.features}
        ids = np.r_[a.sample_id, b.sample_id]
        shadows.append(FeatureRows(f"shadow {i}", ids, feats, np.r_[a.is_member, b.is_member]))
    options = AuditOptions(subset_repeats=repeats, seed=seed)
    return dataset_inference(suspect, reference, shadows, options=options)


def test_a_few_hundred_members_are_detected_where_each_feature_is_at_auc_053():
    """8 features at AUC 0.53 each: a set of 300 is detected at p < 0.01 in most draws."""
    results = [planted_audit(seed, 300, 0) for seed in range(20)]
    p = np.array([r.p_value for r in results])
    assert all(r.aggregation == "shadow" for r in results)
    assert (p < 0.01).mean() >= 0.75, np.sort(p)
    assert np.median(p) < 1e-3
    assert max(r.outcome.auc for r in results) < 0.7  # a weak per-sample score: the set works


def test_the_size_curve_finds_where_detection_starts():
    res = planted_audit(0, 600, 30)
    assert res.decision == "detected" and res.p_value < 1e-4
    curve = res.curve
    assert curve.median[0] > 0.05  # 5 samples: nothing
    assert curve.smallest_size is not None and 50 <= curve.smallest_size <= 400
    assert all(lo <= m <= hi for lo, m, hi in zip(curve.low, curve.median, curve.high))


def test_group_p_values_are_calibrated_under_the_null(pool):
    """One tested group per split (so the counts are independent): its leave-one-group-out
    aggregation never saw it, so its p-value is uniform when the set is unused."""
    rng = np.random.default_rng(8)
    options = AuditOptions(aggregation="held-out", subset_repeats=0, permutations=999, seed=5)
    p = []
    for _ in range(200):
        order = rng.permutation(len(pool.sample_id))
        s, r = _take(pool, order[:60], "suspect set"), _take(pool, order[60:160], "reference set")
        groups = {int(i): ("a" if j < 30 else "b") for j, i in enumerate(s.sample_id)}
        res = dataset_inference(s, r, groups=groups, group_by="user", options=options)
        p.append(next(g.outcome.p_value for g in res.groups if g.name == "a"))
    assert_calibrated(np.array(p), 0.05)
    assert_calibrated(np.array(p), 0.01)


DIFFICULTY_SD = 3.0  # per-sample difficulty: shared by every model that scores the sample


def difficulty_world(seed: int, size: int, shift: float):
    """Suspect (members, `shift` added) and reference rows of a target, two shadows' queries
    of the same samples, and two shadows' own rows: every model sees each sample's difficulty
    (sd DIFFICULTY_SD) plus its own noise (sd 1); only the target's members are shifted."""
    rng = np.random.default_rng(seed)
    n_total = 2 * size

    def model_rows(name, ids, difficulty, member, shift_):
        x = difficulty + rng.normal(size=difficulty.shape) + shift_ * member[:, None]
        return rows(name, ids, x, rng.normal(size=(len(ids), 3)), member)

    difficulty = DIFFICULTY_SD * rng.normal(size=(n_total, 12))
    ids = np.arange(n_total)
    member = ids < size
    target = model_rows("target", ids, difficulty, member, shift)
    suspect, reference = (
        _take(target, ids[:size], "suspect set"),
        _take(target, ids[size:], "reference set"),
    )
    never = np.zeros(n_total, bool)
    calibration = [model_rows(f"shadow {k}", ids, difficulty, never, 0.0) for k in range(2)]
    shadows = []
    for k in range(2):  # their own rows: other samples, half of them members
        own = 10_000 * (k + 1) + np.arange(800)
        own_member = np.arange(800) < 400
        shadows.append(
            model_rows(
                f"shadow rows {k}", own, DIFFICULTY_SD * rng.normal(size=(800, 12)), own_member, 0.3
            )
        )
    return suspect, reference, shadows, calibration


def test_difficulty_calibration_finds_a_set_the_raw_features_hide():
    """Where each sample's difficulty is most of a feature's spread, the shadows' queries of
    the same sample remove it: the same shift is detected from the calibrated features and
    not from the raw ones, and the raw test is kept beside it."""
    suspect, reference, shadows, calibration = difficulty_world(1, 150, 0.25)
    options = AuditOptions(subset_repeats=0, seed=0)
    res = dataset_inference(suspect, reference, shadows, options=options, calibration=calibration)
    raw = dataset_inference(
        suspect,
        reference,
        shadows,
        options=replace(options, difficulty="none"),
        calibration=calibration,
    )
    assert res.difficulty_models == 2 and raw.difficulty_models == 0 and raw.uncalibrated is None
    assert res.uncalibrated.p_value == pytest.approx(raw.p_value)
    assert res.p_value < 1e-5 and raw.p_value > 0.01, (res.p_value, raw.p_value)
    assert "difficulty-calibrated" in res.difficulty and "raw features" in raw.difficulty


@pytest.fixture(scope="module", params=[60, 20], ids=["welch", "permutation"])
def difficulty_null(request):
    """Calibrated p-values of 240 independent worlds without a member in the suspect set: 60
    samples a side (Welch's test), and 20 (fewer than 30: the permutation test)."""
    p, tests = [], set()
    for seed in range(240):
        world = difficulty_world(1000 + seed, request.param, 0.0)
        options = AuditOptions(subset_repeats=0, seed=seed, permutations=499)
        res = dataset_inference(*world[:3], options=options, calibration=world[3])
        assert res.difficulty_models == 2
        p.append(res.p_value)
        tests.add(res.outcome.test)
    assert tests == {"welch" if request.param == 60 else "permutation"}
    return np.array(p)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_difficulty_calibrated_audit_is_calibrated_under_the_null(difficulty_null, alpha):
    assert_calibrated(difficulty_null, alpha)


def test_difficulty_weights_keep_what_the_shadows_do_not_reproduce():
    """A feature the shadows reproduce sample by sample gets a weight near 1 (its difficulty is
    removed); one they do not (independent noise per model, as a generated image's semantics)
    a weight near 0, so calibration adds none of the shadows' noise to it."""
    rng = np.random.default_rng(3)
    n = 4000
    shared = DIFFICULTY_SD * rng.normal(size=n)
    target = np.stack([shared + rng.normal(size=n), rng.normal(size=n)], axis=1)
    shadows = [np.stack([shared + rng.normal(size=n), rng.normal(size=n)], 1) for _ in range(2)]
    mean = np.mean(shadows, axis=0)
    w = difficulty_weights(target, mean)
    expected = DIFFICULTY_SD**2 / (DIFFICULTY_SD**2 + 1 / 2)  # Cov(t, m) / Var(m)
    assert w[0] == pytest.approx(expected, abs=0.03) and abs(w[1]) < 0.05
    calibrated = target - w * mean
    assert calibrated[:, 0].var() < 0.2 * target[:, 0].var()  # the difficulty is gone
    assert calibrated[:, 1].var() < 1.05 * target[:, 1].var()  # the noise is not doubled
    assert (target - mean)[:, 1].var() > 1.4 * target[:, 1].var()  # plain subtraction would
    assert difficulty_weights(target, np.ones((n, 2))).tolist() == [0.0, 0.0]
    # a constant whose mean is not exact in floating point: still no weight (not 1e3)
    assert difficulty_weights(1e3 * target, np.full((n, 2), 0.1)).tolist() == [0.0, 0.0]
