"""PyTorch reference for `covnoise bench`: the time of one plain SGD step.

Measures, on the CPU, one training step of the same MLP as covnoise
(784-512-512-10, ReLU, PyTorch-default Linear init, mean cross-entropy,
SGD lr 0.01 momentum 0.9): zero_grad, forward, loss, backward, optimizer
step. Like `covnoise bench`, each batch size uses a fixed synthetic batch
(features uniform in [-1.5, 1.5), labels uniform in 0..9), runs the warm-up
steps untimed, then reports median, p10 and p90 in milliseconds over the
timed steps, in the same line format as its `plain` variant.

Optional and not part of CI. Install PyTorch in a venv outside the repo
(only the CPU is used; PyPI's Linux wheel also pulls ~5 GB of CUDA libraries,
the CPU-only wheel from https://download.pytorch.org/whl/cpu avoids them):

    python3 -m venv /work/.venv-torch
    /work/.venv-torch/bin/pip install torch numpy

Run, on a quiet machine, with the same thread count as the Rust run:

    /work/.venv-torch/bin/python bench/pytorch_reference.py --threads 2 --json torch-2t.json
    /work/.venv-torch/bin/python bench/pytorch_reference.py --threads 1 --json torch-1t.json
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def percentile(sorted_ms, q):
    # Same rule as covnoise's bench: nearest rank round((n - 1) * q).
    return sorted_ms[int(math.floor((len(sorted_ms) - 1) * q + 0.5))]


def bench_batch(b, hidden, warmup, steps):
    torch.manual_seed(b)
    sizes = [784] + hidden
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(b, 784) * 3.0 - 1.5
    y = torch.randint(0, 10, (b,))
    times = []
    for k in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        elapsed = (time.perf_counter() - start) * 1e3
        if k >= warmup:
            times.append(elapsed)
    times.sort()
    return {"batch_size": b, "variant": "pytorch-plain",
            "median_ms": percentile(times, 0.5), "p10_ms": percentile(times, 0.1),
            "p90_ms": percentile(times, 0.9), "steps": len(times)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int_list, default=[128, 4096])
    p.add_argument("--hidden", type=int_list, default=[512, 512])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for b in a.batch_sizes:
        r = bench_batch(b, a.hidden, a.warmup, a.steps)
        print(f"batch {b:>5}  {r['variant']:<22} median {r['median_ms']:>9.2f} ms"
              f"  [p10 {r['p10_ms']:>8.2f}, p90 {r['p90_ms']:>8.2f}]", flush=True)
        results.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch_version": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
