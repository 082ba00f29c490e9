"""The golden record: a fixed matrix of optimizer runs whose every parameter and state tensor is hashed.

A change that claims to change no numbers (a redesign, a speed-up that keeps the arithmetic) must leave every hash
as it was: ``tests/test_golden.py`` runs the matrix and compares. The matrix is Lamb and Lars × every path (a loop
over tensors, foreach, the fused CPU kernels, the Triton kernels in Triton's interpreter) × every storage
(float32; bfloat16 parameters with float32 master weights; bfloat16 state; 8-bit state) × a set of scenarios
(plain; ``max_grad_norm``; GradScaler with an overflow step; ``nonfinite="skip"`` with a NaN step; a group with
``adapt=False``; a tensor lr under ``warmup_poly``; less common options), a few steps each from fixed seeds.

Bits depend on the machine: the fused kernels are built with ``-march=native`` (the vector width sets the order of
their sums) and torch dispatches on the CPU's instruction set. So the record holds one set of hashes per machine
signature (CPU model and flags, torch, triton and numpy versions), with float64 summaries (Σx, Σx²) beside each hash:
on a machine without its own hashes the test compares the summaries at a tolerance that rounding cannot reach and a
change of the math does.

Record this machine's hashes (only at a commit whose numbers are the reference, never to make a failing test pass)::

    .venv/bin/python tests/golden.py --record
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # as a script: the Triton kernels run in the interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

import switches
import torchlamb
from torchlamb import Lamb, Lars, warmup_poly

RECORD = Path(__file__).parent / "golden" / "hashes.json"
STEPS = 4
THREADS = 2  # the fused kernels' sums depend on how the elements are split over threads

OPTIMIZERS = {"lamb": Lamb, "lars": Lars}
PATHS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
         "fused": dict(fused=True), "triton": dict(fused=True)}
_DEFAULT_PATH = {"default": dict()}  # what a user gets: the fused kernels on the CPU
STORAGES = {"float32": dict(), "bf16-master": dict(master_weights=True), "bf16-state": dict(state_dtype=torch.bfloat16),
            "8bit": dict(state_dtype="8bit")}
SCENARIOS = ("plain", "max_grad_norm", "grad_scaler", "skip_nan", "adapt_false", "tensor_lr", "options")
# A few options beyond the defaults, on the less travelled branches of every path.
OTHER_OPTIONS = {"lamb": dict(bias_correction="step_size", decay_outside_ratio=True, trust_clip=(0.0, 10.0),
                              weight_norm_clip=(0.0, 5.0), trust_eps=1e-6),
                 "lars": dict(nesterov=True, denominator="split", trust_clip=(0.0, 10.0), trust_eps=1e-8)}
BASE_OPTIONS = {"lamb": dict(lr=0.01, weight_decay=0.01), "lars": dict(lr=0.5, weight_decay=1e-3,
                                                                        trust_coefficient=0.02)}


def machine_signature() -> dict[str, str]:
    """What decides the bits: the CPU (model and instruction-set flags) and the versions of the numeric libraries."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "flags", "Features"))]
        cpu = cpu[:2]
    except OSError:
        cpu = [platform.processor()]
    versions = {name: _version(name) for name in ("torch", "triton", "numpy")}
    key = hashlib.sha256("\n".join([platform.machine(), *cpu, *versions.values()]).encode()).hexdigest()[:16]
    return {"key": key, "cpu": cpu[0] if cpu else "", **versions}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@contextlib.contextmanager
def path_switches(*, triton_on_cpu: bool, skip_flag_on_device: bool) -> Iterator[None]:
    """Send CPU tensors to the Triton kernels (in the interpreter), and keep a skip flag on the device (the
    accelerator's path) or read it on the host, for the duration."""
    with switches.triton_on_cpu(triton_on_cpu), switches.skip_flag_on_device(skip_flag_on_device):
        yield


