"""The commands that train: `data`, `train`, `tune`."""

from __future__ import annotations

import argparse
import logging
import sys

from memkd_ray.cli.tables import format_promotion, format_results_table, format_tune_table
from memkd_ray.errors import UserInputError
from memkd_ray.files import writable_dir
from memkd_ray.metrics import METRIC_KEYS

log = logging.getLogger("memkd_ray")
EXIT_INTERRUPTED = 130
"""Exit code of a run stopped by SIGINT or SIGTERM (128 + SIGINT): it can be resumed."""


def data(args: argparse.Namespace) -> None:
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
    from memkd_ray.data.photos import COLLECTIONS, generate_photo_benchmark, parse_source

    writable_dir("--out", args.out)
    sources = tuple(parse_source(text) for text in args.sources) or COLLECTIONS[args.collection]
    names = generate_photo_benchmark(args.out, sources, args.seed, args.size,
                                     progress=None if args.quiet else log.info)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")


def train(args: argparse.Namespace) -> int:
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
        from memkd_ray.storage import open_storage
        from memkd_ray.storage.registry import Registry

        registry = Registry(open_storage(args.storage))
        for row in summary.rows:
            if row["status"] == "ok":
                print(format_promotion(registry.promote(row["checkpoint_uri"])))
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


def _final_report(storage_uri: str, run_id: str) -> None:
    """The report at the end of train/tune: the results are stored already, so a report that
    cannot be drawn is a warning with the command to retry, not a failed run."""
    from memkd_ray.report import write_report
    from memkd_ray.storage import open_storage

    try:
        print(f"report: {write_report(open_storage(storage_uri), run_id)}")
    except Exception as exc:
        log.warning("report not written (%s: %s); retry with: memkd-ray report %s --storage %s",
                    type(exc).__name__, exc, run_id, storage_uri)


def tune(args: argparse.Namespace) -> int:
    from memkd_ray.config import load_config
    from memkd_ray.distributed.search_space import load_search_space
    from memkd_ray.distributed.tune import SearchInterrupted, tune_benchmark

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
        from memkd_ray.storage import open_storage
        from memkd_ray.storage.registry import Registry

        registry = Registry(open_storage(args.storage))
        for row in summary.selected:
            test = {key: row[f"test_{key}"] for key in METRIC_KEYS}
            print(format_promotion(registry.promote(row["checkpoint_uri"], metrics=test)))
    if args.report:
        _final_report(args.storage, summary.run_id)
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.workers_per_category is not None:
        overrides.append(f"distributed.workers_per_category={args.workers_per_category}")
    return overrides
