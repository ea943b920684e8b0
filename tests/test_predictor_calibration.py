"""Issue 17: honest cross-validation (every fold fits every hyperparameter) and a calibrated band
(about 68% of held-out measurements inside ``predicted ± uncertainty``)."""

from __future__ import annotations

import io

import joblib
import numpy as np
import pytest
from sklearn.gaussian_process import GaussianProcessRegressor

from archopt.archdb.arch import BaseSpec
from archopt.optimizer import Featurizer, train_predictor
from archopt.optimizer.calibration import LEVEL, conformal_scale, coverage, cross_coverage, scores
from archopt.optimizer.gp import _fast_lml, _QuietGP, gp_pipeline

from helpers.synthetic import SyntheticTruth, random_archive

SMALL = BaseSpec("llama", 16, 256, 8, 4, 32, 688, 1000)
TRUTH = SyntheticTruth(noise=0.01, seed=3)


def test_fast_gp_gradient_matches_scikit_learn():
    rng = np.random.default_rng(0)
    for d in (1, 6):
        X = rng.random((60, d))
        y = 2 * X[:, 0] + 0.1 * rng.normal(size=60)
        gp = gp_pipeline(list(range(d)), 0).fit(X, y).named_steps["gp"]
        for theta in (gp.kernel_.theta, gp.kernel_.theta + 0.3 * rng.normal(size=len(gp.kernel_.theta))):
            want = GaussianProcessRegressor.log_marginal_likelihood(gp, theta, True)
            got = _fast_lml(gp, theta)
            assert got[0] == pytest.approx(want[0], rel=1e-9)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-8)


def test_every_fold_fits_its_own_gp_hyperparameters(monkeypatch):
    """Above 80 rows the GP's kernel used to be fitted once on every row and reused by the folds."""
    fits: list[int] = []
    original = _QuietGP.fit

    def counting(self, X, y):
        if self.optimizer is not None:
            fits.append(len(X))
        return original(self, X, y)

    monkeypatch.setattr(_QuietGP, "fit", counting)
    tr = random_archive(SMALL, 100, seed=1)
    fz = Featurizer.for_spec(SMALL, "model")
    p = train_predictor(fz.transform(tr), TRUTH.ppl(tr, noisy=True), "ppl_wikitext2", seed=0, featurizer=fz,
                        candidates=("gp",))
    assert sorted(fits) == [80] * 5 + [100]     # one hyperparameter fit per fold (80 rows), then all rows
    assert 0.3 < p.cv["kendall_tau"] < 0.99


def test_conformal_scale_and_cross_coverage():
    s = np.arange(1, 11, dtype=float)          # ceil(11 * 0.6827) = 8th smallest
    assert conformal_scale(s) == 8.0
    assert conformal_scale([0.0, 0.0]) == 1.0 and conformal_scale([np.inf, 2.0, 1.0]) == 2.0
    folds = [np.arange(0, 5), np.arange(5, 10)]
    assert cross_coverage(s, folds) == pytest.approx(0.5)   # each half judged by the other half's quantile
    np.testing.assert_array_equal(scores([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]), [0.0, 2.0, np.inf])


@pytest.fixture(scope="module")
def split():
    fz = Featurizer.for_spec(SMALL, "model")
    tr, te = random_archive(SMALL, 150, seed=1), random_archive(SMALL, 400, seed=2)
    return fz, fz.transform(tr), TRUTH.ppl(tr, noisy=True), fz.transform(te), TRUTH.ppl(te, noisy=True)


@pytest.mark.parametrize("algorithm", ["gp", "extra_trees", "gbdt"])
def test_the_band_holds_about_68_percent_of_held_out_measurements(split, algorithm):
    fz, X, y, X_te, y_te = split
    p = train_predictor(X, y, "ppl_wikitext2", seed=0, featurizer=fz, candidates=(algorithm,))
    held_out = coverage(p, X_te, y_te)
    assert abs(held_out - LEVEL) < 0.12, held_out
    assert abs(p.cv["coverage"] - LEVEL) < 0.12 and p.cv["calibration"]["scale"] == p.uncertainty_scale > 0
    loaded = joblib.load(io.BytesIO(_dump(p)))
    np.testing.assert_allclose(loaded.predict(X_te[:5])[1], p.predict(X_te[:5])[1])


def _dump(p) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(p, buffer)
    return buffer.getvalue()


def test_trees_that_agree_on_a_row_do_not_make_the_band_explode():
    """Six rows: trees that agree on a held-out row gave a raw spread of ~1e-14 and a band of 1e16."""
    tr = random_archive(SMALL, 6, seed=4)
    fz = Featurizer.for_spec(SMALL, "model")
    y = TRUTH.ppl(tr, noisy=True)
    p = train_predictor(fz.transform(tr), y, "ppl_wikitext2", seed=0, featurizer=fz, candidates=("extra_trees",))
    _, std = p.predict(fz.transform(random_archive(SMALL, 20, seed=5)))
    assert np.all(np.isfinite(std)) and std.max() < 10 * np.ptp(y)
