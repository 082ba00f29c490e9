"""Crash and resume, again and again: a worker of the FSDP2 example SIGKILLed at a random moment, beside CPU hogs.

    .venv/bin/python benchmarks/stress_checkpoint.py                      # 30 runs beside 2 CPU hogs
    .venv/bin/python benchmarks/stress_checkpoint.py --runs 5 --hogs 0

First one run of ``examples/fsdp_train.py`` under torchrun with 2 processes and no checkpoints gives the reference
hash and the span of its training (from its first step to its end). Then each run starts the same training under
``torchrun --max-restarts 3`` with ``--checkpoint-dir`` (a checkpoint every ``--save-every`` steps), waits a random
time (uniform over that span), SIGKILLs one of the workers at random and lets torchrun restart the group, which
resumes from the newest complete checkpoint. Every run must end with the reference hash. A kill that comes after the
run finished counts as missed; a kill while a ``.partial`` checkpoint directory exists counts as "during a save". A
failure's command and output go to a file in ``--log-dir``. Exit status 1 if any run failed or ended with another
hash.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from stress_distributed import cpu_hogs, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/fsdp_train.py"


def torchrun(training: list[str], restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", str(restarts),
            "--master-port", str(free_port()), EXAMPLE, *training]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def final_hash(stdout: str) -> str | None:
    lines = stdout.strip().splitlines()
    return lines[-1].split()[-1] if lines and lines[-1].startswith("final parameters sha256") else None


def reference_run(training: list[str], timeout: float) -> tuple[str, float, float]:
    """The uninterrupted run's hash, when its first step was logged and when it ended (seconds from its start)."""
    start = time.perf_counter()
    process = subprocess.Popen(torchrun(training, restarts=0), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    first_step = None
    lines = []
    for line in process.stdout:
        first_step = first_step or time.perf_counter() - start
        lines.append(line)
    process.wait(timeout=timeout)
    expected = final_hash("".join(lines))
    if process.returncode != 0 or expected is None:
        sys.exit("the reference run failed:\n" + "".join(lines)[-3000:])
    return expected, first_step, time.perf_counter() - start


def crash_run(training: list[str], directory: Path, delay: float, timeout: float, rng: random.Random) -> dict:
    """One run killed after ``delay`` seconds: what happened (the kill's moment, resumes, hash, output)."""
    command = torchrun([*training, "--checkpoint-dir", str(directory)], restarts=3)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    moment = "missed (the run had finished)"
    start = time.perf_counter()
    while process.poll() is None and time.perf_counter() - start < timeout:
        workers = children(process.pid)
        if time.perf_counter() - start >= delay and workers:
            saving = any(path.name.endswith(".partial") for path in directory.glob("*"))
            complete = len([path for path in directory.glob("step-*") if not path.name.endswith(".partial")])
            os.kill(rng.choice(workers), signal.SIGKILL)
            moment = "during a save" if saving else ("before the first checkpoint" if not complete
                                                     else "between checkpoints")
            break
        time.sleep(0.05)
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        status = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = "timed out"
    resumed = [line.split()[-1] for line in stdout.splitlines() if line.startswith("resumed from")]
    return {"command": command, "moment": moment, "status": status, "hash": final_hash(stdout),
            "resumed": resumed, "seconds": time.perf_counter() - start, "output": f"{stdout}\n{stderr}"[-8000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes spinning beside the runs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and the choice of worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to one run, restarts included")
    parser.add_argument("--log-dir", type=Path, default=None, help="where failures' output goes (default: a temp dir)")
    args = parser.parse_args()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="stress_checkpoint_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    training = ["--steps", str(args.steps), "--batch", "16", "--save-every", str(args.save_every)]
    rng = random.Random(args.seed)

    failures: list[str] = []
    moments: Counter[str] = Counter()
    start = time.perf_counter()
    with cpu_hogs(args.hogs):
        expected, startup, duration = reference_run(training, args.timeout)
        print(f"reference: {' '.join(training)}: training from {startup:.0f} s to {duration:.0f} s, final parameters "
              f"sha256 {expected}\n{args.runs} runs, each killed at a random moment of its training, beside "
              f"{args.hogs} CPU hogs; failures logged in {log_dir}", flush=True)
        with tempfile.TemporaryDirectory(prefix="stress_checkpoint_runs_") as scratch:
            for index in tqdm(range(1, args.runs + 1), desc="runs", unit="run"):
                run = crash_run(training, Path(scratch) / f"run{index:03d}", rng.uniform(startup, duration),
                                args.timeout, rng)
                ok = run["status"] == 0 and run["hash"] == expected
                moments[run["moment"]] += 1
                if not ok:
                    why = "other hash" if run["status"] == 0 else f"exit status {run['status']}"
                    log = log_dir / f"run{index:03d}.log"
                    log.write_text(" ".join(run["command"]) + f"\nkilled {run['moment']}\n" + run["output"])
                    failures.append(f"run {index}: {why}, killed {run['moment']}: {log}")
                tqdm.write(f"run {index}/{args.runs}: {'ok' if ok else 'FAILED'}, killed {run['moment']}, resumed at "
                           f"step {', '.join(run['resumed']) or '- (fresh start)'}, {run['seconds']:.0f} s  "
                           f"({len(failures)} failed so far)")

    print(f"\n{args.runs} runs in {time.perf_counter() - start:.0f} s: {args.runs - len(failures)} ended with the "
          f"reference hash, {len(failures)} failed or ended with another hash")
    for moment, count in sorted(moments.items()):
        print(f"  killed {moment}: {count}")
    for failure in failures:
        print(f"  {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
