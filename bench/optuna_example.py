"""What a user would write instead of cso: optuna-examples' ``pytorch/pytorch_simple.py``.

The canonical Optuna PyTorch example, adapted only where the task forces it: a regression of
the 39 features onto the calling score (MSE and a sigmoid output instead of cross-entropy and
log-softmax), validation MSE instead of accuracy, and the app's train / validation / test split.
Everything else is the example's: its search space (1-3 layers of 4-128 units, dropout
0.2-0.5 per layer, Adam / RMSprop / SGD, learning rate 1e-5 - 1e-1 log), a DataLoader over
shuffled mini-batches of 128, a fixed number of epochs, ``trial.report`` and ``should_prune``
every epoch, TPE with the median pruner, and the last epoch's validation loss as the value.

Used by ``bench_search.py``; run alone: ``python bench/optuna_example.py DATA.json``.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from calling_score_opt.data import Split, load_dataset, split_dataset  # noqa: E402

BATCHSIZE = 128
EPOCHS = 30  # the example: 10 epochs of a 3,840-image subset; here each epoch is all 7,000 rows


def define_model(trial: optuna.Trial, n_features: int) -> nn.Sequential:
    n_layers = trial.suggest_int("n_layers", 1, 3)
    layers: list[nn.Module] = []
    in_features = n_features
    for i in range(n_layers):
        out_features = trial.suggest_int(f"n_units_l{i}", 4, 128)
        layers.append(nn.Linear(in_features, out_features))
        layers.append(nn.ReLU())
        p = trial.suggest_float(f"dropout_l{i}", 0.2, 0.5)
        layers.append(nn.Dropout(p))
        in_features = out_features
    layers.append(nn.Linear(in_features, 1))
    layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _loader(x: Any, y: Any, shuffle: bool) -> DataLoader[tuple[torch.Tensor, ...]]:
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=BATCHSIZE, shuffle=shuffle)


def objective(trial: optuna.Trial, split: Split, models: dict[int, nn.Module]) -> float:
    torch.manual_seed(trial.number)
    model = define_model(trial, split.x_train.shape[1])
    optimizer_name = trial.suggest_categorical("optimizer", ["Adam", "RMSprop", "SGD"])
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), lr=lr)
    train_loader = _loader(split.x_train, split.y_train, shuffle=True)
    valid_loader = _loader(split.x_val, split.y_val, shuffle=False)
    loss_fn = nn.MSELoss()
    val_loss = float("inf")
    for epoch in range(EPOCHS):
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(data).squeeze(-1), target)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for data, target in valid_loader:
                total += float(((model(data).squeeze(-1) - target) ** 2).sum())
        val_loss = total / len(split.y_val)
        trial.report(val_loss, epoch)
        if trial.should_prune():
            raise optuna.exceptions.TrialPruned()
    models[trial.number] = model
    return val_loss


def run(data: Path, n_trials: int, seed: int = 0) -> dict[str, Any]:
    """The example's study on ``data``; the best trial's test MSE, as cso would report it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    split = split_dataset(load_dataset(data), seed=0)  # cso's split, so the test set is shared
    models: dict[int, nn.Module] = {}
    started = time.perf_counter()
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(),
    )
    study.optimize(lambda t: objective(t, split, models), n_trials=n_trials)
    wall = time.perf_counter() - started
    best = models[study.best_trial.number].eval()
    with torch.no_grad():
        scores = best(torch.from_numpy(split.x_test)).squeeze(-1).numpy().astype(np.float64)
    states = [t.state.name for t in study.trials]
    rows = 6 * len(split.y_train) + 2 * len(split.y_val)  # FLOP per parameter per epoch
    flop = 0.0
    for trial in study.trials:
        widths = [split.x_train.shape[1]]
        widths += [trial.params[f"n_units_l{i}"] for i in range(trial.params["n_layers"])]
        widths.append(1)
        parameters = sum(a * b + b for a, b in itertools.pairwise(widths))
        flop += len(trial.intermediate_values) * rows * parameters
    return {
        "training_gflop": flop / 1e9,
        "wall_s": wall,
        "best_trial": study.best_trial.number,
        "val_loss": study.best_value,
        "test_loss": float(np.mean((scores - split.y_test) ** 2)),
        "test_predictions": scores,
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
    }


if __name__ == "__main__":
    result = run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    print({k: v for k, v in result.items() if k != "test_predictions"})
