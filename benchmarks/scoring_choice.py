"""Does a per-category choice of map and score, made on leak-free validation images, carry
over to the test split?

For the final checkpoint of every category of every run under `--runs` (for example the runs
`benchmarks/seeds.py --storage` kept), the anomaly maps are computed once for the test split
and for a validation set that costs no training image: the normal training images the run
held out for its decision threshold (never trained on), as they are and each with one
synthetic defect (data/validation.py). Four scorings are then applied to the same maps:
normal map subtracted or not, image score the map's maximum or the mean of its 100 largest
values. The validation choice is the scoring with the best validation image AUROC; a tie
keeps the run's own scoring. Printed per category, mean ± sd over the runs (seeds) of test
image AUROC and AU-PRO: the run's own scoring, the validation choice, and the best scoring on
the test split itself (an oracle no user has), with the tie rule of seeds.py.

    python benchmarks/scoring_choice.py --runs /tmp/seeds/runs [/tmp/more/runs ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from seeds import compare, spread
from sklearn.metrics import roc_auc_score

from memkd_ray.checkpoint import load_model
from memkd_ray.config import get_dotted
from memkd_ray.data import read_configured_category
from memkd_ray.data.datasets import ArrayImages
from memkd_ray.data.validation import with_synthetic_defects
from memkd_ray.engine.driver import decision_holdout
from memkd_ray.engine.evaluation import evaluate_dataset, labelled_test_images
from memkd_ray.metrics import metrics_and_curves
from memkd_ray.model import image_scores

SCORINGS = [(normal_map, top_k) for normal_map in ("none", "mean") for top_k in (1, 100)]


def final_checkpoints(runs: list[Path]) -> list[Path]:
    """The last checkpoint of every category of every run."""
    found = []
    for run in sorted(p for root in runs for p in root.iterdir() if p.is_dir()):
        for category in sorted(run.glob("*/*")):
            checkpoints = sorted(category.glob("checkpoint_epoch_*"))
            if checkpoints:
                found.append(checkpoints[-1])
    return found


def raw_maps(model, cfg, images, labels) -> tuple[np.ndarray, np.ndarray]:
    """(maps before the normal map is subtracted, masks)."""
    normal = model.normal_map_mean.clone()
    model.normal_map_mean.zero_()
    try:
        evaluation = evaluate_dataset(model, images, labels, cfg, torch.device("cpu"))
    finally:
        model.normal_map_mean.copy_(normal)
    return evaluation.maps, evaluation.masks


def scored(maps: np.ndarray, normal: np.ndarray, scoring: tuple[str, int]) -> tuple:
    normal_map, top_k = scoring
    maps = maps - normal if normal_map == "mean" else maps
    return maps, image_scores(torch.from_numpy(maps), top_k).numpy()


def study(checkpoint: Path, only: list[str]) -> dict | None:
    """The four scorings of one checkpoint; None when its config fails an `only` filter."""
    model, saved = load_model(checkpoint)
    cfg = saved.config
    raw = cfg.to_dict()
    if not all(str(get_dotted(raw, k)).lower() == v.lower()
               for k, v in (item.split("=", 1) for item in only)):
        return None
    category = checkpoint.parent.name
    data = read_configured_category(cfg.data, category)
    train, held_out = decision_holdout(cfg, data.train, category)
    size = cfg.data.image_size
    normals = [s.load_image(size) for s in held_out]
    defective, masks = with_synthetic_defects(
        normals, train, np.random.default_rng([cfg.train.seed, 20261208]))
    validation = ArrayImages(np.stack(normals + defective),
                             np.stack([np.zeros((size, size), np.uint8)] * len(normals) + masks))
    val_labels = np.array([0] * len(normals) + [1] * len(defective))
    test_images, test_labels = labelled_test_images(data.test, size)
    normal = model.normal_map_mean.clone().numpy()
    val_maps, _ = raw_maps(model, cfg, validation, val_labels)
    test_maps, test_masks = raw_maps(model, cfg, test_images, test_labels)
    own = (cfg.eval.normal_map, cfg.eval.score_top_k)
    rows = {}
    for scoring in SCORINGS:
        _, val_scores = scored(val_maps, normal, scoring)
        maps, scores = scored(test_maps, normal, scoring)
        metrics, _ = metrics_and_curves(maps, test_masks, test_labels, scores)
        rows[scoring] = {"val": roc_auc_score(val_labels, val_scores),
                         "image_auroc": metrics["image_auroc"],
                         "pixel_aupro": metrics["pixel_aupro"]}
    best_val = max(row["val"] for row in rows.values())
    chosen = own if rows[own]["val"] == best_val else max(rows, key=lambda s: rows[s]["val"])
    oracle = max(rows, key=lambda s: rows[s]["image_auroc"])
    print(f"{checkpoint.parents[2].name} {category} seed {cfg.train.seed}: val I-AUROC "
          + ", ".join(f"{n}/top{k} {rows[(n, k)]['val']:.3f}" for n, k in SCORINGS)
          + f"; chosen {chosen}, oracle {oracle}", flush=True)
    return {"category": category, "seed": cfg.train.seed, "own": rows[own],
            "chosen": rows[chosen], "oracle": rows[oracle], "changed": chosen != own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=[],
                        help="key=value of the run config to keep, e.g. memory.enabled=true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [r for c in final_checkpoints(args.runs) if (r := study(c, args.only))]
    categories = sorted({r["category"] for r in results})
    for metric, label in (("image_auroc", "I-AUROC"), ("pixel_aupro", "AU-PRO")):
        print(f"\n| {label} (mean ± sd over seeds) | run's own scoring | validation choice "
              "| choice vs own | oracle on test |\n|---|---|---|---|---|")
        for category in [*categories, None]:
            picked = [r for r in results if category in (None, r["category"])]
            cells = []
            for which in ("own", "chosen", "oracle"):
                values = _per_seed(picked, which, metric, category is None)
                cells.append("{:.2f} ± {:.2f}".format(*spread(values)))
            verdict = compare(_per_seed(picked, "own", metric, category is None),
                              _per_seed(picked, "chosen", metric, category is None))
            print(f"| {category or 'all (mean)'} | {cells[0]} | {cells[1]} | {verdict} | "
                  f"{cells[2]} |")
    changed = sum(r["changed"] for r in results)
    print(f"\nthe validation choice changed the scoring of {changed} of {len(results)} models")


def _per_seed(rows: list[dict], which: str, metric: str, averaged: bool) -> list[float]:
    """One value per seed: the category's, or over all categories the mean of that seed's."""
    by_seed: dict[int, list[float]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], []).append(100 * row[which][metric])
    return [statistics.fmean(v) for v in by_seed.values()] if averaged else \
        [100 * row[which][metric] for row in rows]


if __name__ == "__main__":
    main()
