"""Does the suite catch real bugs? Plant each of a few semantic bugs in a copy of the sources and run the tests that
should catch it; each must fail. Not part of ``make test`` (it takes minutes): run it after a change to the core::

    .venv/bin/python tests/mutations.py            # all
    .venv/bin/python tests/mutations.py masters    # the ones whose name contains "masters"

Each mutation is (name, file under src/torchlamb, the text replaced, its replacement, the tests to run); several
replacements in one file are tuples. The copy
lives in a temporary folder first on PYTHONPATH, with its own torch extensions folder (C++ mutations rebuild there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTATIONS = [
    ("bias correction one step late", "bias_correction.py",
     "return 1 - beta1**t, 1 - beta2**t", "return 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)",
     ["tests/test_reference.py", "-k", "lamb or Lamb"]),
    ("decay outside the ratio", "lamb.py",
     "            update = update * masks[-1]\n        elif decay_inside:\n"
     "            update = update.add(param, alpha=weight_decay)\n        updates.append(update)\n"
     "    return _awaiting_ratios(params, updates, steps, lr, beta1, beta2, bias_correction, step_weight,\n"
     "                            _after_step(decay_after_step, decay_lr, weight_decay, step_weight),\n"
     "                            masks if caution else None, weight_decay if decay_inside else 0.0)\n\n\n"
     "def _after_step(",
     "            update = update * masks[-1]\n        elif decay_inside:\n"
     "            param.mul_(1 - lr * weight_decay)\n        updates.append(update)\n"
     "    return _awaiting_ratios(params, updates, steps, lr, beta1, beta2, bias_correction, step_weight,\n"
     "                            _after_step(decay_after_step, decay_lr, weight_decay, step_weight),\n"
     "                            masks if caution else None, weight_decay if decay_inside else 0.0)\n\n\n"
     "def _after_step(",
     ["tests/test_reference.py"]),
    ("caution's mask mean per shard, not per tensor", "trust.py",
     "        held[:] = [scale]", "        held[:] = [cautious_squares(squares, decay)[1]]",
     ["tests/test_lamb_options.py", "-k", "sharded and fused"]),
    ("LARS reads the wrong norm column", "lars.py",
     "            denominator = norms[:, LARS_DECAYED_GRAD]", "            denominator = norms[:, LARS_GRAD]",
     ["tests/test_reference.py", "-k", "lars or Lars"]),
    ("the foreach path ignores the step weight", "lamb.py",
     "        if step_weight is not None:\n            scale = scale * step_weight.to(scale.device)\n"
     "        if caution_scales is not None:",
     "        if caution_scales is not None:",
     ["tests/test_amp.py"]),
    ("masters not written back", "_storage.py",
     "            if master is not None and id(param) not in self.written_in_kernel:",
     "            if master is not None and id(param) in self.written_in_kernel:",
     ["tests/test_mixed_precision.py"]),
    ("8-bit ties round up", "quantized.py",
     "codes = torch.bucketize(normalized, midpoints)", "codes = torch.bucketize(normalized, midpoints, right=True)",
     ["tests/test_quantized_state.py"]),
    ("the accumulated loss divided by the micro-batches twice", "accumulate.py",
     "loss = loss / self.micro_batches\n", "loss = loss / self.micro_batches / self.micro_batches\n",
     ["tests/test_accumulate.py", "tests/test_noise_scale.py"]),
    # The C++ kernels (rebuilt in the copy: about 30 s each).
    ("C++: bias correction one step late", "kernels/csrc/lamb.cpp",
     "const double t = setup.counts[i];", "const double t = setup.counts[i] + 1;",
     ["tests/test_fused.py", "tests/test_reference.py"]),
    ("C++: Lars dampens the first step too", "kernels/csrc/lars.cpp",
     "setup.counts[i] == 1 ? 1.0 : 1.0 - dampening", "1.0 - dampening",
     ["tests/test_matrix.py", "-k", "lars and fused"]),
    ("C++: Lars's lr outside the momentum", "kernels/csrc/lars.cpp",
     ("(lr_inside_momentum ? lr * s.ratio : s.ratio)", "return lr_inside_momentum ? 1.0 : lr;"),
     ("(s.ratio)", "return lr;"),
     ["tests/test_matrix.py", "-k", "lars and fused"]),
    ("C++: 8-bit ties round up", "kernels/csrc/quantizer.cpp",
     ("(order_key(bits) > static_cast<uint32_t>(entry >> 8))", "_mm512_cmpgt_epi32_mask(key",
      "const __m256i above = _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 8));"),
     ("(order_key(bits) >= static_cast<uint32_t>(entry >> 8))", "_mm512_cmpge_epi32_mask(key",
      "const __m256i above = _mm256_xor_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 8), key),"
      " _mm256_set1_epi32(-1));"),
     ["tests/test_quantized_state.py"]),
    ("a plan outlives replaced state", "_plans.py",
     "        values = _state_values(state, params)\n        return (len(values) == len(self.state_values) and "
     "all(map(operator.is_, values, self.state_values))\n                and ",
     "        return (",
     ["tests/test_plans.py"]),
    ("the gradient check's bulk pass lets a sparse gradient through", "_gradients.py",
     "    if (all([grad is not None and not grad.is_sparse for grad in grads])",
     "    if (all([grad is not None for grad in grads])",
     ["tests/test_optimizer_api.py", "-k", "sparse"]),
    ("any_sharded's bulk pass sees no DTensor", "distributed.py",
     "any(issubclass(kind, DTensor) for kind in", "any(False for kind in",
     ["tests/test_distributed.py", "-k", "fsdp2"]),
    ("C++: a whole step's norms in float32 for float64 parameters", "kernels/csrc/driver.cpp",
     "[](const torch::Tensor& p) { return p.scalar_type() == torch::kFloat64; }",
     "[](const torch::Tensor& p) { return p.scalar_type() == torch::kFloat64 && false; }",
     ["tests/test_fused.py", "-k", "mixed_dtypes"]),
]


def run(name: str, file: str, old: str | tuple[str, ...], new: str | tuple[str, ...], tests: list[str],
        workdir: Path) -> bool:
    """Whether the tests fail with the mutation planted (they should)."""
    src = workdir / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    target = src / "torchlamb" / file
    text = target.read_text()
    olds, news = (old, new) if isinstance(old, tuple) else ((old,), (new,))
    for one_old, one_new in zip(olds, news):
        assert text.count(one_old) == 1, f"{name}: {one_old!r} is not found once in {file}"
        text = text.replace(one_old, one_new)
    target.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(src), "TORCH_EXTENSIONS_DIR": str(workdir / "extensions")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{'caught' if done.returncode else 'MISSED'}: {name} ({' '.join(tests)})"
          + (f"\n    {failed[0]}" if failed else ""), flush=True)
    return done.returncode != 0


def main() -> None:
    wanted = [m for m in MUTATIONS if not sys.argv[1:] or any(a in m[0] for a in sys.argv[1:])]
    with tempfile.TemporaryDirectory() as workdir:
        missed = [m[0] for m in wanted if not run(*m, Path(workdir))]
    print(f"{len(wanted) - len(missed)} of {len(wanted)} mutations caught" + (f"; missed: {missed}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