def _parameters(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    shapes = {"w1": (16, 256), "w2": (12, 40), "b1": (40,), "b0": (16,)}  # w1 has 8-bit state; b0 starts at zero
    params = {}
    for name, shape in shapes.items():
        value = torch.zeros(shape) if name == "b0" else 0.1 * torch.randn(shape, generator=generator)
        params[name] = torch.nn.Parameter(value.to(dtype))
    return params


def _gradients(params: dict[str, torch.Tensor], step: int, scale: float, nan: bool) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for index, param in enumerate(params.values()):
        grad = torch.randn(param.shape, generator=generator) * (0.5 + index)
        if nan and index == 1:
            grad[3, 5] = float("nan")
        param.grad = (grad * scale).to(param.dtype)


def _setup(name: str, path: str, storage: str, scenario: str, steps: int = STEPS) -> tuple:
    """The parameters, optimizer, scheduler and GradScaler of one run of the matrix, before its first step."""
    optimizer_class = OPTIMIZERS[name]
    params = _parameters(torch.bfloat16 if storage == "bf16-master" else torch.float32)
    options = {**BASE_OPTIONS[name], **{**PATHS, **_DEFAULT_PATH}[path], **STORAGES[storage]}
    decayed = dict(params=[params["w1"], params["w2"]])
    exempt = dict(params=[params["b1"], params["b0"]], weight_decay=0.0)
    if scenario == "max_grad_norm":
        options["max_grad_norm"] = 1.0
    if scenario == "skip_nan":
        options["nonfinite"] = "skip"
    if scenario == "adapt_false":
        exempt["adapt"] = False
    if scenario == "tensor_lr":
        options["lr"] = torch.tensor(options["lr"])
    if scenario == "options":
        options.update(OTHER_OPTIONS[name])
    optimizer = optimizer_class([decayed, exempt], **options)
    scheduler = warmup_poly(optimizer, warmup_steps=2, total_steps=steps + 2) if scenario == "tensor_lr" else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scenario == "grad_scaler" else None
    return params, optimizer, scheduler, scaler


def _train(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
           path: str, scenario: str, steps: range) -> None:
    # The fused CPU kernels never see a skip flag (the step returns on the host); the other paths keep it on the
    # device, as on an accelerator, where every change is weighted by it.
    with path_switches(triton_on_cpu=path == "triton", skip_flag_on_device=path != "fused"):
        for step in steps:
            overflow = scaler is not None and step == 1
            if scaler is not None:
                scaler.scale(torch.zeros(()))  # the scaler makes its scale at its first use
            _gradients(params, step, scale=scaler.get_scale() if scaler else 1.0,
                       nan=(scenario == "skip_nan" and step == 2) or overflow)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()


def _tensors(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and state tensor by name."""
    tensors = {f"param/{key}": value.detach() for key, value in params.items()}
    for key, param in params.items():
        for state_key, value in sorted(optimizer.state[param].items()):
            tensors[f"state/{key}/{state_key}"] = value
    return tensors


def run(name: str, path: str, storage: str, scenario: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """One run of the matrix; returns every parameter and state tensor by name."""
    params, optimizer, scheduler, scaler = _setup(name, path, storage, scenario, steps)
    _train(params, optimizer, scheduler, scaler, path, scenario, range(steps))
    return _tensors(params, optimizer)


# -- checkpoints of every storage format, written at a given commit and resumed by later ones ----------------------
CHECKPOINT_STEPS = 2  # steps before the checkpoint; STEPS - CHECKPOINT_STEPS after it


def write_checkpoints(path: Path) -> None:
    """Each optimizer × storage on the default path: the model and optimizer after CHECKPOINT_STEPS steps, and
    every tensor after the remaining steps, as this commit computes them."""
    cases = {}
    for name in OPTIMIZERS:
        for storage in STORAGES:
            params, optimizer, scheduler, scaler = _setup(name, "default", storage, "plain")
            _train(params, optimizer, scheduler, scaler, "default", "plain", range(CHECKPOINT_STEPS))
            saved = copy.deepcopy(dict(params={k: v.detach() for k, v in params.items()},
                                       optimizer=optimizer.state_dict()))
            _train(params, optimizer, scheduler, scaler, "default", "plain", range(CHECKPOINT_STEPS, STEPS))
            cases[f"{name}/{storage}"] = dict(**saved, expected={k: v.clone() for k, v in
                                                                 _tensors(params, optimizer).items()})
    torch.save(dict(signature=machine_signature(), torchlamb=torchlamb.__version__, cases=cases), path)


def resume_checkpoint(case_name: str, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load a case of :func:`write_checkpoints` into a fresh optimizer, take the remaining steps, return every
    tensor."""
    name, storage = case_name.split("/")
    params, optimizer, scheduler, scaler = _setup(name, "default", storage, "plain")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(case["params"][key])
    optimizer.load_state_dict(case["optimizer"])
    _train(params, optimizer, scheduler, scaler, "default", "plain", range(CHECKPOINT_STEPS, STEPS))
    return _tensors(params, optimizer)


def _describe(tensor: torch.Tensor) -> list[Any]:
    """[sha256 of the bytes, Σx, Σx²] (the sums in float64, as strings where not finite)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    wide = data.double()
    return [digest, *(value if value == value and abs(value) != float("inf") else str(value)
                      for value in (wide.sum().item(), wide.square().sum().item()))]


def run_names() -> list[tuple[str, str, str, str]]:
    return [(name, path, storage, scenario) for name in OPTIMIZERS for path in PATHS for storage in STORAGES
            for scenario in SCENARIOS]


def record_all(progress: bool = False) -> dict[str, dict[str, list[Any]]]:
    """Every run of the matrix: {"lamb/fused/8bit/plain": {tensor name: [sha256, Σx, Σx²]}}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        runs = {}
        for names in run_names():
            if progress:
                print("/".join(names), file=sys.stderr)
            runs["/".join(names)] = {key: _describe(value) for key, value in run(*names).items()}
        return runs
    finally:
        torch.set_num_threads(threads)


def load_record() -> dict[str, Any]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {"machines": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="add (or replace) this machine's hashes in the record")
    parser.add_argument("--checkpoints", metavar="FILE", type=Path,
                        help="write checkpoints of every storage format and what resuming them computes here")
    args = parser.parse_args()
    if args.checkpoints:
        write_checkpoints(args.checkpoints)
        print(f"wrote {args.checkpoints}")
        return
    signature = machine_signature()
    runs = record_all(progress=True)
    record = load_record()
    if args.record:
        record["machines"][signature["key"]] = {"signature": signature, "torchlamb": torchlamb.__version__,
                                                "runs": runs}
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(runs)} runs for machine {signature['key']} in {RECORD}")
    else:
        mine = record["machines"].get(signature["key"], {}).get("runs")
        differ = [name for name, tensors in runs.items() if mine is None or mine.get(name) != tensors]
        print(f"{len(runs) - len(differ)} of {len(runs)} runs identical to the record"
              + ("" if mine else " (no hashes for this machine)"))


if __name__ == "__main__":
    main()
