"""The benchmark script runs and prints its table (no timing is asserted: speed is the benchmark's job)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


def test_step_speed_benchmark_runs_quick():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--warmup", "1"],
                            capture_output=True, text=True, timeout=120, check=True)
    for row in ("Lamb(foreach=False)", "Lamb(foreach=True)", "Lamb(fused=True)", "AdamW(foreach=True)",
                "AdamW(fused=True)"):
        assert row in result.stdout
    assert "== bert-base: 199 float32 tensors" in result.stdout and "== many-small" in result.stdout
    assert "efficiency" in result.stdout and "== per-size: one float32 matrix" in result.stdout
    per_size = result.stdout.split("== per-size")[1]
    assert "4x1024" in per_size and "64x1024" in per_size


def test_efficiency_counts_the_bytes_each_step_must_move():
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
    step_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_speed)
    matrix, vector = [(256, 1024)], [(4096,)]
    assert step_speed.moved_bytes("AdamW(fused=True)", matrix, 4, False) == 28
    assert step_speed.moved_bytes("Lamb(fused=True)", matrix, 4, False) == 40
    assert step_speed.moved_bytes("Lars(fused=True)", matrix, 4, False) == 28
    eight_bit = "Lamb(fused=True, state_dtype='8bit')"
    assert step_speed.moved_bytes(eight_bit, matrix, 4, False) == 12 + 4 + 6 * (1 + 8 / 256)
    assert step_speed.moved_bytes(eight_bit, vector, 4, False) == 40  # 1-D tensors keep float32 state
    assert step_speed.moved_bytes(eight_bit, matrix + vector * 64, 4, False) == (22.1875 + 40) / 2
    assert step_speed.moved_bytes("Lamb(fused=True)", matrix, 2, True) == 3 * 4 + 2 + 6 * 2 + 2  # bf16, fp32 masters
    # A LAMB 1.43x as slow as AdamW moves its 40 bytes as fast as AdamW moves its 28.
    assert abs(step_speed.efficiency("Lamb(fused=True)", 40 / 28, matrix, step_speed.torch.float32) - 1.0) < 1e-12
