"""Where the memory values sit among the normal features they should remember (paper Fig. 7).

For each checkpoint given, and each memory: the teacher features of the category's training
images at the stage that memory rebuilds (Eq. 10), a random sample of their positions, and the
memory's value items, projected on the two principal axes of the features. Values that learned
normal features lie among them; values that did not sit apart (unit-normal start, norm
sqrt(C)) or collapse onto the mean. One row of panels per checkpoint, one PNG.

    python benchmarks/memory_values.py --data-root DATA --out values.png \\
        paper=RUN/photos/coins/checkpoint_epoch_0080 features=OTHER/photos/coins/...
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from matplotlib.figure import Figure

from memkd_ray.checkpoint import load_model
from memkd_ray.data import read_configured_category
from memkd_ray.data.datasets import load_training_images
from memkd_ray.engine import TrainingFeatures
from memkd_ray.model import NEL_TEACHER_STAGE

POSITIONS = 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", metavar="LABEL=CHECKPOINT_DIR")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [item.rsplit("=", 1) for item in args.checkpoints]  # a label may hold "="
    figure = Figure(figsize=(12, 3.9 * len(rows)), dpi=100, layout="constrained")
    grid = figure.subplots(len(rows), 3, squeeze=False)
    generator = torch.Generator().manual_seed(0)
    for axes_row, (label, directory) in zip(grid, rows, strict=True):
        model, checkpoint = load_model(directory)
        cfg = checkpoint.config
        data = read_configured_category(replace(cfg.data, root=args.data_root),
                                        checkpoint.meta["category"], with_test=False)
        images = load_training_images(data.train, cfg.data.image_size)
        stages = TrainingFeatures(model.teacher, images, torch.device("cpu"), True).cached
        for axes, (site, memory) in zip(axes_row, model.memories.items(), strict=False):
            features = stages[NEL_TEACHER_STAGE[site]].float()
            vectors = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
            sample = vectors[torch.randperm(len(vectors), generator=generator)[:POSITIONS]]
            values = memory.values.detach().float()
            mean = sample.mean(dim=0)
            _, _, axes_pc = torch.linalg.svd(sample - mean, full_matrices=False)
            plane = axes_pc[:2].T
            shown = ((sample - mean) @ plane).numpy()
            held = ((values - mean) @ plane).numpy()
            axes.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.25, color="tab:grey",
                         label="teacher features (training positions)")
            axes.scatter(held[:, 0], held[:, 1], s=28, marker="x", color="tab:red",
                         label=f"{len(values)} value items")
            norm = float(np.median(values.norm(dim=1).numpy()))
            axes.set_title(f"{label}\n{site}: median norm of values {norm:.0f}, of "
                           f"features {float(sample.norm(dim=1).median()):.0f}", fontsize=9)
            axes.legend(loc="best", fontsize=7)
    figure.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
