"""A killed worker costs nothing: examples/fsdp_train.py under ``torchrun --max-restarts``, one process SIGKILLed
before the first checkpoint, between checkpoints, while DCP writes a checkpoint and while it is committed; torchrun
restarts the group, which resumes from the newest complete checkpoint and ends with the hash of a run never killed
(with float32 and with 8-bit optimizer state).
Resumed at 1 process instead of 2, the parameters agree to 1e-6 (but for attention's key biases, see the test).

The deaths are injected by tests/crash_worker.py (the example with one patched function); a kill from outside at
random moments, many times beside CPU hogs, is benchmarks/stress_checkpoint.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform != "linux",
                                reason="torchrun with gloo on Linux")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fsdp_train.py"
CRASH_WORKER = ROOT / "tests" / "crash_worker.py"
TRAINING = ["--steps", "12", "--batch", "16", "--save-every", "4"]  # checkpoints after steps 4, 8 and 12
TIMEOUT = 300  # seconds for one torchrun, restarts included (a hang fails the test instead of the suite)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, processes: int = 2, restarts: int = 0) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun in its own session; on a timeout the whole session is killed, so nothing of
    it outlives the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--max-restarts", str(restarts), "--master-port", str(free_port()), str(script), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun timed out after {TIMEOUT} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def final_hash(result: subprocess.CompletedProcess) -> str:
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("final parameters sha256 "), result.stdout[-2000:]
    return last.split()[-1]


def resumed_at(result: subprocess.CompletedProcess) -> list[int]:
    """The steps the run resumed at, one per (re)start that found a checkpoint."""
    return [int(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("resumed from")]


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (this test's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and marker in command:
            found.append(command)
    return found


def check_resumed_run(result: subprocess.CompletedProcess, directory: Path, resume_step: int | None,
                      expected_hash: str) -> None:
    """The injected kill happened, the restarted group resumed at ``resume_step`` and ended with ``expected_hash``."""
    assert "(exitcode: -9)" in result.stderr, "the injected SIGKILL did not happen"
    assert resumed_at(result) == ([] if resume_step is None else [resume_step])
    assert final_hash(result) == expected_hash
    # The killed save's directory is gone and the newest 3 (the default --keep) remain, each complete.
    assert sorted(path.name for path in directory.iterdir()) == [f"step-{s:09d}" for s in (4, 8, 12)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run never killed (and never checkpointed): its hash and its whole parameters."""
    parameters = tmp_path_factory.mktemp("uninterrupted") / "parameters.pt"
    result = succeeded(torchrun(EXAMPLE, *TRAINING, "--parameters-out", str(parameters)))
    return final_hash(result), torch.load(parameters)


# (moment, the step the restarted group resumes at: None when no checkpoint was complete)
DEATHS = {
    "before the first checkpoint": ("step:3:1", None),
    "between checkpoints": ("step:6:0", 4),
    "while DCP writes a checkpoint": ("save:8:1", 4),
    "while the checkpoint is committed": ("commit:8:0", 4),
}


@pytest.mark.parametrize("death", list(DEATHS))
def test_a_killed_worker_resumes_and_ends_bitwise_where_an_uninterrupted_run_ends(uninterrupted, tmp_path, death):
    moment, resume_step = DEATHS[death]
    directory = tmp_path / "checkpoints"
    result = succeeded(torchrun(CRASH_WORKER, moment, *TRAINING, "--checkpoint-dir", str(directory), restarts=1))
    check_resumed_run(result, directory, resume_step, uninterrupted[0])
    assert not leftover_processes(str(tmp_path))


def test_8bit_sharded_state_resumes_bitwise(uninterrupted, tmp_path):
    """Lamb's 8-bit moments (codes and block scales, sharded by FSDP2) come back exactly from a save killed midway."""
    training = [*TRAINING, "--state-dtype", "8bit"]
    expected = final_hash(succeeded(torchrun(EXAMPLE, *training)))
    assert expected != uninterrupted[0]  # the 8-bit state is in use: it rounds the moments
    directory = tmp_path / "checkpoints"
    result = succeeded(torchrun(CRASH_WORKER, "save:8:0", *training, "--checkpoint-dir", str(directory), restarts=1))
    check_resumed_run(result, directory, 4, expected)


def test_a_run_killed_at_two_processes_resumes_at_one(uninterrupted, tmp_path):
    directory = tmp_path / "checkpoints"
    killed = torchrun(CRASH_WORKER, "step:6:1", *TRAINING, "--checkpoint-dir", str(directory))  # no restarts
    assert killed.returncode != 0 and "final parameters" not in killed.stdout
    parameters = tmp_path / "parameters.pt"
    resumed = succeeded(torchrun(EXAMPLE, *TRAINING, "--checkpoint-dir", str(directory), "--parameters-out",
                                 str(parameters), processes=1))
    assert resumed_at(resumed) == [4]
    expected, actual = uninterrupted[1], torch.load(parameters)
    assert actual.keys() == expected.keys()
    # Attention's key bias gets a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys), so
    # Adam's m/√v turns its rounding noise into whole-sized steps: it walks at ~1e-5 from 0, a walk that differs with
    # the batch's split. Every other entry agrees to 1e-6 (measured 2026-12-07: 1.2e-7 at most, key biases 1.6e-6).
    for name in expected:
        difference = (actual[name] - expected[name]).abs()
        if name.endswith("in_proj_bias"):
            queries, keys, values = difference.chunk(3)
            difference = torch.cat([queries, values])
            assert max(expected[name].chunk(3)[1].abs().max(), actual[name].chunk(3)[1].abs().max()) < 1e-4
        assert difference.max() <= 1e-6, f"{name}: largest difference {difference.max():.3g}"
    assert not leftover_processes(str(tmp_path))
