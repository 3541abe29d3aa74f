"""CPU latency of an ONNX export (ONNX Runtime) against the same model in torch.

For each teacher, the paper's student ([3, 4, 6] decoder, memories of 50 items) at 256 px:
the whole inference path (`model.AnomalyScorer`: teacher, memories, student, anomaly map with
up-sampling and Gaussian filter, score) in torch (float32, no_grad) and its export
(`deploy.export.export_graph`, dynamic batch) in an ONNX Runtime CPU session, both with their
default thread counts. Milliseconds per image at batch 1 and 8: the median of `--repeats` calls
after one warm-up call. WideResNet50 gets random weights (latency does not depend on them).

    python benchmarks/onnx_latency.py                       # both teachers
    python benchmarks/onnx_latency.py --teachers efficientnet_lite0 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from speed import TEACHER_WEIGHTS, describe_device

from memkd_ray.config import load_config
from memkd_ray.deploy.export import DEFAULT_OPSET, export_graph
from memkd_ray.deploy.runtime import INPUT_NAME, OUTPUT_NAMES, cpu_session
from memkd_ray.model import AnomalyScorer, create_memkd, create_scorer


def median_ms_per_image(call: Callable[[], object], batch: int, repeats: int) -> float:
    call()  # warm-up: allocations, ONNX Runtime's first-run planning
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


@torch.no_grad()
def compare(scorer: AnomalyScorer, session: object, batch: int, size: int, repeats: int
            ) -> tuple[float, float, float]:
    """(torch ms/image, ONNX Runtime ms/image, max |map difference|) on one random batch."""
    pixels = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    images = torch.from_numpy(pixels)
    feeds = {INPUT_NAME: pixels}
    torch_ms = median_ms_per_image(lambda: scorer(images), batch, repeats)
    ort_ms = median_ms_per_image(lambda: session.run(list(OUTPUT_NAMES), feeds), batch, repeats)
    difference = np.abs(session.run(list(OUTPUT_NAMES), feeds)[0] - scorer(images)[0].numpy())
    return torch_ms, ort_ms, float(difference.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=list(TEACHER_WEIGHTS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {describe_device(torch.device('cpu'))}, "
          f"onnxruntime {onnxruntime.__version__}")
    print(f"{'teacher':<20}{'batch':>6}{'torch ms/img':>14}{'ORT ms/img':>12}{'speed-up':>10}"
          f"{'max |map diff|':>16}")
    for teacher in args.teachers:
        cfg = load_config(None, [f"teacher.name={teacher}",
                                 f"teacher.weights={TEACHER_WEIGHTS[teacher]}",
                                 f"data.image_size={args.size}"])
        torch.manual_seed(0)
        scorer = create_scorer(create_memkd(cfg), cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            start = time.perf_counter()
            export_graph(scorer, path, DEFAULT_OPSET, None)
            print(f"{teacher}: exported in {time.perf_counter() - start:.0f} s, "
                  f"{path.stat().st_size / 2**20:.0f} MiB")
            session = cpu_session(path)
            for batch in args.batches:
                torch_ms, ort_ms, difference = compare(scorer, session, batch, args.size,
                                                       args.repeats)
                print(f"{teacher:<20}{batch:>6}{torch_ms:>14.1f}{ort_ms:>12.1f}"
                      f"{torch_ms / ort_ms:>9.2f}x{difference:>16.1e}")

if __name__ == "__main__":
    main()
