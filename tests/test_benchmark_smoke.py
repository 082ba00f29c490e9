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
