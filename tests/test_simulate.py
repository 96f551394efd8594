"""fastif.simulate: the one-step probe, the candidate sets and the `fastif simulate` command."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fastif import simulate as sim
from conftest import cli_env, fastif_executable

WEIGHT_DECAY = 0.05


class Logistic(torch.nn.Module):
    """Two-class logistic regression on dict batches {'x', 'labels'}."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 2, dtype=torch.float64)


def logistic_loss(model: Logistic, batch) -> torch.Tensor:
    # The L2 term makes the training objective strictly convex: H is positive definite.
    penalty = 0.5 * WEIGHT_DECAY * sum((p ** 2).sum() for p in model.parameters())
    return F.cross_entropy(model.linear(batch["x"]), batch["labels"], reduction="none") + penalty


class Rows:
    """The EncodedDataset surface simulate() uses: len() and batch(indices)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"x": self.x[idx], "labels": self.labels[idx]}


def toy_problem(seed: int = 0, n: int = 200, dim: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    true_w = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)[:dim]
    labels = (torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(x @ true_w)).long()
    model = Logistic(dim)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = logistic_loss(model, {"x": x, "labels": labels}).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, Rows(x, labels)


def exact_influence(model: Logistic, train: Rows, test_batch) -> np.ndarray:
    """-grad L(z_i) . H^-1 grad L(z_test) by a dense Hessian (the toy's ground truth)."""
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]

    def unflatten(vector):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            out[name] = vector[offset: offset + size].reshape(shape)
            offset += size
        return out

    def loss_at(vector, batch):
        return _loss_with(model, unflatten(vector), batch)

    everything = train.batch(range(len(train)))
    hessian = torch.func.hessian(lambda v: loss_at(v, everything).mean())(flat)
    g_test = torch.func.grad(lambda v: loss_at(v, test_batch).sum())(flat)
    per_train = torch.func.vmap(torch.func.grad(lambda v, x, y: loss_at(v, {"x": x[None], "labels": y[None]}).sum()),
                                in_dims=(None, 0, 0))(flat, everything["x"], everything["labels"])
    return (-(per_train @ torch.linalg.solve(hessian, g_test))).numpy()


def _loss_with(model: Logistic, weights, batch):
    logits = batch["x"] @ weights["linear.weight"].T + weights["linear.bias"]
    penalty = 0.5 * WEIGHT_DECAY * sum((w ** 2).sum() for w in weights.values())
    return F.cross_entropy(logits, batch["labels"], reduction="none") + penalty


def test_learning_rates_are_log_spaced_over_the_range():
    lrs = sim.learning_rates(1e-5, 10 ** -2.5, 50)
    assert len(lrs) == 50
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(10 ** -2.5)
    assert np.allclose(np.diff(np.log10(lrs)), 2.5 / 49)


def test_one_step_losses_match_a_manual_step_and_restore_the_weights():
    model, train = toy_problem()
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = train.batch([0, 3, 7, 11])
    probe = train.batch([20, 21])
    lrs = [1e-3, 0.1, 1.0]
    before, after = sim.one_step_losses(model, logistic_loss, step, probe, lrs, ["linear.weight", "linear.bias"])

    assert before.shape == (2,) and after.shape == (3, 2)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before_weights[name]), f"{name} changed"
    grads = torch.autograd.grad(logistic_loss(model, step).mean(), list(model.parameters()))
    for lr, row in zip(lrs, after):
        stepped = {n: w - lr * g for (n, w), g in zip(before_weights.items(), grads)}
        assert np.allclose(row, _loss_with(model, stepped, probe).detach().numpy(), rtol=1e-12, atol=1e-12)
    assert np.allclose(before, logistic_loss(model, probe).detach().numpy())
    assert not np.allclose(after[-1], before)  # the step did change the probe loss


def test_one_step_losses_updates_only_the_named_parameters():
    model, train = toy_problem()
    step, probe = train.batch([0, 1, 2]), train.batch([5])
    _, bias_only = sim.one_step_losses(model, logistic_loss, step, probe, [0.5], ["linear.bias"])
    _, both = sim.one_step_losses(model, logistic_loss, step, probe, [0.5], ["linear.weight", "linear.bias"])
    grads = torch.autograd.grad(logistic_loss(model, step).mean(), [model.linear.bias])
    weights = {"linear.weight": model.linear.weight.detach(), "linear.bias": model.linear.bias.detach() - 0.5 * grads[0]}
    assert bias_only[0, 0] == pytest.approx(float(_loss_with(model, weights, probe)[0]), rel=1e-12)
    assert bias_only[0, 0] != pytest.approx(both[0, 0], rel=1e-6)
    with pytest.raises(ValueError, match="params"):
        sim.one_step_losses(model, logistic_loss, step, probe, [0.5], ["nope"])


