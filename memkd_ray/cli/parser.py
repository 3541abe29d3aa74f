"""The `memkd-ray` argument parser: every command, flag and default."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_STORAGE = "./memkd-store"
CHECKPOINT_HELP = ("checkpoint directory, file:// or s3:// URI of one, or registry:BENCH/CAT "
                   "(the best model in --storage)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memkd-ray",
        description="MemKD anomaly detection, every category of a benchmark at once on Ray")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="benchmark data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic MVTec-layout benchmark")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--categories", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    photos = data_commands.add_parser(
        "photos", help="write the real-photo development benchmark (MVTec layout)")
    photos.add_argument("--out", required=True, type=Path)
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--size", type=int, default=256, help="image side in pixels")
    photos.add_argument("--source", dest="sources", action="append", default=[],
                        metavar="NAME=PATH[:texture|:array|:scene]",
                        help="cut category NAME from this photo instead of the built-in "
                        "collection (repeatable)")
    photos.add_argument("--collection", choices=("development", "confirmation", "all"),
                        default="development",
                        help="built-in categories: the development set that studies tune on, "
                        "the confirmation set kept out of tuning, or both")
    check = data_commands.add_parser("check", help="count and check a benchmark tree")
    check.add_argument("--config", required=True, type=Path)
    check.add_argument("--data-root", required=True)
    check.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, as for train")

    train = _run_options(commands.add_parser(
        "train", help="train and evaluate categories of a benchmark"), "run")
    train.add_argument("--resume", metavar="RUN_ID",
                       help="continue an interrupted or crashed run from its checkpoints "
                       "(its saved config and categories; --data-root may move the data)")

    search = _run_options(commands.add_parser(
        "tune", help="hyper-parameter search per category (Ray Tune)"), "search")
    search.add_argument("--samples", type=int, default=8, help="trials per category")
    search.add_argument("--space", type=Path,
                        help="search space YAML (default: tune/default.yaml beside --config)")
    search.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    search.add_argument("--search", choices=("random", "optuna"), default="random")
    search.add_argument("--max-concurrent", type=int, default=0,
                        help="trials at once per category (0: what the cluster holds)")
    search.add_argument("--select-on", choices=("validation", "test"), default="validation",
                        help="validation (held-out training images with synthetic defects) "
                        "or test (leaks the test split into the choice; reported as such)")
    search.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted search")

    report = commands.add_parser("report", help="HTML report of a train or tune run")
    report.add_argument("run_id", metavar="RUN_ID")
    report.add_argument("--storage", default=DEFAULT_STORAGE)
    report.add_argument("--out", type=Path, metavar="DIR",
                        help="local directory (default: the run's report/ folder in --storage)")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a category's test set")
    evaluate.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    evaluate.add_argument("--storage", default=DEFAULT_STORAGE, help="registry storage")
    evaluate.add_argument("--data-root", required=True)
    evaluate.add_argument("--category", required=True)
    evaluate.add_argument("--save-maps", type=Path, metavar="DIR",
                          help="also write per-image maps and masks (.npz) and index.csv")

    predict = commands.add_parser("predict", help="anomaly maps and scores for images")
    predict.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    predict.add_argument("--storage", default=DEFAULT_STORAGE, help="registry storage")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--out", required=True, type=Path)

    export = commands.add_parser(
        "export", help="export a checkpoint for deployment (ONNX: images to map and score)")
    export.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    export.add_argument("--storage", default=DEFAULT_STORAGE, help="registry storage")
    export.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for model.onnx and model.json")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later)")
    export.add_argument("--batch", type=_batch_size, default=None, metavar="dynamic|N",
                        help="batch dimension of the graph (default: dynamic)")
    export.add_argument("--check-images", nargs="+", type=Path, default=[], metavar="IMAGE",
                        help="own images for the ONNX Runtime check, besides the built-in photos")
    export.add_argument("--threshold", type=float,
                        help="image score above which a part is anomalous, recorded for the line")

    service = commands.add_parser(
        "serve", help="serve the registry's best models over HTTP (Ray Serve)")
    service.add_argument("--storage", default=DEFAULT_STORAGE, help="the registry's storage")
    service.add_argument("--benchmark", help="serve this benchmark only (default: all)")
    service.add_argument("--category", nargs="+", default=[], help="serve these categories only")
    service.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                         help="ONNX Runtime (exported once per checkpoint, cached) or torch")
    service.add_argument("--host", default="127.0.0.1", help="address to listen on")
    service.add_argument("--port", type=int, default=8000)
    service.add_argument("--replicas", type=int, default=1, help="model-server replicas")
    service.add_argument("--cpus-per-replica", type=float, default=1.0)
    service.add_argument("--models-per-replica", type=int, default=4,
                         help="models a replica keeps loaded (least recently used unloaded)")
    service.add_argument("--max-batch", type=int, default=8,
                         help="requests scored together at most")
    service.add_argument("--refresh", type=float, default=10.0, metavar="SECONDS",
                         help="how often the registry is read for new best models")
    service.add_argument("--token-env", metavar="VAR", help="require `Authorization: Bearer "
                         "<token>`, the token read from this environment variable")
    service.add_argument("--address", help="Ray cluster to join (default: a local one)")

    models = commands.add_parser("models", help="the model registry: best model per category")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="best model of every category")
    listing.add_argument("--benchmark")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    show = model_commands.add_parser("show", help="full model card of BENCHMARK/CATEGORY")
    show.add_argument("reference", metavar="BENCHMARK/CATEGORY")
    pull = model_commands.add_parser("pull", help="download and verify a checkpoint")
    pull.add_argument("reference", metavar="BENCHMARK/CATEGORY")
    pull.add_argument("--run", help="the checkpoint of this run instead of the best one")
    pull.add_argument("--to", required=True, type=Path)
    promote = model_commands.add_parser("promote", help="offer a run's checkpoints")
    promote.add_argument("run_id", metavar="RUN_ID")
    promote.add_argument("--metric", default="image_auroc")
    promote.add_argument("--force", action="store_true", help="replace even if not better")
    for sub in (listing, show, pull, promote):
        sub.add_argument("--storage", default=DEFAULT_STORAGE)

    runs = commands.add_parser("runs", help="training runs and their results")
    run_commands = runs.add_subparsers(dest="runs_command", required=True)
    run_list = run_commands.add_parser("list", help="every run with its categories")
    run_show = run_commands.add_parser("show", help="a run's results table")
    run_show.add_argument("run_id", metavar="RUN_ID")
    for sub in (run_list, run_show):
        sub.add_argument("--storage", default=DEFAULT_STORAGE)
    return parser


def _run_options(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """The options `train` and `tune` share."""
    parser.add_argument("--config", type=Path, help="required unless --resume")
    parser.add_argument("--data-root", help="benchmark directory (overrides data.root)")
    parser.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="directory, file:// or s3://bucket/prefix (AWS_* variables)")
    parser.add_argument("--workers-per-category", type=int, metavar="K", help="data-parallel "
                        "workers per category (distributed.workers_per_category)")
    parser.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001, "
                        "host:port); default: start a local Ray")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")
    parser.add_argument("--no-promote", dest="promote", action="store_false",
                        help=f"do not offer the {what}'s checkpoints to the model registry")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write the run report (memkd-ray report) at the end")
    return parser


def _batch_size(text: str) -> int | None:
    """`--batch`: `dynamic` (None) or a positive number."""
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or a positive number")
    return int(text)
