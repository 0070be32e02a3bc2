"""PyTorch reference for `covnoise bench`: the time of one plain SGD step.

Measures, on the CPU, one training step of the same model as covnoise
(mean cross-entropy, SGD lr 0.01 momentum 0.9): zero_grad, forward, loss,
backward, optimizer step. Like `covnoise bench`, each batch size uses a fixed
synthetic batch (inputs uniform in [-1.5, 1.5), labels uniform in
0..classes-1), runs the warm-up steps untimed, then reports median, p10 and
p90 in milliseconds over the timed steps, in the same line format as its
`plain` variant. Models (--model), all in training mode (batch norm uses
batch statistics):

  mlp       784-512-512-classes (--hidden), ReLU, PyTorch-default init;
            input [B, 784]. The default.
  lenet5    Conv2d(1,6,5,padding=2) ReLU MaxPool2d(2); Conv2d(6,16,5) ReLU
            MaxPool2d(2); flatten 400; Linear(400,120) ReLU Linear(120,84)
            ReLU Linear(84,classes); PyTorch-default init; input [B,1,28,28].
  vgg11, vgg16
            CIFAR VGG with batch norm (kuangliu/pytorch-cifar): per cfg
            number n, Conv2d(in,n,3,padding=1) BatchNorm2d(n) ReLU; 'M' is
            MaxPool2d(2,2); flatten 512; Linear(512,classes); PyTorch-default
            init; input [B,3,32,32].
  resnet20, resnet32, resnet44, resnet56
            He et al. 2016 CIFAR ResNet-(6n+2), n = 3, 5, 7, 9, as in
            Yerlan Idelbayev's pytorch_resnet_cifar10: conv3x3(3,16) BN ReLU;
            3 stages of n BasicBlocks (16, 32, 64 channels; first-block
            stride 1, 2, 2); option-A shortcut (identity, or x[:, :, ::2, ::2]
            zero-padded by planes//4 channels each side); global average
            pooling; Linear(64,classes); kaiming_normal_ on Conv2d and Linear
            weights; input [B,3,32,32].

At start it prints `params MODEL N`, the number of trainable parameters (sum
of p.numel(); batch-norm running statistics are buffers, not counted).

With --backpack it times, round-robin on the same batch, PyTorch's plain
step and BackPACK's exact (SumGradSquared) and Monte-Carlo (DiagGGNMC)
diagonal-Fisher noise steps (see bench_backpack): what a PyTorch user has
in place of covnoise's diag-exact and diag-mc-fisher variants.

Optional and not part of CI. `make bench-venv` installs PyTorch, BackPACK
and numpy from PyPI in bench/.venv (only the CPU is used; PyPI's Linux
wheel also pulls ~5 GB of CUDA libraries). `covnoise bench --against
pytorch|backpack` runs this script with the bench's own settings and prints
the ratios; by hand, on a quiet machine, with the same thread count as the
Rust run:

    bench/.venv/bin/python bench/pytorch_reference.py --model lenet5 --threads 2 --backpack
    bench/.venv/bin/python bench/pytorch_reference.py --threads 2 --json torch-2t.json
    bench/.venv/bin/python bench/pytorch_reference.py --threads 1 --json torch-1t.json
    bench/.venv/bin/python bench/pytorch_reference.py --threads 2 --products
    bench/.venv/bin/python bench/pytorch_reference.py --model resnet20 --threads 2 \\
        --batch-sizes 128 --json torch-resnet20-2t.json
    bench/.venv/bin/python bench/pytorch_reference.py --model vgg16 --classes 100 --count-only
"""

import argparse
import json
import math
import os
import sys
import time


def _threads_from_argv():
    # OpenBLAS (numpy's, timed by --products) fixes its thread count when it
    # is loaded, so --threads is read before numpy and torch are imported.
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


_THREADS = _threads_from_argv()
if _THREADS is not None:
    os.environ["OPENBLAS_NUM_THREADS"] = _THREADS

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

MODELS = ["mlp", "lenet5", "resnet20", "resnet32", "resnet44", "resnet56", "vgg11", "vgg16"]

VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
}

RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


def int_list(s):
    return [int(v) for v in s.split(",") if v.strip()]


def percentile(sorted_ms, q):
    # Same rule as covnoise's bench: nearest rank round((n - 1) * q).
    return sorted_ms[int(math.floor((len(sorted_ms) - 1) * q + 0.5))]


def mlp(hidden, classes):
    sizes = [784] + hidden
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], classes))


def lenet5(classes):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes))


