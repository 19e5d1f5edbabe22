"""Local training and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_agent.training import TrainingDivergedError, evaluate, train_local
from federation.tasks import SmallCNN, get_task


def test_training_reduces_loss_on_california_shard() -> None:
    task = get_task("california")
    data = task.load(0, 2, seed=0, limit=1000)
    torch.manual_seed(0)
    model = task.build_model()
    before = evaluate(model, data.train_x, data.train_y, "regression")["mse"]
    hp = task.hyperparameters
    result = train_local(model, data, epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr,
                         batch_size=hp.batch_size, seed=1)
    after = evaluate(model, data.train_x, data.train_y, "regression")["mse"]
    assert result.num_samples == 1000 and result.seconds > 0
    assert after < 0.6 * before
    assert result.train_loss < before
    assert evaluate(model, data.test_x, data.test_y, "regression")["mse"] < 0.6


def test_training_is_reproducible_and_accepts_x_y() -> None:
    task = get_task("california")
    data = task.load(1, 2, seed=0, limit=300)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = task.build_model()
        train_local(model, data.train_x, data.train_y, kind="regression", epochs=2, optimizer="sgd", lr=0.01,
                    batch_size=32, seed=7)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key])


def test_nan_loss_raises() -> None:
    x = torch.randn(64, 8)
    y = torch.full((64,), float("nan"))
    with pytest.raises(TrainingDivergedError, match="nan"):
        train_local(nn.Linear(8, 1), x, y, kind="regression", epochs=1, optimizer="adam", lr=1e-3,
                    batch_size=16, seed=0)


def test_bad_arguments() -> None:
    x, y = torch.randn(4, 2), torch.randn(4)
    with pytest.raises(ValueError, match="optimizer"):
        train_local(nn.Linear(2, 1), x, y, kind="regression", epochs=1, optimizer="rmsprop", lr=0.1,
                    batch_size=2, seed=0)
    with pytest.raises(ValueError, match="kind"):
        evaluate(nn.Linear(2, 1), x, y, "ranking")


class Fixed(nn.Module):
    """Returns the given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def test_evaluate_accuracy_hand_built() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    x = torch.arange(4, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor([0, 1, 1, 2])  # predictions 0, 1, 2, 0 -> 2 of 4 right
    metrics = evaluate(Fixed(logits), x, y, "classification", batch_size=3)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_evaluate_mse_hand_built() -> None:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(0.0)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([2.0, 4.0, 9.0])  # errors 0, 0, 3
    assert evaluate(model, x, y, "regression", batch_size=2)["mse"] == pytest.approx(3.0)


def test_small_cnn_size() -> None:
    assert sum(p.numel() for p in SmallCNN().parameters()) == 105866
    assert SmallCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
