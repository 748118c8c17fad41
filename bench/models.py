#!/usr/bin/env python3
"""CPU forward throughput of each classifier architecture.

Usage::

    .venv/bin/python bench/models.py [--size 256] [--batch 16] [--seconds 5] [--channels 3]
                                     [--arch efficientnet-b0 --arch densenet121 ...]

Builds every architecture of :mod:`triage_node.model` (random weights, ``pretrained=False``),
warms it up, then times forward passes of one ``(batch, channels, size, size)`` batch under
``torch.inference_mode()`` on the CPU with all cores, for about ``--seconds`` each. Prints
architecture, parameters (millions) and slices per second; stops by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage_node.model import ARCHITECTURES, build_network


def measure(
    arch: str, *, channels: int, size: int, batch: int, seconds: float
) -> tuple[float, float]:
    """Return (parameters in millions, slices per second) for one architecture."""
    torch.manual_seed(0)
    net = build_network(arch, channels).eval()
    params = sum(p.numel() for p in net.parameters()) / 1e6
    x = torch.randn(batch, channels, size, size)
    with torch.inference_mode():
        for _ in range(2):
            net(x)
        done = 0
        start = time.perf_counter()
        while True:
            out = net(x)
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= 2 * batch:
                break
    assert out.shape == (batch, 6), out.shape
    return params, done / elapsed


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    archs = args.arch or list(ARCHITECTURES)
    print(
        f"torch {torch.__version__}, {threads} threads, batch {args.batch}, "
        f"{args.channels}x{args.size}x{args.size}, ~{args.seconds:g} s per architecture"
    )
    print(f"{'architecture':<18}{'params (M)':>12}{'slices/s':>12}")
    for arch in archs:
        params, rate = measure(
            arch, channels=args.channels, size=args.size, batch=args.batch, seconds=args.seconds
        )
        print(f"{arch:<18}{params:>12.2f}{rate:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