def vgg(cfg, classes):
    # kuangliu/pytorch-cifar VGG; its trailing AvgPool2d(1, 1) is the identity
    # and is left out.
    layers = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1, bias=True),
                       nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, classes))


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

    def shortcut(self, x):
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, n, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks = []
        in_planes = 16
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            for k in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if k == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build(name, classes, hidden):
    if name == "mlp":
        return mlp(hidden, classes)
    if name == "lenet5":
        return lenet5(classes)
    if name in VGG_CFG:
        return vgg(VGG_CFG[name], classes)
    if name in RESNET_BLOCKS:
        return CifarResNet(RESNET_BLOCKS[name], classes)
    raise ValueError(f"unknown model {name}")


def input_shape(name):
    if name == "mlp":
        return (784,)
    if name == "lenet5":
        return (1, 28, 28)
    return (3, 32, 32)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def bench_batch(name, b, classes, hidden, warmup, steps):
    torch.manual_seed(b)
    model = build(name, classes, hidden)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(b, *input_shape(name)) * 3.0 - 1.5
    y = torch.randint(0, classes, (b,))
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
    return {"model": name, "batch_size": b, "variant": "pytorch-plain",
            "median_ms": percentile(times, 0.5), "p10_ms": percentile(times, 0.1),
            "p90_ms": percentile(times, 0.9), "steps": len(times)}


