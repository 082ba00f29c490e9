"""Stress the distributed runs' teardown: the FSDP2 example and the distributed tests, again and again, beside CPU hogs.

    .venv/bin/python benchmarks/stress_distributed.py                      # 50 runs beside 2 CPU hogs
    .venv/bin/python benchmarks/stress_distributed.py --runs 10 --hogs 0 --tests tests/test_distributed.py

A process that outlives its gloo process group can die with SIGABRT after its work succeeded, more often on a busy
machine (see the README's "Teardown"). Each run starts ``examples/fsdp_train.py --steps 3 --batch 16`` under
``torch.distributed.run`` with 2 processes, then ``pytest`` on the distributed tests; ``--hogs`` processes spin in
Python meanwhile. A failure's command and output tail go to a file in ``--log-dir``. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = [t for t in ("tests/test_distributed.py", "tests/test_mesh.py") if (ROOT / t).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes spinning in Python for the ``with`` block."""
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(count)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.join()


def example_command() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "examples/fsdp_train.py", "--steps", "3", "--batch", "16"]


def run(command: list[str], timeout: float) -> tuple[bool, float, str]:
    """(succeeded, seconds, output tail) of one command run from the repository root."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, output = result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    except subprocess.TimeoutExpired as error:
        ok, output = False, f"timed out after {timeout:.0f} s\n{error.stdout or ''}\n{error.stderr or ''}"
    return ok, time.perf_counter() - start, output[-5000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes spinning beside the runs")
    parser.add_argument("--tests", nargs="*", default=DEFAULT_TESTS,
                        help=f"pytest files run in each run (default: {' '.join(DEFAULT_TESTS)}; none: skip)")
    parser.add_argument("--no-example", action="store_true", help="run only the tests")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one command")
    parser.add_argument("--log-dir", type=Path, default=None, help="where failures' output goes (default: a temp dir)")
    args = parser.parse_args()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="stress_distributed_"))
    log_dir.mkdir(parents=True, exist_ok=True)

    commands = {}
    if not args.no_example:
        commands["example"] = example_command
    if args.tests:
        commands["tests"] = lambda: [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.tests]
    what = " and ".join(["the example"] * (not args.no_example) + [" ".join(args.tests)] * bool(args.tests))
    print(f"{args.runs} runs of {what} beside {args.hogs} CPU hogs; failures logged in {log_dir}", flush=True)

    seconds: dict[str, list[float]] = {name: [] for name in commands}
    failures: list[str] = []
    start = time.perf_counter()
    with cpu_hogs(args.hogs):
        for index in tqdm(range(1, args.runs + 1), desc="runs", unit="run"):
            line = []
            for name, command in commands.items():
                argv = command()
                ok, took, output = run(argv, args.timeout)
                seconds[name].append(took)
                line.append(f"{name} {'ok' if ok else 'FAILED'} {took:.0f} s")
                if not ok:
                    log = log_dir / f"run{index:03d}-{name}.log"
                    log.write_text(" ".join(argv) + "\n" + output)
                    failures.append(f"run {index} {name}: {log}")
            tqdm.write(f"run {index}/{args.runs}: " + ", ".join(line) + f"  ({len(failures)} failed so far)")

    print(f"\n{args.runs} runs in {time.perf_counter() - start:.0f} s, {len(failures)} failed")
    for name, times in seconds.items():
        if times:
            print(f"  {name}: median {statistics.median(times):.0f} s per run, {min(times):.0f}..{max(times):.0f} s")
    for failure in failures:
        print(f"  {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
