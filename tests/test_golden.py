"""Every path's numbers are held to the golden record (tests/golden.py): bit for bit on a machine the record has
hashes for, and by float64 summaries (Σx, Σx²) at a tolerance elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

import golden

RECORD = golden.load_record()
SIGNATURE = golden.machine_signature()
MINE = RECORD["machines"].get(SIGNATURE["key"])
# Any recorded machine's runs serve for the summaries: they agree to far better than this across machines.
ANY = MINE or next(iter(RECORD["machines"].values()), None)
RTOL, ATOL = 1e-4, 1e-6


def test_the_record_covers_the_matrix():
    assert ANY is not None, f"no golden record in {golden.RECORD}"
    for machine in RECORD["machines"].values():
        assert sorted(machine["runs"]) == sorted("/".join(names) for names in golden.run_names())


def _close(got: list, expected: list) -> bool:
    """Whether [Σx, Σx²] agree as rounding allows: Σx² relatively; Σx relative to ‖x‖ as well, since a sum of
    entries of both signs may cancel to near 0 while each entry moves by its own rounding."""
    if any(isinstance(v, str) for v in (*got, *expected)):  # NaN or Inf, written as text
        return got == expected
    (total, squares), (expected_total, expected_squares) = got, expected
    scale = max(abs(expected_total), math.sqrt(max(expected_squares, 0.0)))
    return (math.isclose(squares, expected_squares, rel_tol=RTOL, abs_tol=ATOL)
            and abs(total - expected_total) <= RTOL * scale + ATOL)


@pytest.mark.parametrize("path", list(golden.PATHS))
@pytest.mark.parametrize("name", list(golden.OPTIMIZERS))
def test_runs_match_the_golden_record(name, path):
    threads = torch.get_num_threads()
    torch.set_num_threads(golden.THREADS)
    try:
        runs = {"/".join(names): {key: golden._describe(value) for key, value in golden.run(*names).items()}
                for names in golden.run_names() if names[:2] == (name, path)}
    finally:
        torch.set_num_threads(threads)
    differ = []
    for run_name, tensors in runs.items():
        expected = ANY["runs"][run_name]
        assert sorted(tensors) == sorted(expected), run_name
        for key, (digest, *sums) in tensors.items():
            if MINE is not None:
                if digest != expected[key][0]:
                    differ.append(f"{run_name} {key}")
            elif not _close(sums, expected[key][1:]):
                differ.append(f"{run_name} {key}: {sums} vs {expected[key][1:]}")
    how = "bitwise" if MINE is not None else f"summaries at rtol {RTOL} (no hashes for machine {SIGNATURE['key']})"
    assert not differ, f"{len(differ)} tensors differ from the golden record ({how}):\n" + "\n".join(differ[:20])


CHECKPOINTS = sorted(golden.RECORD.parent.glob("checkpoints-*.pt"))
SAVED = {f"{path.stem}:{name}": (saved["signature"], case) for path in CHECKPOINTS
         for saved in [torch.load(path)] for name, case in saved["cases"].items()}


def test_there_are_checkpoints_of_every_storage_format():
    assert {key.split(":")[1] for key in SAVED} == {f"{name}/{storage}" for name in golden.OPTIMIZERS
                                                      for storage in golden.STORAGES}


@pytest.mark.parametrize("key", sorted(SAVED))
def test_a_checkpoint_written_earlier_resumes_as_it_did_then(key):
    # Bit for bit on the machine that wrote it (the fused kernels' sums depend on the CPU), closely elsewhere.
    signature, case = SAVED[key]
    got = golden.resume_checkpoint(key.split(":")[1], case)
    assert sorted(got) == sorted(case["expected"])
    for name, expected in case["expected"].items():
        if signature["key"] == SIGNATURE["key"]:
            assert torch.equal(got[name], expected), name
        elif expected.dtype == torch.uint8:  # 8-bit codes: a value on a boundary may round to its neighbour
            assert (got[name].int() - expected.int()).abs().max() <= 1, name
        else:
            torch.testing.assert_close(got[name].double(), expected.double(), rtol=1e-3, atol=1e-5)