def bench_backpack(name, b, classes, hidden, warmup, steps, small_batch):
    """PyTorch's plain step and BackPACK's noisy steps, round-robin on the
    same batch (one model each, the same initial weights):

      pytorch-plain        as bench_batch;
      backpack-diag-exact  the loss backward inside backpack(SumGradSquared()),
                           then diagonal-Fisher noise added to each gradient,
                           std sqrt(c F), c = 1/small_batch, F = B * the
                           sum of squared per-example gradients of the mean
                           loss (= (1/B) sum_i g_i^2), then the SGD step:
                           covnoise's diag-exact variant;
      backpack-diag-mc     the same with backpack(DiagGGNMC()) (one sampled
                           label per example, BackPACK's Monte-Carlo
                           Fisher/GGN diagonal): covnoise's diag-mc-fisher.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC, SumGradSquared

    c = 1.0 / small_batch
    x = torch.rand(b, *input_shape(name)) * 3.0 - 1.5
    y = torch.randint(0, classes, (b,))

    def make(extended):
        torch.manual_seed(b)
        model = build(name, classes, hidden)
        model.train()
        loss_fn = nn.CrossEntropyLoss()
        if extended:
            model, loss_fn = extend(model), extend(loss_fn)
        return model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain(model, loss_fn, opt):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def noisy(extension, diag_fisher):
        """A noisy step: the backward pass inside backpack(extension), then
        noise of variance c * diag_fisher(p) added to each gradient."""
        def step(model, loss_fn, opt):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            with backpack(extension):
                loss.backward()
            for p in model.parameters():
                p.grad.add_(torch.randn_like(p) * (c * diag_fisher(p)).sqrt())
            opt.step()
        return step

    exact = noisy(SumGradSquared(), lambda p: b * p.sum_grad_squared)
    mc = noisy(DiagGGNMC(), lambda p: p.diag_ggn_mc)
    runs = {"pytorch-plain": (plain, make(False)),
            "backpack-diag-exact": (exact, make(True)),
            "backpack-diag-mc": (mc, make(True))}
    times = {k: [] for k in runs}
    for i in range(warmup + steps):
        for k, (step, state) in runs.items():
            t0 = time.perf_counter()
            step(*state)
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    out = []
    for k, ts in times.items():
        ts.sort()
        out.append({"model": name, "batch_size": b, "variant": k,
                    "median_ms": percentile(ts, 0.5), "p10_ms": percentile(ts, 0.1),
                    "p90_ms": percentile(ts, 0.9), "steps": len(ts)})
    return out


def mlp_products(b, hidden, classes, warmup, steps):
    """The matrix products of a plain MLP step alone, as covnoise bench's
    matmul-products variant: per layer the forward product, the weight
    gradient and, except for the first layer, the input gradient;
    transposes are views. Timed round-robin in three ways:

      pytorch-matmul-products  torch.mm in covnoise's layout (W is
                               [in, out]): a @ W, a.T @ delta, delta @ W.T
      pytorch-linear-products  torch.mm in nn.Linear's layout (W is
                               [out, in]), as its autograd runs them:
                               a @ W.T, delta.T @ a, delta @ W
      numpy-openblas-products  numpy.matmul (OpenBLAS), covnoise's layout
    """
    g = torch.Generator().manual_seed(b)
    sizes = [784] + hidden + [classes]
    ours, linear = [], []
    for l, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        a = torch.rand(b, n_in, generator=g) * 2 - 1
        w = torch.rand(n_in, n_out, generator=g) * 2 - 1
        w_out_in = w.t().contiguous()
        d = torch.rand(b, n_out, generator=g) * 2 - 1
        ours += [(a, w), (a.t(), d)]
        linear += [(a, w_out_in.t()), (d.t(), a)]
        if l > 0:
            ours.append((d, w.t()))
            linear.append((d, w_out_in))
    np_pairs = [(x.numpy(), y.numpy()) for x, y in ours]
    runs = {"pytorch-matmul-products": lambda: [torch.mm(x, y) for x, y in ours],
            "pytorch-linear-products": lambda: [torch.mm(x, y) for x, y in linear],
            "numpy-openblas-products": lambda: [np.matmul(x, y) for x, y in np_pairs]}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for i in range(warmup + steps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    out = []
    for name, ts in times.items():
        ts.sort()
        out.append({"model": "mlp", "batch_size": b, "variant": name,
                    "median_ms": percentile(ts, 0.5), "p10_ms": percentile(ts, 0.1),
                    "p90_ms": percentile(ts, 0.9), "steps": len(ts)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="mlp",
                   help="model to time (default: mlp)")
    p.add_argument("--classes", type=int, default=10,
                   help="number of output classes (default: 10)")
    p.add_argument("--batch-sizes", type=int_list, default=[128, 4096])
    p.add_argument("--hidden", type=int_list, default=[512, 512],
                   help="hidden widths of the mlp (ignored by the other models)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--count-only", action="store_true",
                   help="print the parameter count and exit")
    p.add_argument("--products", action="store_true",
                   help="mlp only: also time the step's matrix products alone, "
                        "with torch.mm (MKL) and numpy.matmul (OpenBLAS)")
    p.add_argument("--backpack", action="store_true",
                   help="also time BackPACK's exact (SumGradSquared) and Monte-Carlo "
                        "(DiagGGNMC) diagonal-Fisher noise steps, round-robin with the "
                        "plain step (models without batch norm: mlp, lenet5; needs "
                        "pip install backpack-for-pytorch)")
    p.add_argument("--small-batch", type=int, default=128,
                   help="B_S of the noise scale c = 1/B_S of the BackPACK steps "
                        "(default: 128, as covnoise bench)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    a = p.parse_args()
    if a.products and a.model != "mlp":
        p.error("--products applies to the mlp only")
    if a.backpack and a.model not in ("mlp", "lenet5"):
        p.error("--backpack applies to models without batch norm (mlp, lenet5): "
                "per-example gradients are undefined under batch statistics")
    if a.small_batch < 1:
        p.error("--small-batch must be at least 1")
    if a.steps < 1:
        p.error("--steps must be at least 1")
    if a.classes < 1:
        p.error("--classes must be at least 1")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    params = param_count(build(a.model, a.classes, a.hidden))
    print(f"params {a.model} {params}", flush=True)
    if a.count_only:
        return
    backpack_version = None
    if a.backpack:
        try:
            import backpack  # noqa: F401
        except ImportError:
            sys.exit("error: --backpack needs BackPACK: pip install backpack-for-pytorch")
        from importlib.metadata import version
        backpack_version = version("backpack-for-pytorch")
        # BackPACK's hooks on a first layer whose input takes no gradient.
        import warnings
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", backpack {backpack_version}" if backpack_version else ""))
    results = []
    for b in a.batch_sizes:
        if a.backpack:
            rows = bench_backpack(a.model, b, a.classes, a.hidden, a.warmup, a.steps,
                                  a.small_batch)
        else:
            rows = [bench_batch(a.model, b, a.classes, a.hidden, a.warmup, a.steps)]
        if a.products:
            rows += mlp_products(b, a.hidden, a.classes, a.warmup, a.steps)
        for r in rows:
            print(f"batch {b:>5}  {r['variant']:<23} median {r['median_ms']:>9.2f} ms"
                  f"  [p10 {r['p10_ms']:>8.2f}, p90 {r['p90_ms']:>8.2f}]", flush=True)
            results.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch_version": torch.__version__,
                       "backpack_version": backpack_version,
                       "threads": torch.get_num_threads(), "model": a.model,
                       "classes": a.classes, "params": params,
                       "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
