#!/usr/bin/env python3
"""Inference throughput: ``predict_series`` (DICOM read from disk included) vs raw forward.

Usage::

    .venv/bin/python bench/infer.py [--slices 40] [--rounds 3] [--arch efficientnet-b0]
                                    [--size 256] [--batch 16] [--device auto]

Writes one phantom series, builds an untrained (random, seeded) artifact of the chosen
architecture, then times per round:

- raw forward: the network alone on a ready (N, C, size, size) tensor, same batch size;
- predict_series: read + order + HU + windows + resize + forward + post-processing.

Prints slices/s for both and the ratio (target >= 0.8x on CPU). Stops by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from triage_node.model import DEFAULT_ARCHITECTURE, load_artifact, random_artifact, resolve_device
from triage_node.phantom import generate_study
from triage_node.pipeline import Predictor
from triage_node.preprocess import PreprocessSpec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arch", default=DEFAULT_ARCHITECTURE)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="triage-infer-"))
    truth = generate_study(work / "series", seed=5, n_slices=args.slices, positive=True)
    files = [s.path for s in truth.slices]
    spec = PreprocessSpec(size=args.size, context=args.context)
    random_artifact(work / "model.tnm", architecture=args.arch, preprocess=spec.to_dict(),
                    in_channels=spec.channels, seed=0)
    device = resolve_device(args.device)
    pred = Predictor(load_artifact(work / "model.tnm", device), batch_size=args.batch)
    x = torch.from_numpy(
        np.random.default_rng(0).random((pred.batch_size, spec.channels, args.size, args.size),
                                        dtype=np.float32))

    def raw_round() -> float:
        n_batches = -(-args.slices // pred.batch_size)
        t = time.perf_counter()
        for _ in range(n_batches):
            pred._forward(x.numpy())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n_batches * pred.batch_size / (time.perf_counter() - t)

    def series_round() -> float:
        t = time.perf_counter()
        pred.predict_series(files)
        return args.slices / (time.perf_counter() - t)

    raw_round()  # warm-up (allocator, cudnn autotune)
    series_round()
    raw, ser = [], []
    for _ in range(args.rounds):
        raw.append(raw_round())
        ser.append(series_round())
    r, s = statistics.median(raw), statistics.median(ser)
    pred.close()

    print(f"\ninference, {args.arch}, {args.size}x{args.size}, {spec.channels} channels, "
          f"batch {pred.batch_size}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, median of {args.rounds}")
    print(f"command: python {' '.join(sys.argv)}")
    print("measure                                   | slices/s")
    print("------------------------------------------|---------")
    print(f"raw forward (ready tensor)                | {r:8.1f}")
    print(f"predict_series ({args.slices} DICOM files from disk) | {s:8.1f}")
    print(f"ratio                                     | {s / r:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
