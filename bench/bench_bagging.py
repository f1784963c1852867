"""Benchmark: would bagging the ensemble's members help? (Why ``--bag`` is not offered.)

AutoGluon retrains each chosen configuration on N folds of train + validation and averages the
fold models. This measures that idea on ``cso data synth --kind gated`` data, in one run:

    python bench/bench_bagging.py --seeds 0 1

For each data seed: a 20-trial ``cso search`` (library call, TPE, median pruning), its
ensemble exactly as ``cso export --ensemble`` selects it, then the same members with the same
weights, each member replaced by the mean of 5 models trained on 5 folds of train + validation
(fold seeds 100-104). Reported: the share of the explainable variance each captures on the test
split, which neither saw. Results go to bench/results/bagging.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from calling_score_opt.data import Split, load_dataset, split_dataset  # noqa: E402
from calling_score_opt.ensemble import greedy_selection  # noqa: E402
from calling_score_opt.search import SearchSettings, run_search  # noqa: E402
from calling_score_opt.stacked import train_one  # noqa: E402
from calling_score_opt.study import artifact_store  # noqa: E402
from calling_score_opt.synth import write_synthetic  # noqa: E402
from calling_score_opt.trials import load_study, predict, trial_model  # noqa: E402

FOLDS = 5


def one_seed(seed: int, trials: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cso-bench-bagging-") as tmp:
        data = Path(tmp) / "gated.json"
        write_synthetic(data, 10_000, seed, "gated")
        dataset = load_dataset(data)
        split = split_dataset(dataset, 0)
        settings = SearchSettings(
            data_path=data, trials=trials, study_name="s", storage_url=f"sqlite:///{tmp}/s.db"
        )
        run_search(settings)
        study = load_study(settings.storage, "s")
        store = artifact_store(settings.artifacts)
        complete = sorted(
            (t for t in study.get_trials() if t.state.name == "COMPLETE"),
            key=lambda t: (t.values[0], t.number),
        )
        models = [trial_model(store, study, t) for t in complete]
        val = np.stack([predict(m, split.x_val) for m, _ in models])
        test = np.stack([predict(m, split.x_test) for m, _ in models])
        selection = greedy_selection(val, split.y_val.astype(np.float64))
        weights = selection.weights(len(complete))
        members = np.flatnonzero(weights)

        y = split.y_test.astype(np.float64)
        var_y, floor = float(np.var(y)), float(dataset.irreducible_mse or 0.0)

        def share(scores: np.ndarray) -> float:
            return float((var_y - np.mean((scores - y) ** 2)) / (var_y - floor))

        x_all = np.concatenate([split.x_train, split.x_val])
        y_all = np.concatenate([split.y_train, split.y_val])
        fold = np.random.default_rng(seed).permutation(len(y_all)) % FOLDS
        started = time.perf_counter()
        bagged = np.zeros_like(y)
        for i in members:
            config = models[i][1]
            fold_scores = []
            for k in range(FOLDS):
                fit, held = fold != k, fold == k
                part = Split(
                    x_all[fit], y_all[fit], x_all[held], y_all[held], split.x_test, split.y_test, 0
                )
                result = train_one(part, dataclasses.replace(config, seed=100 + k), "cpu", None)
                fold_scores.append(predict(result.model, split.x_test))
            bagged += weights[i] * np.mean(fold_scores, axis=0)
        return {
            "seed": seed,
            "members": len(members),
            "best_single": share(test[0]),
            "ensemble": share(weights @ test),
            "ensemble_bagged": share(bagged),
            "bagging_s": round(time.perf_counter() - started, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bagging.json")
    args = parser.parse_args()
    rows = [one_seed(s, args.trials) for s in args.seeds]
    print("explainable variance captured on the test split:")
    for row in rows:
        print(
            f"  data seed {row['seed']}: best single {row['best_single']:.1%}, ensemble "
            f"{row['ensemble']:.1%}, ensemble bagged {row['ensemble_bagged']:.1%} "
            f"({row['members']} members x {FOLDS} folds retrained in {row['bagging_s']} s)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"trials": args.trials, "folds": FOLDS, "rows": rows}, indent=2) + "\n"
    )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
