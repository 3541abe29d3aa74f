"""The commands that use trained models: `eval`, `predict`, `export`, `models`, `runs`,
`report`. `models list|show` and `runs` import no torch: they run where it is not installed."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from memkd_ray.cli.tables import (
    format_models_table,
    format_promotion,
    format_results_table,
    render_table,
)
from memkd_ray.errors import UserInputError
from memkd_ray.files import writable_dir


def evaluate_checkpoint(args: argparse.Namespace) -> None:
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


def predict(args: argparse.Namespace) -> None:
    from memkd_ray.deploy.runtime import is_onnx_export

    if is_onnx_export(args.checkpoint):
        _predict_onnx(args)
        return
    from memkd_ray.checkpoint import load_model
    from memkd_ray.checkpoint_format import META_FILE, checkpoint_decision
    from memkd_ray.engine import place_model, resolve_device
    from memkd_ray.inference import predict_images
    from memkd_ray.storage.registry import fetch_checkpoint

    writable_dir("--out", args.out)
    device = resolve_device("auto")
    model, checkpoint = load_model(fetch_checkpoint(args.checkpoint, args.storage), device)
    cfg = checkpoint.config
    model = place_model(model, cfg, device)
    decision = checkpoint_decision(checkpoint.meta, str(checkpoint.directory / META_FILE))
    answers = predict_images(model, args.images, cfg, args.out, device, decision)
    _note_missing_decision(decision)
    print(json.dumps(answers, indent=2))


def _note_missing_decision(decision: object) -> None:
    """After the answers: a run that fails says one line, its reason, and nothing else."""
    if decision is None:
        from memkd_ray.decision import NO_DECISION_NOTE

        print(f"note: {NO_DECISION_NOTE}", file=sys.stderr)


def _predict_onnx(args: argparse.Namespace) -> None:
    """`predict` with an ONNX export: ONNX Runtime only, torch is never imported."""
    from memkd_ray.deploy.runtime import OnnxScorer, predict_with_onnx

    writable_dir("--out", args.out)
    scorer = OnnxScorer.open(args.checkpoint)
    answers = predict_with_onnx(scorer, args.images, args.out)
    _note_missing_decision(scorer.decision)
    print(json.dumps(answers, indent=2))


def export(args: argparse.Namespace) -> None:
    from memkd_ray.deploy.export import export_onnx
    from memkd_ray.storage.registry import fetch_checkpoint

    writable_dir("--out", args.out)
    sidecar = export_onnx(fetch_checkpoint(args.checkpoint, args.storage), args.out,
                          source=args.checkpoint, opset=args.opset, batch=args.batch,
                          check_image_paths=args.check_images, threshold=args.threshold)
    print(json.dumps({"onnx": str((args.out / sidecar["model"]["file"]).resolve()),
                      "parity": sidecar["parity"]}, indent=2))


def models(args: argparse.Namespace) -> None:
    from memkd_ray.checkpoint_format import META_FILE
    from memkd_ray.storage import open_storage
    from memkd_ray.storage.registry import Registry, check_metric, parse_reference

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
        meta = json.loads(registry.read(f"{base}/{META_FILE}"))
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

        check_metric(args.metric)
        layout = RunLayout(registry.storage, args.run_id)
        if not registry.storage.exists(layout.results_path):
            raise UserInputError(f"run {args.run_id}: no results.parquet in {args.storage}")
        finished = [row for row in read_results(layout) if row["status"] == "ok"]
        if not finished:
            raise UserInputError(f"run {args.run_id}: no category finished ok, nothing to "
                                 "promote")
        for row in finished:
            print(format_promotion(registry.promote(row["checkpoint_uri"], args.metric,
                                                    force=args.force)))


def runs(args: argparse.Namespace) -> None:
    from memkd_ray.storage import open_storage
    from memkd_ray.storage.layout import RunLayout, list_runs, read_results

    storage = open_storage(args.storage)
    if args.runs_command == "list":
        rows = [[run_id, str(len(rows)), ", ".join(sorted({r["benchmark"] for r in rows})),
                 str(sum(r["status"] == "ok" for r in rows))]
                for run_id, rows in list_runs(storage)]
        print(render_table([["run", "categories", "benchmarks", "ok"], *rows]))
        return
    layout = RunLayout(storage, args.run_id)
    if not storage.exists(layout.results_path):
        raise UserInputError(f"run {args.run_id}: no results.parquet in {args.storage}")
    print(format_results_table(read_results(layout)))


def report(args: argparse.Namespace) -> None:
    from memkd_ray.report import write_report
    from memkd_ray.storage import open_storage

    if args.out is not None:
        writable_dir("--out", args.out)
    print(f"report: {write_report(open_storage(args.storage), args.run_id, args.out)}")
