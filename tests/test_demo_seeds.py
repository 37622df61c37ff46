"""The demo recipe is robust: on the CPU it learns the planted sex effect in each of 5 seeds (split and init)."""

from __future__ import annotations

import json


def test_demo_recipe_learns_sex_in_five_of_five_seeds(tmp_path):
    from brainmt.bench.learning import main

    work = tmp_path / "bench"
    code = main(["--subjects", "300", "--frames", "40", "--effects", "mixed", "--seeds", "5", "--tasks", "sex",
                 "--no-baselines", "--shuffled", "--parallel", "2", "--n-boot", "50", "--work-dir", str(work),
                 "train.epochs=10", "train.early_stopping_patience=5"])     # the demo's own epochs and patience
    rows = json.loads((work / "learning.json").read_text())["rows"]
    aurocs = sorted((r["seed"], round(r["test"]["auroc"]["value"], 3)) for r in rows)
    assert code == 0 and len(aurocs) == 5, aurocs
    assert all(a >= 0.8 for _, a in aurocs), aurocs
