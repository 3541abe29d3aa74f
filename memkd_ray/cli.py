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
from dataclasses import replace
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
    check = data_commands.add_parser("check", help="count and check a benchmark tree")
    check.add_argument("--config", required=True, type=Path)
    check.add_argument("--data-root", required=True)

    train = commands.add_parser("train", help="train and evaluate categories of a benchmark")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--data-root", help="benchmark directory (overrides data.root)")
    train.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    train.add_argument("--storage", default="./memkd-store",
                       help="directory, file:// or s3://bucket/prefix (AWS_* variables)")
    train.add_argument("--workers-per-category", type=int, metavar="K",
                       help="data-parallel workers per category (distributed.workers_per_category)")
    train.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001, host:port); "
                       "default: start a local Ray")
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
    _configure_logging(args.quiet)
    handlers = {"data": _data, "train": _train, "eval": _eval, "predict": _predict}
    try:
        return handlers[args.command](args) or 0
    except UserInputError as exc:
        print(f"memkd-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memkd-ray: interrupted", file=sys.stderr)
        return 1
    except Exception:
        log.exception("memkd-ray: failed")
        return 1


def _configure_logging(quiet: bool) -> None:
    """Our progress lines on stderr, one message per line; other libraries' logs untouched."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _data(args: argparse.Namespace) -> None:
    if args.data_command == "check":
        _data_check(args)
    else:
        _data_synth(args)


def _data_check(args: argparse.Namespace) -> None:
    from memkd_ray.config import load_config
    from memkd_ray.data import check_benchmark, reader_options

    cfg = load_config(args.config, [f"data.root={args.data_root}"])
    print(check_benchmark(cfg.data.benchmark, args.data_root, cfg.data.categories or None,
                          **reader_options(cfg.data)))


def _data_synth(args: argparse.Namespace) -> None:
    from memkd_ray.data.synthetic import generate_benchmark

    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"--out {args.out}: directory exists and is not empty")
    names = generate_benchmark(args.out, args.categories, args.seed, args.size,
                               progress=None if args.quiet else log.info)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")


def _train(args: argparse.Namespace) -> int:
    from memkd_ray.config import load_config
    from memkd_ray.distributed.launcher import train_benchmark

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.workers_per_category is not None:
        overrides.append(f"distributed.workers_per_category={args.workers_per_category}")
    cfg = load_config(args.config, overrides)
    summary = train_benchmark(cfg, args.category, args.storage, address=args.address)
    print(format_results_table(summary.rows))
    print(f"run {summary.run_id}: {summary.results_uri}")
    for row in summary.failed:
        print(f"FAILED {row['category']}: {row['error']}", file=sys.stderr)
    return 1 if summary.failed else 0


def _eval(args: argparse.Namespace) -> None:
    from memkd_ray.checkpoint import load_model
    from memkd_ray.data import read_configured_category
    from memkd_ray.engine import evaluate, resolve_device
    from memkd_ray.inference import save_maps

    device = resolve_device("auto")
    model, checkpoint = load_model(args.checkpoint, device)
    cfg = checkpoint.config
    data = read_configured_category(replace(cfg.data, root=args.data_root), args.category)
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
    header = ["category", *(name for name, _ in TABLE_METRICS), "status"]
    lines = [[row["category"], *(_percent(row[key]) for _, key in TABLE_METRICS),
              row.get("status", "ok")] for row in rows]
    done = [row for row in rows if row.get("status", "ok") == "ok"]
    if len(done) > 1:
        means = [_percent(_mean([row[key] for row in done])) for _, key in TABLE_METRICS]
        lines.append(["mean", *means, f"{len(done)} ok"])
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
