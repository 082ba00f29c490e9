"""Optimizer step-speed benchmark: torchlamb.Lamb against torch.optim.AdamW, in one process.

Run it from the repository root (``torchlamb`` must be installed, e.g. editable in ``.venv``)::

    .venv/bin/python benchmarks/step_speed.py                        # both workloads, 20 rounds
    .venv/bin/python benchmarks/step_speed.py --workload many-small --rounds 5
    .venv/bin/python benchmarks/step_speed.py --quick                # tiny shapes, a few seconds
    .venv/bin/python benchmarks/step_speed.py --compile --workload bert-base   # and torch.compile'd steps
    .venv/bin/python benchmarks/step_speed.py --dtype bfloat16 --master-weights  # bf16 parameters, fp32 masters

It times one ``optimizer.step()`` (gradients already in ``p.grad``; no forward or backward) for:

* ``Lamb(foreach=False)``  -- torchlamb's single-tensor path (a Python loop over tensors),
* ``Lamb(foreach=True)``   -- torchlamb's multi-tensor path (``torch._foreach_*`` ops),
* ``Lamb(fused=True)``     -- torchlamb's fused two-pass kernels: C++ on the CPU (compiled at first use, then
  cached), Triton on CUDA,
* ``Lamb(fused=True, state_dtype='8bit')`` -- the fused kernels on 8-bit block-wise moments,
* ``Lars(foreach=True)``, ``Lars(fused=True)`` -- torchlamb's LARS, multi-tensor and fused (also on an 8-bit buffer),
* the LAMBs of pytorch_optimizer, torch-optimizer and timm where they are installed (``--no-public`` drops them),
* with ``--compile``: ``Lamb``, ``Lars`` and ``AdamW`` (foreach) with ``torch.compile(optimizer.step)``,
* ``AdamW(foreach=True)``  -- PyTorch's multi-tensor AdamW,
* ``AdamW(fused=True)``    -- PyTorch's fused AdamW, the baseline every ratio is taken against.

Workloads:

* ``bert-base``: the 199 parameter tensors of BERT-base (~110M float32 values), shapes listed explicitly below.
* ``many-small``: 2000 tensors of shape (4096,), where per-tensor overhead dominates.
* ``few-large``: 8 tensors of 2²² values (32M in all), memory-bound, and few enough for ``--compile`` to compile in
  minutes on a small CPU (BERT-base's 199 tensors take far longer to compile there).

Method (paired ratios). On a small shared VM the absolute step time drifts (up to 2x, following the host's
memory-bandwidth phase), but two optimizers timed back to back see the same phase, so their *ratio* is steady.
Each optimizer therefore gets its own copy of the parameters and the same fixed random gradients (so their
states never interact), is warmed up for a few steps, and then the benchmark runs R rounds. A round times one
step of every optimizer in turn (``time.perf_counter``; ``torch.cuda.synchronize()`` around the step on CUDA),
alternating the order each round so no optimizer always runs first. Per optimizer it reports the median
ms/step over rounds, the median over rounds of the per-round ratio (its time / fused AdamW's time in the same
round), and the spread of that per-round ratio (IQR and min-max). Read the ratio, not the absolute time.

Progress lines go to stderr; the report (machine, versions, command line, tables) goes to stdout.
This file is a standalone script: the ``torchlamb`` package never imports it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

import torchlamb
from torchlamb.quantized import BLOCK, quantizes

Shape = tuple[int, ...]
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

BASELINE = "AdamW(fused=True)"
# Options every torchlamb optimizer here gets: {"master_weights": True} with --master-weights.
TORCHLAMB_OPTIONS: dict[str, object] = {}
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "Lamb(foreach=False)": lambda params: torchlamb.Lamb(params, foreach=False, **TORCHLAMB_OPTIONS),
    "Lamb(foreach=True)": lambda params: torchlamb.Lamb(params, foreach=True, **TORCHLAMB_OPTIONS),
    "Lamb(fused=True)": lambda params: torchlamb.Lamb(params, fused=True, **TORCHLAMB_OPTIONS),
    "Lamb(fused=True, state_dtype='8bit')": lambda params: torchlamb.Lamb(params, fused=True, state_dtype="8bit",
                                                                          **TORCHLAMB_OPTIONS),
    "Lars(foreach=True)": lambda params: torchlamb.Lars(params, foreach=True, **TORCHLAMB_OPTIONS),
    "Lars(fused=True)": lambda params: torchlamb.Lars(params, fused=True, **TORCHLAMB_OPTIONS),
    "Lars(fused=True, state_dtype='8bit')": lambda params: torchlamb.Lars(params, fused=True, state_dtype="8bit",
                                                                          **TORCHLAMB_OPTIONS),
    "AdamW(foreach=True)": lambda params: torch.optim.AdamW(params, foreach=True),
    BASELINE: lambda params: torch.optim.AdamW(params, fused=True),
}


def moved_bytes(opt_name: str, shapes: list[Shape], param_bytes: int, masters: bool) -> float | None:
    """Bytes per parameter value that one step of ``opt_name`` must read and write over ``shapes``, or None.

    Per tensor, with p the parameter's bytes per value, w the bytes of the weights the step updates (4 with float32
    masters, else p) and s the state's (p; with ``state_dtype='8bit'``, 1 plus a 4-byte scale per block of
    torchlamb.quantized.BLOCK values, for the tensors torchlamb.quantized.quantizes: two or more dimensions):

    * AdamW, one pass: reads θ, g, m, v and writes θ, m, v: 7p (28 in float32).
    * LAMB, two passes (the trust ratio needs ‖u‖ of the whole tensor before any value moves): pass 1 reads w, g, m,
      v and writes m, v; pass 2 recomputes u from w, m and v and writes w: 3w + p + 6s (40 in float32), plus p for
      the parameter's copy with masters. A one-pass LAMB that stored u would move as much (u written, then read).
    * LARS: pass 1 reads w and g (the norms); pass 2 reads w, g and the momentum b, writes b and w: 3w + 2p + 2s
      (28 in float32), plus p with masters.
    """
    if opt_name.startswith("AdamW"):
        return 7.0 * param_bytes
    weights = 4 if masters else param_bytes
    copy = param_bytes if weights != param_bytes else 0
    total = values = 0
    for shape in shapes:
        numel = torch.Size(shape).numel()
        eight_bit = "8bit" in opt_name and quantizes(torch.empty(shape, device="meta"))
        state = 1 + 2 * 4 / BLOCK if eight_bit else param_bytes
        if opt_name.startswith("Lars"):
            per_value = 3 * weights + 2 * param_bytes + 2 * state + copy
        elif "Lamb" in opt_name:  # torchlamb's and the other libraries' (the same two passes at least)
            per_value = 3 * weights + param_bytes + 6 * state + copy
        else:
            return None
        total, values = total + per_value * numel, values + numel
    return total / values


def compiled(factory: OptimizerFactory) -> OptimizerFactory:
    """The optimizer with its step compiled by torch.compile (inductor), compiled during the warm-up. Not fullgraph:
    torch's AdamW breaks its own graph (the grad-mode wrapper of torch.optim's step), Lamb and Lars do not."""
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        optimizer = factory(params)
        optimizer.step = torch.compile(optimizer.step)
        return optimizer
    return make


COMPILED: dict[str, OptimizerFactory] = {
    "Lamb(compiled)": compiled(lambda params: torchlamb.Lamb(params, foreach=True, **TORCHLAMB_OPTIONS)),
    "Lars(compiled)": compiled(lambda params: torchlamb.Lars(params, foreach=True, **TORCHLAMB_OPTIONS)),
    "AdamW(compiled)": compiled(lambda params: torch.optim.AdamW(params, foreach=True)),
}


def public_lambs() -> dict[str, OptimizerFactory]:
    """Other libraries' LAMBs that are installed here (``make test`` installs them from requirements-compare.txt),
    each with its default options."""
    found: dict[str, OptimizerFactory] = {}
    try:
        import pytorch_optimizer

        found["pytorch_optimizer.Lamb"] = lambda params: pytorch_optimizer.Lamb(params)
    except ImportError:
        pass
    try:
        import torch_optimizer

        found["torch_optimizer.Lamb"] = lambda params: torch_optimizer.Lamb(params)
    except ImportError:
        pass
    try:
        from timm.optim import Lamb as TimmLamb

        found["timm.optim.Lamb"] = lambda params: TimmLamb(params)
    except ImportError:
        pass
    return found


QUICK_SCALE = 32  # --quick divides the first dimension of every BERT shape by this
QUICK_ROUNDS = 3


def bert_base_shapes(scale: int = 1) -> list[Shape]:
    """BERT-base parameter shapes (hidden 768, 12 layers, intermediate 3072, vocab 30522): 199 tensors.

    ``scale`` > 1 divides each shape's first dimension by it (at least 1), for a tiny stand-in.
    """
    hidden, intermediate, vocab, max_positions, token_types, layers = 768, 3072, 30522, 512, 2, 12
    shapes: list[Shape] = [
        (vocab, hidden),  # word embeddings
        (max_positions, hidden),  # position embeddings
        (token_types, hidden),  # token type embeddings
        (hidden,), (hidden,),  # embedding LayerNorm weight, bias
    ]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm weight, bias
        shapes += [(intermediate, hidden), (intermediate,)]  # intermediate dense
        shapes += [(hidden, intermediate), (hidden,)]  # output dense
        shapes += [(hidden,), (hidden,)]  # output LayerNorm weight, bias
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    assert len(shapes) == 5 + 12 * 16 + 2 == 199
    if scale > 1:
        shapes = [(max(1, shape[0] // scale), *shape[1:]) for shape in shapes]
    return shapes


def many_small_shapes(count: int = 2000, size: int = 4096) -> list[Shape]:
    return [(size,)] * count


def workload_shapes(name: str, quick: bool) -> list[Shape]:
    if name == "bert-base":
        return bert_base_shapes(QUICK_SCALE if quick else 1)
    if name == "many-small":
        return many_small_shapes(200, 512) if quick else many_small_shapes()
    if name == "few-large":
        return many_small_shapes(8, 2**16 if quick else 2**22)
    raise ValueError(f"unknown workload {name!r}")


def make_params(shapes: list[Shape], device: torch.device, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Parameters with fixed random gradients already in ``.grad``; the same values for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        param.grad = torch.randn(shape, generator=generator).to(device, dtype)
        params.append(param)
    return params


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds for one ``optimizer.step()``, with the device synchronized on both sides on CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rss_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_peak_extra(optimizer: torch.optim.Optimizer, device: torch.device) -> float | None:
    """MB by which one step raises the process's resident memory above what it held before the step: the step's
    temporaries (its state already exists after warm-up). Resets the kernel's peak counter via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        optimizer.step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = rss_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
    except OSError:
        return None
    optimizer.step()
    peak = rss_bytes("VmHWM")
    return None if before is None or peak is None else (peak - before) / 2**20


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def progress(message: str) -> None:
    """A progress line on stderr, after flushing stdout so the two stay in order on a terminal or in a log."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def measure(name: str, shapes: list[Shape], rounds: int, warmup: int, device: torch.device,
            factories: dict[str, OptimizerFactory], dtype: torch.dtype
            ) -> tuple[dict[str, tuple[list[float], list[float]]], dict[str, torch.optim.Optimizer]]:
    """Per optimizer, (step seconds, ratio to the baseline's step in the same round) of each round; and the
    optimizers, warm (their parameters, gradients and states still allocated)."""
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for opt_name, factory in factories.items():
        progress(f"[{name}] {opt_name}: building params and warming up ({warmup} steps)")
        optimizer = factory(make_params(shapes, device, dtype=dtype))
        for _ in range(warmup):
            timed_step(optimizer, device)
        optimizers[opt_name] = optimizer

    names = list(optimizers)
    times: dict[str, list[float]] = {opt_name: [] for opt_name in names}
    ratios: dict[str, list[float]] = {opt_name: [] for opt_name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        round_times = {opt_name: timed_step(optimizers[opt_name], device) for opt_name in order}
        for opt_name in names:
            times[opt_name].append(round_times[opt_name])
            ratios[opt_name].append(round_times[opt_name] / round_times[BASELINE])
        progress(f"[{name}] round {round_index + 1}/{rounds} (ms): "
                 + ", ".join(f"{opt_name} {1e3 * round_times[opt_name]:.2f}" for opt_name in names))
    return {opt_name: (times[opt_name], ratios[opt_name]) for opt_name in names}, optimizers


def efficiency(opt_name: str, ratio: float, shapes: list[Shape], dtype: torch.dtype) -> float | None:
    """(bytes the step must move / its time) over (the baseline's bytes / its time): 1.0 means the step moves its
    bytes as fast as fused AdamW moves its own (see moved_bytes)."""
    masters = bool(TORCHLAMB_OPTIONS.get("master_weights"))
    moved = moved_bytes(opt_name, shapes, dtype.itemsize, masters)
    return None if moved is None else moved / (moved_bytes(BASELINE, shapes, dtype.itemsize, masters) * ratio)


def run_workload(name: str, shapes: list[Shape], rounds: int, warmup: int, device: torch.device,
                 factories: dict[str, OptimizerFactory], dtype: torch.dtype = torch.float32) -> None:
    numel = sum(torch.Size(shape).numel() for shape in shapes)
    masters = " (float32 masters for torchlamb)" if TORCHLAMB_OPTIONS.get("master_weights") else ""
    print(f"\n== {name}: {len(shapes)} {str(dtype).removeprefix('torch.')} tensors{masters}, {numel:,} values, "
          f"{rounds} rounds, {warmup} warm-up steps ==")
    results, optimizers = measure(name, shapes, rounds, warmup, device, factories, dtype)

    progress(f"[{name}] measuring each step's peak extra memory")
    extra = {opt_name: step_peak_extra(optimizers[opt_name], device) for opt_name in results}

    header = f"{'optimizer':<24} {'median ms/step':>15} {'ratio to ' + BASELINE:>27} {'ratio IQR':>15} " \
             f"{'ratio min-max':>15} {'efficiency':>10} {'step peak extra MB':>19}"
    print(header)
    print("-" * len(header))
    for opt_name, (times, ratios) in results.items():
        q1, q3 = quartiles(ratios)
        memory = "n/a" if extra[opt_name] is None else f"{extra[opt_name]:.0f}"
        ratio = statistics.median(ratios)
        moved = efficiency(opt_name, ratio, shapes, dtype)
        print(f"{opt_name:<24} {1e3 * statistics.median(times):>15.3f} "
              f"{ratio:>27.3f} {f'{q1:.3f}-{q3:.3f}':>15} "
              f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>15} {'n/a' if moved is None else f'{moved:.2f}':>10} "
              f"{memory:>19}")
    print(f"(one gradient-sized buffer: {dtype.itemsize * numel / 2**20:.0f} MB; efficiency: the bytes per value the "
          "step must move (moved_bytes) per second over fused AdamW's; 1.0 = as fast as AdamW moves its own)")

    sys.stdout.flush()
    del optimizers  # free this workload's params, grads and states before the next one


# One matrix of each size (two dimensions, so that 8-bit state applies): in cache (65K, 262K, 1M values), about
# L2-sized per core (2.4M: BERT's 3072 x 768), out of cache (8M; 23M: BERT's word embeddings, 30522 x 768).
PER_SIZE = [(64, 1024), (256, 1024), (1024, 1024), (3072, 768), (8192, 1024), (30522, 768)]
PER_SIZE_QUICK = [(4, 1024), (64, 1024)]
PER_SIZE_OPTIMIZERS = ["Lamb(fused=True)", "Lamb(fused=True, state_dtype='8bit')", "Lars(fused=True)",
                       "Lars(fused=True, state_dtype='8bit')"]


def run_per_size(sizes: list[Shape], rounds: int, warmup: int, device: torch.device, dtype: torch.dtype) -> None:
    """One tensor at a time: the fused torchlamb steps against fused AdamW, ratio and efficiency per size, so that
    the sizes where the step is bound by arithmetic (in cache) and by memory bandwidth both show.

    Each optimizer is paired with a fused AdamW of its own, one pair at a time, so that only two optimizers' tensors
    compete for the cache (with all four and AdamW in every round, ~63 MB at 1M values, a 32 MB L3 held none of
    them from one step to the next); the AdamW column is the median of its steps over the four pairs."""
    print(f"\n== per-size: one {str(dtype).removeprefix('torch.')} matrix, {rounds} rounds, {warmup} warm-up "
          "steps; each cell: ratio to AdamW(fused=True) (efficiency) ==")
    header = (f"{'shape':>12} {'values':>11} {'AdamW ms':>9} "
              + " ".join(f"{opt_name:>37}" for opt_name in PER_SIZE_OPTIMIZERS))
    print(header)
    print("-" * len(header))
    for shape in sizes:
        cells, baseline_times = [], []
        for opt_name in PER_SIZE_OPTIMIZERS:
            pair = {opt_name: OPTIMIZERS[opt_name], BASELINE: OPTIMIZERS[BASELINE]}
            results = measure(f"per-size {shape}", [shape], rounds, warmup, device, pair, dtype)[0]  # frees the pair
            ratio = statistics.median(results[opt_name][1])
            cells.append(f"{ratio:.3f} ({efficiency(opt_name, ratio, [shape], dtype):.2f})")
            baseline_times += results[BASELINE][0]
        print(f"{'x'.join(map(str, shape)):>12} {torch.Size(shape).numel():>11,} "
              f"{1e3 * statistics.median(baseline_times):>9.3f} "
              + " ".join(f"{cell:>37}" for cell in cells), flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [os.path.basename(sys.executable), *sys.argv]
    return shlex.join(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["bert-base", "many-small", "few-large", "per-size", "all"],
                        default="all", help="all: bert-base, many-small and per-size")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds per workload (default 20, or {QUICK_ROUNDS} with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny shapes (BERT first dims / {QUICK_SCALE}, 200 x (512,)) for a smoke test")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the parameters' dtype (default float32)")
    parser.add_argument("--master-weights", action="store_true",
                        help="torchlamb's optimizers keep float32 masters of bfloat16/float16 parameters")
    parser.add_argument("--compile", action="store_true",
                        help="add Lamb, Lars and AdamW with torch.compile(optimizer.step) (compiling takes minutes)")
    parser.add_argument("--no-public", action="store_true",
                        help="leave out other libraries' LAMBs even where they are installed")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else 20
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch.cuda.is_available() is False")

    print(f"command: {command_line()}")
    print(f"machine: {cpu_model()}, os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"device:  {device} ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device:  {device}")
    print(f"torch {torch.__version__}, torchlamb {torchlamb.__version__}, python {platform.python_version()}")
    print("ratio = optimizer step time / AdamW(fused=True) step time in the same round; median over rounds")

    if device.type == "cpu":
        from torchlamb.kernels import cpu as cpu_kernels

        progress("loading the fused kernels (a first build takes about 30 s)")
        kernels = cpu_kernels.load()  # built (or loaded from torch's cache) here, so no timed step includes it
        if kernels is None:
            print("fused kernels: unavailable, the fused=True rows run the foreach path")
        else:
            print(f"fused kernels: loaded in {kernels.build_seconds:.1f} s (the C++ build on first use; cached after)")

    if args.master_weights:
        TORCHLAMB_OPTIONS["master_weights"] = True
    factories = dict(OPTIMIZERS)
    if not args.no_public:
        factories = {**public_lambs(), **factories}
    if args.compile:
        factories = {**COMPILED, **factories}
    print(f"step peak extra MB: how far one step raises {'allocated GPU memory' if device.type == 'cuda' else 'RSS'}"
          " above its level before the step (temporaries)")
    workloads = ["bert-base", "many-small", "per-size"] if args.workload == "all" else [args.workload]
    for name in workloads:
        if name == "per-size":
            run_per_size(PER_SIZE_QUICK if args.quick else PER_SIZE, args.rounds, args.warmup, device,
                         getattr(torch, args.dtype))
        else:
            run_workload(name, workload_shapes(name, args.quick), args.rounds, args.warmup, device, factories,
                         getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
