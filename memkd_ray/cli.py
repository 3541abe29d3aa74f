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

from memkd_ray.errors import UserInputError, VerificationError
from memkd_ray.metrics import METRIC_LABELS, nan_mean, percent
from memkd_ray.storage.uri import writable_dir

log = logging.getLogger("memkd_ray")
DEFAULT_STORAGE = "./memkd-store"
EXIT_INTERRUPTED = 130
"""Exit code of a run stopped by SIGINT or SIGTERM (128 + SIGINT): it can be resumed."""
CHECKPOINT_HELP = ("checkpoint directory, file:// or s3:// URI of one, or registry:BENCH/CAT "
                   "(the best model in --storage)")


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
    photos = data_commands.add_parser(
        "photos", help="write the real-photo development benchmark (MVTec layout)")
    photos.add_argument("--out", required=True, type=Path)
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--size", type=int, default=256, help="image side in pixels")
    photos.add_argument("--source", dest="sources", action="append", default=[],
                        metavar="NAME=PATH[:texture|:array|:scene]",
                        help="cut category NAME from this photo instead of the built-in "
                        "development set (repeatable)")
    check = data_commands.add_parser("check", help="count and check a benchmark tree")
    check.add_argument("--config", required=True, type=Path)
    check.add_argument("--data-root", required=True)
    check.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, as for train")

    train = commands.add_parser("train", help="train and evaluate categories of a benchmark")
    train.add_argument("--config", type=Path, help="required unless --resume")
    train.add_argument("--data-root", help="benchmark directory (overrides data.root)")
    train.add_argument("--category", nargs="+", default=["all"], help="names, or all")
    train.add_argument("--storage", default=DEFAULT_STORAGE,
                       help="directory, file:// or s3://bucket/prefix (AWS_* variables)")
    train.add_argument("--workers-per-category", type=int, metavar="K",
                       help="data-parallel workers per category (distributed.workers_per_category)")
    train.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001, host:port); "
                       "default: start a local Ray")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")

    train.add_argument("--resume", metavar="RUN_ID",
                       help="continue an interrupted or crashed run from its checkpoints "
                       "(its saved config and categories; --data-root may move the data)")
    train.add_argument("--no-promote", dest="promote", action="store_false",
                       help="do not offer the new checkpoints to the model registry")
    train.add_argument("--no-report", dest="report", action="store_false",
                       help="do not write the run report (memkd-ray report) at the end")

    search = commands.add_parser("tune", help="hyper-parameter search per category (Ray Tune)")
    search.add_argument("--config", type=Path)
    search.add_argument("--data-root")
    search.add_argument("--category", nargs="+", default=["all"])
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
    search.add_argument("--storage", default=DEFAULT_STORAGE)
    search.add_argument("--workers-per-category", type=int, metavar="K")
    search.add_argument("--address")
    search.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    search.add_argument("--no-promote", dest="promote", action="store_false")
    search.add_argument("--no-report", dest="report", action="store_false")

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    handlers = {"data": _data, "train": _train, "tune": _tune, "eval": _eval, "predict": _predict,
                "export": _export, "models": _models, "runs": _runs, "report": _report}
    try:
        return handlers[args.command](args) or 0
    except UserInputError as exc:
        print(f"memkd-ray: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"memkd-ray: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memkd-ray: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
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
    {"check": _data_check, "synth": _data_synth, "photos": _data_photos}[args.data_command](args)


def _data_check(args: argparse.Namespace) -> None:
    from memkd_ray.config import load_config
    from memkd_ray.data import check_benchmark, reader_options

    cfg = load_config(args.config, [*args.overrides, f"data.root={args.data_root}"])
    names = cfg.data.categories if args.category == ["all"] else args.category
    print(check_benchmark(cfg.data.benchmark, args.data_root, names or None,
                          **reader_options(cfg.data)))


def _data_synth(args: argparse.Namespace) -> None:
    from memkd_ray.data.synthetic import generate_benchmark

    writable_dir("--out", args.out)
    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"--out {args.out}: directory exists and is not empty")
    names = generate_benchmark(args.out, args.categories, args.seed, args.size,
                               progress=None if args.quiet else log.info)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")


