"""`memkd-ray` command line (DESIGN.md 7): parsing and calling, nothing else.

Exit codes: 0 ok, 2 bad usage or bad input (one-line reason), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from memkd_ray.errors import UserInputError

log = logging.getLogger("memkd_ray")
TABLE_METRICS = (
    ("I-AUROC", "image_auroc"),
    ("I-AP", "image_ap"),
    ("P-AUROC", "pixel_auroc"),
    ("P-AP", "pixel_ap"),
    ("AU-PRO", "pixel_aupro"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memkd-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="benchmark data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic MVTec-layout benchmark")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--categories", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")

    train = commands.add_parser("train", help="train and evaluate categories of a benchmark")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--data-root", help="benchmark directory (overrides data.root)")
    train.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    train.add_argument("--storage", default="./memkd-store", help="directory or file:// URI")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a category's test set")
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--data-root", required=True)
    evaluate.add_argument("--category", required=True)
    evaluate.add_argument("--save-maps", type=Path, metavar="DIR",
                          help="also write per-image maps and masks (.npz) and index.csv")

    predict = commands.add_parser("predict", help="anomaly maps and scores for images")
    predict.add_argument("--checkpoint", required=True, type=Path)
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--out", required=True, type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    handlers = {"data": _data, "train": _train, "eval": _eval, "predict": _predict}
    try:
        handlers[args.command](args)
    except UserInputError as exc:
        print(f"memkd-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memkd-ray: interrupted", file=sys.stderr)
        return 1
    except Exception:
        log.exception("memkd-ray: failed")
        return 1
    return 0


def _data(args: argparse.Namespace) -> None:
    from memkd_ray.data.synthetic import generate_benchmark

    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"--out {args.out}: directory exists and is not empty")
    names = generate_benchmark(args.out, args.categories, args.seed, args.size,
                               progress=None if args.quiet else log.info)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")


def _train(args: argparse.Namespace) -> None:
    from memkd_ray.config import load_config
    from memkd_ray.runner import train_benchmark
    from memkd_ray.storage.layout import local_root

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = load_config(args.config, overrides)
    summary = train_benchmark(cfg, args.category, str(local_root(args.storage)),
                              progress=not args.quiet)
    print(format_results_table(summary.rows))
    print(f"run {summary.run_id}: results in {summary.results_path}")


def _eval(args: argparse.Namespace) -> None:
    from memkd_ray.checkpoint import load_model
    from memkd_ray.data import read_category
    from memkd_ray.engine import evaluate, resolve_device
    from memkd_ray.inference import save_maps

    device = resolve_device("auto")
    model, checkpoint = load_model(args.checkpoint, device)
    cfg = checkpoint.config
    data = read_category(cfg.data.benchmark, args.data_root, args.category)
    evaluation = evaluate(model, data.test, cfg, device)
    if args.save_maps:
        save_maps(evaluation, data.test, args.save_maps)
    print(json.dumps(evaluation.metrics, indent=2))


def _predict(args: argparse.Namespace) -> None:
    from memkd_ray.checkpoint import load_model
    from memkd_ray.engine import resolve_device
    from memkd_ray.inference import predict_images

    device = resolve_device("auto")
    model, checkpoint = load_model(args.checkpoint, device)
    cfg = checkpoint.config
    scores = predict_images(model, args.images, cfg.data.image_size, cfg.eval.gaussian_sigma,
                            args.out, device, cfg.eval.batch_size)
    print(json.dumps(scores, indent=2))


def format_results_table(rows: list[dict]) -> str:
    """Per-category metrics in percent with one decimal (the paper's units), plus the mean."""
    header = ["category", *(name for name, _ in TABLE_METRICS)]
    lines = [[row["category"], *(_percent(row[key]) for _, key in TABLE_METRICS)] for row in rows]
    if len(rows) > 1:
        means = [_percent(_mean([row[key] for row in rows])) for _, key in TABLE_METRICS]
        lines.append(["mean", *means])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    render = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
              for cells in [header, *lines]]
    return "\n".join(render)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
