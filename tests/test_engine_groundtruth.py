"""The engine against closed forms and leave-one-out retraining (scikit-learn's bundled data)."""

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from scipy.stats import pearsonr, spearmanr  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import fastif  # noqa: E402
from fastif.engine.hessian import HessianOperator, top_eigenvalue  # noqa: E402
from fastif.engine.params import select_parameters  # noqa: E402
from fastif.engine.scoring import query_gradients  # noqa: E402
from fastif.engine.solvers import CGSolver, ExactSolver, LissaSolver  # noqa: E402
from fastif.errors import SolverDivergenceError  # noqa: E402


def _squared_error(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _log_loss(model, batch):
    x, y = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")


@pytest.fixture(scope="module")
def ridge():
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0))
    y = torch.tensor((y - y.mean()) / y.std())
    n, p = x.shape
    lam = 0.05
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    hessian = xa.T @ xa / n
    w = torch.linalg.solve(hessian + lam * torch.eye(p + 1, dtype=x.dtype), xa.T @ y / n)
    model = torch.nn.Linear(p, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:p][None])
        model.bias.copy_(w[p:])
    return model, x, y, hessian, lam


def test_ridge_exact_and_cg_match_closed_form(ridge):
    model, x, y, hessian, lam = ridge
    sel = select_parameters(model)
    op = HessianOperator(model, _squared_error, (x, y), sel, batch_size=128)
    grads = query_gradients(model, _squared_error, (x[:7], y[:7]), sel)
    closed = torch.linalg.solve(hessian + lam * torch.eye(hessian.shape[0], dtype=hessian.dtype), grads.T).T
    for solver in (ExactSolver(), CGSolver(tol=1e-10)):
        got = solver.solve(op, grads, lam).vectors
        rel = float((got - closed).norm() / closed.norm())
        assert rel < 1e-6, (solver.name, rel)


def test_top_eigenvalue_matches_dense(ridge):
    model, x, y, hessian, _ = ridge
    sel = select_parameters(model)
    op = HessianOperator(model, _squared_error, (x, y), sel, batch_size=128)
    assert top_eigenvalue(op, sample_size=None, iters=200, tol=1e-9) == pytest.approx(float(torch.linalg.eigvalsh(hessian).max()), rel=1e-4)


def test_lissa_too_small_scale_raises_named_divergence(ridge):
    model, x, y, hessian, lam = ridge
    sel = select_parameters(model)
    op = HessianOperator(model, _squared_error, (x, y), sel, batch_size=128)
    grads = query_gradients(model, _squared_error, (x[:2], y[:2]), sel)
    top = float(torch.linalg.eigvalsh(hessian).max())
    with pytest.raises(SolverDivergenceError, match="Raise hvp.scale to at least"):
        LissaSolver(scale=top / 4, depth=300, batch_size=32).solve(op, grads, lam)


@pytest.fixture(scope="module")
def logistic_loo():
    """L2-regularised logistic regression on breast cancer with exact leave-one-out retraining."""
    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    x = data.data[order]
    x = (x - x.mean(0)) / x.std(0)
    x = np.hstack([x, np.ones((len(x), 1))])  # intercept as a penalised feature: H + lambda I exactly
    y = data.target[order].astype(float)
    n_train = 200
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    c = 0.1

    def fit(xs, ys, warm=None):
        clf = LogisticRegression(C=c, fit_intercept=False, tol=1e-12, max_iter=10_000, solver="lbfgs", warm_start=warm is not None)
        if warm is not None:
            clf.coef_ = warm.copy()
        return clf.fit(xs, ys).coef_

    def loss(coef, xs, ys):
        z = xs @ coef.ravel()
        return np.logaddexp(0, z) - ys * z

    full = fit(xtr, ytr)
    test_points = [0, 1, 2, 3]
    base = loss(full, xte[test_points], yte[test_points])
    actual = np.zeros((len(test_points), n_train))
    for i in range(n_train):
        keep = np.arange(n_train) != i
        coef = fit(xtr[keep], ytr[keep], warm=full)
        actual[:, i] = loss(coef, xte[test_points], yte[test_points]) - base
    model = torch.nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(full))
    # sklearn minimises 0.5||w||^2 + C sum L = n C [(1/n) sum L + ||w||^2 / (2 n C)]
    damping = 1.0 / (n_train * c)
    train = (torch.tensor(xtr), torch.tensor(ytr))
    test = (torch.tensor(xte[test_points]), torch.tensor(yte[test_points]))
    return model, train, test, damping, actual, n_train


@pytest.mark.parametrize(
    "solver,options,threshold",
    [
        ("exact", {}, 0.95),
        ("cg", {"tol": 1e-8}, 0.95),
        # LiSSA with its documented settings: scale from the eigenvalue estimate, full-ish batches.
        (LissaSolver(depth=1000, batch_size=64, chains=2, seed=1), {}, 0.9),
    ],
)
def test_leave_one_out_correlation(logistic_loo, solver, options, threshold):
    model, train, test, damping, actual, n = logistic_loo
    scores = fastif.influence_scores(model, _log_loss, train, test, solver=solver, damping=damping, batch_size=64, **options)
    predicted = -scores.numpy() / n  # removing z changes the test loss by about -I/n
    for t in range(actual.shape[0]):
        pr = pearsonr(predicted[t], actual[t])[0]
        sr = spearmanr(predicted[t], actual[t])[0]
        assert pr >= threshold and sr >= threshold, (solver, t, pr, sr)