def test_helpful_points_move_the_simulator_most_on_a_logistic_regression():
    model, train = toy_problem()
    test_rows = Rows(torch.tensor([[1.0, 0.5, -0.3], [-0.4, 1.2, 0.8], [0.2, -0.9, 1.5]], dtype=torch.float64),
                     torch.tensor([1, 0, 1]))
    logits = model.linear(test_rows.x).detach()
    points, influence_rows = [], []
    for row in range(len(test_rows)):
        pred = int(logits[row].argmax())
        test_id = f"t{row}"
        scores = exact_influence(model, train, {"x": test_rows.x[[row]], "labels": torch.tensor([pred])})
        order = np.argsort(scores)
        for rank, j in enumerate(order[:5], start=1):
            influence_rows.append({"test_id": test_id, "train_index": int(j), "rank": rank, "direction": "helpful"})
        for rank, j in enumerate(order[::-1][:5], start=1):
            influence_rows.append({"test_id": test_id, "train_index": int(j), "rank": rank, "direction": "harmful"})
        points.append(sim.SimulationPoint(test_id=test_id, row=row, target=pred, correct=True))
    sets = sim.candidate_sets(pd.DataFrame(influence_rows), [p.test_id for p in points], len(train), m=5, seed=0)
    for point in points:
        point.sets = sets[point.test_id]
        assert len(point.sets["helpful"]) == len(point.sets["harmful"]) == len(point.sets["random"]) == 5

    lrs = sim.learning_rates(1e-3, 1e-1, 5)
    frame = sim.simulate(model, logistic_loss, train, test_rows, points, lrs, ["linear.weight", "linear.bias"], "cpu")
    assert list(frame.columns) == sim.SIMULATE_COLUMNS
    assert len(frame) == 3 * 3 * 5
    per_test = frame.groupby(["test_id", "arm"])["delta"].mean().unstack()
    assert (per_test["helpful"] < 0).all()  # helpful points lower the loss of the prediction
    assert (per_test["harmful"] > 0).all()
    assert (per_test["helpful"] < per_test["random"]).all()
    assert (per_test["random"] < per_test["harmful"]).all()
    summary = sim.summarize(frame)
    assert summary["correct"]["n_tests"] == 3 and summary["incorrect"]["n_tests"] == 0
    assert summary["correct"]["helpful_beats_random"] == 1.0
    assert summary["correct"]["arms"]["helpful"]["mean_delta"] == pytest.approx(frame[frame.arm == "helpful"].delta.mean())


def test_candidate_sets_take_ranks_in_order_and_seeded_random_points():
    influence = pd.DataFrame({
        "test_id": ["a"] * 4 + ["b"],
        "train_index": [7, 3, 9, 4, 5],
        "rank": [2, 1, 1, 3, 1],
        "direction": ["helpful", "helpful", "harmful", "helpful", "harmful"],
    })
    sets = sim.candidate_sets(influence, ["a", "b", "c"], n_train=50, m=2, seed=3)
    assert sets["a"]["helpful"] == [3, 7] and sets["a"]["harmful"] == [9]
    assert "helpful" not in sets["b"] and sets["b"]["harmful"] == [5]
    assert set(sets["c"]) == {"random"}
    assert all(len(s["random"]) == 2 and len(set(s["random"])) == 2 for s in sets.values())
    again = sim.candidate_sets(influence, ["a", "b", "c"], n_train=50, m=2, seed=3)
    assert [again[k]["random"] for k in "abc"] == [sets[k]["random"] for k in "abc"]


def test_points_from_tests_use_the_current_prediction_and_count_disagreements():
    frame = pd.DataFrame({"id": ["x0", "x1", "x2"], "label": [0, 1, 1]})
    tests = pd.DataFrame({"test_id": ["x1", "x2", "group:g"], "n_examples": [1, 1, 5], "test_pred": [1, 1, -1],
                          "test_group": ["g", "h", "g"]})
    points, disagreements = sim.points_from_tests(tests, frame, np.array([0, 1, 0]))
    assert [(p.test_id, p.row, p.target, p.correct) for p in points] == [("x1", 1, 1, True), ("x2", 2, 0, False)]
    assert disagreements == 1
    from fastif.errors import InputError

    with pytest.raises(InputError, match="not in the test split"):
        sim.points_from_tests(tests.assign(test_id=["zz", "x2", "g"]), frame, np.array([0, 1, 0]))


def test_relabelled_keeps_inputs_and_replaces_labels():
    from fastif.data.encoding import EncodedDataset

    ones = torch.ones(3, 4, dtype=torch.long)
    data = EncodedDataset({"input_ids": ones, "attention_mask": ones, "token_type_ids": ones * 0, "labels": torch.tensor([0, 0, 1])},
                          ["a", "b", "c"])
    copy = sim.relabelled(data, np.array([1, 1, 0]))
    assert copy.tensors["labels"].tolist() == [1, 1, 0] and data.tensors["labels"].tolist() == [0, 0, 1]
    assert copy.ids == data.ids and torch.equal(copy.tensors["input_ids"], ones)


@pytest.mark.slow
def test_fastif_simulate_on_the_demo(trained_demo, tmp_path):
    outputs = tmp_path / "outputs"
    shutil.copytree(trained_demo, outputs, symlinks=True)
    result = subprocess.run([*fastif_executable(), "simulate", "source.n=16", "step.lr_count=6"], cwd=tmp_path,
                            env=cli_env(outputs), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = outputs / "simulate" / "demo" / "latest"
    frame = pd.read_parquet(run / "simulate.parquet")
    assert list(frame.columns) == sim.SIMULATE_COLUMNS
    assert frame["lr"].nunique() == 6
    assert set(frame["arm"]) == {"helpful", "random", "harmful"}
    assert frame["correct"].any() and (~frame["correct"]).any()
    assert np.allclose(frame["delta"], frame["loss_after"] - frame["loss_before"])
    assert (run / "simulate.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    correct = summary["correct"]["arms"]
    # The paper's finding on correctly predicted points: helpful steps imitate the task model best.
    assert correct["helpful"]["mean_delta"] < correct["random"]["mean_delta"] < correct["harmful"]["mean_delta"]
    assert correct["helpful"]["mean_delta"] < 0
    assert summary["correct"]["helpful_beats_harmful"] == 1.0
    # The influence run it computed on the fly is a run of its own, over random test points.
    assert (outputs / "influence" / "demo" / "latest" / "influence.parquet").is_file()
    assert "mean loss change" in result.stderr