def _data_photos(args: argparse.Namespace) -> None:
    from memkd_ray.data.photos import (
        DEVELOPMENT_SOURCES,
        generate_photo_benchmark,
        parse_source,
    )

    writable_dir("--out", args.out)
    sources = tuple(parse_source(text) for text in args.sources) or DEVELOPMENT_SOURCES
    names = generate_photo_benchmark(args.out, sources, args.seed, args.size,
                                     progress=None if args.quiet else log.info)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")


def _train(args: argparse.Namespace) -> int:
    from memkd_ray.config import load_config
    from memkd_ray.distributed.launcher import train_benchmark

    cfg = None
    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--set", args.overrides),
                                          ("--workers-per-category", args.workers_per_category),
                                          ("--category", args.category != ["all"])) if value]
        if given:
            raise UserInputError(f"--resume continues a run with its saved request: {given[0]} "
                                 "cannot change it")
    elif args.config is None:
        raise UserInputError("--config is required (or --resume RUN_ID)")
    else:
        cfg = load_config(args.config, _train_overrides(args))
    summary = train_benchmark(cfg, args.category, args.storage, address=args.address,
                              resume_run=args.resume, data_root=args.data_root)
    print(format_results_table(summary.rows))
    print(f"run {summary.run_id}: {summary.results_uri}")
    if args.promote:
        from memkd_ray.storage.registry import Registry
        from memkd_ray.storage.uri import open_storage

        registry = Registry(open_storage(args.storage))
        for row in summary.rows:
            if row["status"] == "ok":
                _print_promotion(registry.promote(row["checkpoint_uri"]))
    if summary.interrupted:
        names = " ".join(row["category"] for row in summary.interrupted)
        print(f"memkd-ray: {summary.signal or 'interrupted'}: not finished: {names}; continue "
              f"with: memkd-ray train --resume {summary.run_id} --storage {args.storage}",
              file=sys.stderr)
    elif args.report:
        _final_report(args.storage, summary.run_id)
    for row in summary.failed:
        print(f"FAILED {row['category']}: {row['error']}", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return 1 if summary.failed else 0


def _report(args: argparse.Namespace) -> None:
    from memkd_ray.report import write_report
    from memkd_ray.storage.uri import open_storage

    if args.out is not None:
        writable_dir("--out", args.out)
    print(f"report: {write_report(open_storage(args.storage), args.run_id, args.out)}")


def _final_report(storage_uri: str, run_id: str) -> None:
    """The report at the end of train/tune: the results are stored already, so a report that
    cannot be drawn is a warning with the command to retry, not a failed run."""
    from memkd_ray.report import write_report
    from memkd_ray.storage.uri import open_storage

    try:
        print(f"report: {write_report(open_storage(storage_uri), run_id)}")
    except Exception as exc:
        log.warning("report not written (%s: %s); retry with: memkd-ray report %s --storage %s",
                    type(exc).__name__, exc, run_id, storage_uri)


def _tune(args: argparse.Namespace) -> int:
    from memkd_ray.config import load_config
    from memkd_ray.distributed.tune import SearchInterrupted, load_search_space, tune_benchmark

    cfg = space = None
    if not args.resume:
        if args.config is None:
            raise UserInputError("--config is required (or --resume RUN_ID)")
        cfg = load_config(args.config, _train_overrides(args))
        space = load_search_space(str(args.space or args.config.parent / "tune" / "default.yaml"))
    try:
        summary = tune_benchmark(
            cfg, args.category, args.storage, space, args.samples, args.scheduler, args.search,
            args.max_concurrent, args.select_on, address=args.address, resume_run=args.resume,
            on_message=log.info,
        )
    except SearchInterrupted as exc:
        print(f"memkd-ray: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_tune_table(summary.rows))
    print(f"tune run {summary.run_id}: {summary.results_uri}")
    if args.promote:
        from memkd_ray.storage.registry import Registry
        from memkd_ray.storage.uri import open_storage

        registry = Registry(open_storage(args.storage))
        for row in summary.selected:
            test = {key: row[f"test_{key}"] for key in METRIC_LABELS}
            _print_promotion(registry.promote(row["checkpoint_uri"], metrics=test))
    if args.report:
        _final_report(args.storage, summary.run_id)
    return 0


def format_tune_table(rows: list[dict]) -> str:
    """One line per trial: its searched values, its selection score, and for the selected
    trial of each category its test metrics (percent, one decimal)."""
    params = sorted({k for row in rows for k in row if k.startswith("param.")})
    header = ["category", "trial", *(p.removeprefix("param.") for p in params), "epochs",
              "selection", "test I-AUROC", "test AU-PRO", ""]
    lines = [header]
    for row in rows:
        lines.append([row["category"], row["trial_id"],
                      *(_short(row.get(p)) for p in params), str(row["epochs"]),
                      percent(row["selection_value"]),
                      percent(row["test_image_auroc"]), percent(row["test_pixel_aupro"]),
                      " ".join(filter(None, (
                          f"selected on {row['selected_on']}" if row["selected"] else "",
                          "default" if row["is_default"] else "")))])
    return _render(lines)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.workers_per_category is not None:
        overrides.append(f"distributed.workers_per_category={args.workers_per_category}")
    return overrides


def _eval(args: argparse.Namespace) -> None:
    from memkd_ray.checkpoint import load_model
    from memkd_ray.data import read_configured_category
    from memkd_ray.engine import evaluate, place_model, resolve_device
    from memkd_ray.inference import save_maps
    from memkd_ray.storage.registry import fetch_checkpoint

    if args.save_maps:
        writable_dir("--save-maps", args.save_maps)
    device = resolve_device("auto")
    model, checkpoint = load_model(fetch_checkpoint(args.checkpoint, args.storage), device)
    cfg = checkpoint.config
    model = place_model(model, cfg, device)
    data = read_configured_category(replace(cfg.data, root=args.data_root), args.category)
    evaluation = evaluate(model, data.test, cfg, device)
    if args.save_maps:
        save_maps(evaluation, data.test, args.save_maps)
    print(json.dumps(evaluation.metrics, indent=2))


def _batch_size(text: str) -> int | None:
    """`--batch`: `dynamic` (None) or a positive number."""
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or a positive number")
    return int(text)


def _predict(args: argparse.Namespace) -> None:
    from memkd_ray.deploy.runtime import is_onnx_export

    if is_onnx_export(args.checkpoint):
        _predict_onnx(args)
        return
    from memkd_ray.checkpoint import load_model
    from memkd_ray.engine import place_model, resolve_device
    from memkd_ray.inference import predict_images
    from memkd_ray.storage.registry import fetch_checkpoint

    writable_dir("--out", args.out)
    device = resolve_device("auto")
    model, checkpoint = load_model(fetch_checkpoint(args.checkpoint, args.storage), device)
    cfg = checkpoint.config
    model = place_model(model, cfg, device)
    scores = predict_images(model, args.images, cfg, args.out, device)
    print(json.dumps(scores, indent=2))


def _predict_onnx(args: argparse.Namespace) -> None:
    """`predict` with an ONNX export: ONNX Runtime only, torch is never imported."""
    from memkd_ray.deploy.runtime import predict_with_onnx

    writable_dir("--out", args.out)
    scores = predict_with_onnx(args.checkpoint, args.images, args.out)
    print(json.dumps(scores, indent=2))


def _export(args: argparse.Namespace) -> None:
    from memkd_ray.deploy.export import export_onnx
    from memkd_ray.storage.registry import fetch_checkpoint

    writable_dir("--out", args.out)
    sidecar = export_onnx(fetch_checkpoint(args.checkpoint, args.storage), args.out,
                          source=args.checkpoint, opset=args.opset, batch=args.batch,
                          check_image_paths=args.check_images, threshold=args.threshold)
    print(json.dumps({"onnx": str((args.out / sidecar["model"]["file"]).resolve()),
                      "parity": sidecar["parity"]}, indent=2))


def _models(args: argparse.Namespace) -> None:
    from memkd_ray.storage.registry import Registry, parse_reference
    from memkd_ray.storage.uri import open_storage

    registry = Registry(open_storage(args.storage))
    command = args.models_command
    if command == "list":
        cards = registry.list(args.benchmark)
        print(json.dumps(cards, indent=2) if args.format == "json" else format_models_table(cards))
    elif command == "show":
        card = registry.best(*parse_reference(args.reference))
        if card is None:
            raise UserInputError(f"{args.reference}: no model registered in {args.storage}")
        base = registry.storage.path_of(card["checkpoint_uri"])
        meta = json.loads(registry.read(f"{base}/checkpoint.json"))
        print(json.dumps({**card, "config": meta["config"]}, indent=2, sort_keys=True))
    elif command == "pull":
        writable_dir("--to", args.to)
        benchmark, category = parse_reference(args.reference)
        if args.run:
            uri = registry.checkpoint_of_run(args.run, benchmark, category)
        else:
            card = registry.best(benchmark, category)
            if card is None:
                raise UserInputError(f"{args.reference}: no model registered in {args.storage}")
            uri = card["checkpoint_uri"]
        print(registry.pull(uri, args.to).resolve())
    else:
        from memkd_ray.storage.layout import RunLayout, read_results

        layout = RunLayout(registry.storage, args.run_id)
        if not registry.storage.exists(layout.results_path):
            raise UserInputError(f"run {args.run_id}: no results.parquet in {args.storage}")
        for row in read_results(layout):
            if row["status"] == "ok":
                _print_promotion(registry.promote(row["checkpoint_uri"], args.metric,
                                                  force=args.force))


def _print_promotion(promotion) -> None:
    c = promotion.candidate
    where = f"{c['benchmark']}/{c['category']}"
    if promotion.promoted:
        print(f"registry: {where} <- run {c['run_id']} "
              f"(I-AUROC {percent(c['metrics']['image_auroc'])})")
    else:
        best = promotion.best or {}
        print(f"registry: {where} keeps run {best.get('run_id', '?')} "
              f"(I-AUROC {percent(best.get('metrics', {}).get('image_auroc', math.nan))}); "
              f"run {c['run_id']} not better")


def _runs(args: argparse.Namespace) -> None:
    from memkd_ray.storage.layout import RunLayout, list_runs, read_results
    from memkd_ray.storage.uri import open_storage

    storage = open_storage(args.storage)
    if args.runs_command == "list":
        runs = list_runs(storage)
        rows = [[run_id, str(len(rows)), ", ".join(sorted({r["benchmark"] for r in rows})),
                 str(sum(r["status"] == "ok" for r in rows))] for run_id, rows in runs]
        print(_render([["run", "categories", "benchmarks", "ok"], *rows]))
        return
    layout = RunLayout(storage, args.run_id)
    if not storage.exists(layout.results_path):
        raise UserInputError(f"run {args.run_id}: no results.parquet in {args.storage}")
    print(format_results_table(read_results(layout)))


def format_models_table(cards: list[dict]) -> str:
    """One line per registered model: metrics in percent, source run, age, size."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    lines = [["benchmark", "category", *METRIC_LABELS.values(), "run", "age",
              "size"]]
    for card in cards:
        promoted = datetime.fromisoformat(card["promoted_at"])
        age_h = (now - promoted).total_seconds() / 3600
        lines.append([card["benchmark"], card["category"],
                      *(percent(card["metrics"][key]) for key in METRIC_LABELS),
                      card["run_id"], f"{age_h:.1f}h" if age_h < 48 else f"{age_h / 24:.0f}d",
                      f"{card['size_bytes'] / 2**20:.1f} MiB"])
    return _render(lines)


def format_results_table(rows: list[dict]) -> str:
    """Per-category metrics in percent with one decimal (the paper's units), plus the mean."""
    header = ["category", *METRIC_LABELS.values(), "status"]
    lines = [[row["category"], *(percent(row[key]) for key in METRIC_LABELS),
              row.get("status", "ok")] for row in rows]
    done = [row for row in rows if row.get("status", "ok") == "ok"]
    if len(done) > 1:
        means = [percent(nan_mean([row[key] for row in done])) for key in METRIC_LABELS]
        lines.append(["mean", *means, f"{len(done)} ok"])
    return _render([header, *lines])


def _render(lines: list[list[str]]) -> str:
    """Columns padded to width: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(*lines, strict=True)]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
                     for cells in lines)


if __name__ == "__main__":
    sys.exit(main())
