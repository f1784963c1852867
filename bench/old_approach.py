"""A faithful re-implementation of the old optimisation script's per-variant work, for timing.

The old script started one fresh Python process per variant; each re-read the JSON file, built
a per-sample ``Dataset`` fed through ``DataLoader(shuffle=True)``, called ``loss.item()`` every
batch, validated through a DataLoader every epoch, stopped early (patience 10) and exported ONNX
with torch's default exporter. Unlike the old script it applies every variant's architecture and
dropout (the old one silently trained the baseline network for those), so both sides of the
benchmark do the same training work. Not part of cso: used only by ``bench/bench_grid.py``.

    python bench/old_approach.py --data-path FILE --output-dir DIR --variant v1_0_baseline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

GROUPS = {
    "user_vibe_dimensions": 12,
    "spot_vibe_dimensions": 12,
    "context_features": 10,
    "timing_features": 5,
}
VARIANTS = {
    "v1_0_baseline": (0.001, 32, [128, 64], 0.2),
    "v1_1_lr_0.0001": (0.0001, 32, [128, 64], 0.2),
    "v1_1_lr_0.0005": (0.0005, 32, [128, 64], 0.2),
    "v1_1_lr_0.002": (0.002, 32, [128, 64], 0.2),
    "v1_1_lr_0.005": (0.005, 32, [128, 64], 0.2),
    "v1_1_batch_16": (0.001, 16, [128, 64], 0.2),
    "v1_1_batch_64": (0.001, 64, [128, 64], 0.2),
    "v1_1_batch_128": (0.001, 128, [128, 64], 0.2),
    "v1_1_arch_wider": (0.001, 32, [256, 128], 0.2),
    "v1_1_arch_deeper": (0.001, 32, [128, 64, 32], 0.2),
    "v1_1_arch_smaller": (0.001, 32, [96, 48], 0.2),
    "v1_1_arch_wide_deep": (0.001, 32, [256, 128, 64], 0.2),
    "v1_1_dropout_0.1": (0.001, 32, [128, 64], 0.1),
    "v1_1_dropout_0.3": (0.001, 32, [128, 64], 0.3),
    "v1_1_dropout_0.4": (0.001, 32, [128, 64], 0.4),
}


class CallingScoreDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.FloatTensor(self.features[i]), torch.FloatTensor([self.labels[i]])


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path) as f:
        data = json.load(f)
    records = data["training_data"] if isinstance(data, dict) else data
    features, labels = [], []
    for r in records:
        row = []
        for group in GROUPS:
            row.extend(r.get(group, {}).values())
        features.append(row[:39])
        labels.append(r.get("outcome_score", r.get("formula_calling_score", 0.5)))
    x = np.array(features, dtype=np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)  # fitted on all rows, as the old script did
    return x, np.array(labels, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-path", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    lr, batch_size, hidden, dropout = VARIANTS[args.variant]

    x, y = load(args.data_path)
    n = len(y)
    order = np.random.default_rng(42).permutation(n)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    tr, va, te = np.split(order, [n_train, n_train + n_val])
    train_loader = DataLoader(
        CallingScoreDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True
    )
    val_loader = DataLoader(CallingScoreDataset(x[va], y[va]), batch_size=batch_size)
    test_loader = DataLoader(CallingScoreDataset(x[te], y[te]), batch_size=batch_size)

    layers: list[nn.Module] = []
    width = 39
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    model = nn.Sequential(*layers, nn.Linear(width, 1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.MSELoss()

    start = time.time()
    best_val, best_state, patience = float("inf"), None, 0
    for epoch in range(args.epochs):
        model.train()
        train_loss = 0.0
        for xb, yb in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
        model.eval()
        val_loss = 0.0
        with torch.no_grad():
            for xb, yb in val_loader:
                val_loss += criterion(model(xb), yb).item()
        val_loss /= len(val_loader)
        print(f"Epoch {epoch + 1}: train {train_loss / len(train_loader):.4f} val {val_loss:.4f}")
        if val_loss < best_val:
            best_val, patience = val_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            patience += 1
            if patience >= 10:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    test_loss = 0.0
    with torch.no_grad():
        for xb, yb in test_loader:
            test_loss += criterion(model(xb), yb).item()
    test_loss /= len(test_loader)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.randn(1, 39),),
        str(args.output_dir / f"calling_score_model_{args.variant}.onnx"),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}},
    )
    print(f"Test Loss: {test_loss:.4f}")
    print(f"Val Loss: {best_val:.4f}")
    print(f"Training Time: {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
