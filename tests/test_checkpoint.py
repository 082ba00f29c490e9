"""Checkpointer, in one process: a run stopped after a checkpoint and resumed ends bitwise where the run never stopped
(parameters, optimizer state for Lamb, Lars and 8-bit Lamb, scheduler, accumulation, TrustMonitor and NoiseScale
records, random state); an empty directory starts fresh; ``keep`` prunes; a save killed halfway, a truncated file, a
missing ``.metadata`` or manifest and a flipped byte are skipped with a warning naming the checkpoint, and a directory
of damaged checkpoints is never silently restarted; a save mid-accumulation, a save before the first step, a save
beside another run's checkpoints, a model or an object the checkpoint lacks and bad arguments are refused with
messages naming the cause; pruning never deletes a good checkpoint for a damaged one.
(Processes killed under torchrun: tests/test_crash.py.)"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import torchlamb
from torchlamb import checkpoint, quantized

# Without a process group DCP says, on every save and load, that it assumes a single process: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

STEPS = 10  # the uninterrupted run
STOP = 7  # the interrupted run dies after this step, past its last checkpoint (step 6, every 3)
MICRO_BATCHES = 2
BATCH = 4  # examples per micro-batch

OPTIMIZERS = {
    "lamb": lambda params: torchlamb.Lamb(params, lr=0.02, max_grad_norm=0.5),
    "lars": lambda params: torchlamb.Lars(params, lr=1.0, momentum=0.9, trust_coefficient=0.02, max_grad_norm=0.5),
    "lamb-8bit": lambda params: torchlamb.Lamb(params, lr=0.02, state_dtype="8bit"),
}


def make_model() -> nn.Module:
    with torch.random.fork_rng():  # the same weights every time, and the global random state left alone
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def make_run(optimizer: str = "lamb", *, monitor: bool = True, noise: bool = True) -> SimpleNamespace:
    """A model with everything a run checkpoints besides it: optimizer, scheduler, accumulation and telemetry."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    scheduler = torchlamb.warmup_poly(opt, warmup_steps=3, total_steps=STEPS)
    run = SimpleNamespace(model=model, optimizer=opt, scheduler=scheduler,
                          accumulation=torchlamb.GradientAccumulation(opt, MICRO_BATCHES, scheduler=scheduler))
    run.objects = {"accumulation": run.accumulation, "scheduler": scheduler}
    if monitor:
        run.monitor = run.objects["monitor"] = torchlamb.TrustMonitor(model, opt, every=2)
    if noise:
        run.noise = run.objects["noise"] = torchlamb.NoiseScale(model, opt, batch_size=BATCH,
                                                                micro_batches=MICRO_BATCHES, every=2)
    return run


def train_step(run: SimpleNamespace, step: int, seed: int = 1000) -> None:
    """Optimizer step ``step + 1``: its data come from a generator seeded by the step (so a resumed run sees the same
    batches), plus a term from the global generator (so a resume that lost the random state trains on other data)."""
    generator = torch.Generator().manual_seed(seed + step)
    for _ in range(MICRO_BATCHES):
        x = torch.randn(BATCH, 6, generator=generator) + 0.1 * torch.rand(BATCH, 6)
        y = torch.randn(BATCH, 3, generator=generator) + 0.01 * random.random()
        run.accumulation.backward(nn.functional.mse_loss(run.model(x), y))


def checkpointer(directory: Path, run: SimpleNamespace, **options) -> torchlamb.Checkpointer:
    return torchlamb.Checkpointer(directory, run.model, run.optimizer, **options, **run.objects)


def parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), (a, b)


def assert_same(got, expected, where: str = "") -> None:
    """Nested state equal exactly: tensors by dtype and value, floats with NaN equal to NaN."""
    assert type(got) is type(expected), f"{where}: {type(got).__name__} vs {type(expected).__name__}"
    if isinstance(got, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected), f"{where}: {got} vs {expected}"
    elif isinstance(got, dict):
        assert got.keys() == expected.keys(), f"{where}: keys {got.keys()} vs {expected.keys()}"
        for key in got:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(expected), f"{where}: {len(got)} vs {len(expected)} items"
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(got, float) and math.isnan(got):
        assert math.isnan(expected), f"{where}: nan vs {expected}"
    else:
        assert got == expected, f"{where}: {got!r} vs {expected!r}"


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}"


def saved_steps(directory: Path, steps: int, every: int = 1) -> list[list[torch.Tensor]]:
    """Train a plain Lamb run for ``steps`` steps, saving every ``every``; the parameters after each step."""
    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(directory, run, every=every, keep=None)
    history = [parameters(run.model)]
    for step in range(steps):
        train_step(run, step)
        checkpoints.after_step(step + 1)
        history.append(parameters(run.model))
    return history


# -- 1. the round trip -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_run_ends(tmp_path, monkeypatch, optimizer):
    if optimizer == "lamb-8bit":  # every weight of the tiny model keeps 8-bit state (blocks of one row each)
        monkeypatch.setattr(quantized, "MIN_NUMEL", 1)

    def rng_probe() -> tuple[torch.Tensor, float]:
        """Draw from the global generators without moving them: what the next step would draw."""
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        drawn = torch.rand(3), random.random()
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        return drawn

    torch.manual_seed(1)
    random.seed(1)
    expected = make_run(optimizer)
    for step in range(STEPS):
        train_step(expected, step)
        if step + 1 == 6:
            expected_draw = rng_probe()
    if optimizer == "lamb-8bit":  # the state this test checkpoints is the 8-bit one
        assert any(value.dtype in (torch.int8, torch.uint8) for state in expected.optimizer.state.values()
                   for value in state.values() if isinstance(value, torch.Tensor))

    torch.manual_seed(1)
    random.seed(1)
    first = make_run(optimizer)
    checkpoints = checkpointer(tmp_path, first, every=3)
    for step in range(STOP):  # killed after step 7: its progress since step 6 is lost
        train_step(first, step)
        checkpoints.after_step(step + 1, epoch=step)
    assert names(tmp_path) == ["step-000000003", "step-000000006"]

    torch.manual_seed(12345)  # a new process: other random state, everything built anew
    random.seed(12345)
    resumed = make_run(optimizer)
    checkpoints = checkpointer(tmp_path, resumed, every=3)
    start = checkpoints.resume()
    assert start == 6 and resumed.accumulation.steps == 6
    assert checkpoints.extra == {"epoch": 5}
    assert checkpoints.resumed_from == step_dir(tmp_path, 6)
    drawn = rng_probe()
    assert torch.equal(drawn[0], expected_draw[0]) and drawn[1] == expected_draw[1]
    for step in range(start, STEPS):
        train_step(resumed, step)
        checkpoints.after_step(step + 1, epoch=step)

    assert_bitwise(parameters(resumed.model), parameters(expected.model))
    assert_same(resumed.optimizer.state_dict(), expected.optimizer.state_dict(), "optimizer")
    assert_same(resumed.monitor.records, expected.monitor.records, "monitor.records")
    assert_same(resumed.noise.records, expected.noise.records, "noise.records")
    assert len(resumed.monitor.records) == 4 * 6  # steps 1, 2, 4, 6, 8, 10: four tensors each
    assert resumed.scheduler.get_last_lr() == expected.scheduler.get_last_lr()
    assert_same(resumed.scheduler.state_dict(), expected.scheduler.state_dict(), "scheduler")
    assert resumed.accumulation.state_dict() == expected.accumulation.state_dict()
    assert names(tmp_path) == ["step-000000003", "step-000000006", "step-000000009"]


def test_the_random_state_matters_to_the_round_trip(tmp_path):
    """The control for the test above: without the restored random state the resumed run ends elsewhere, so the
    bitwise match there proves the random state was restored (and not merely irrelevant)."""
    torch.manual_seed(1)
    random.seed(1)
    expected = make_run()
    for step in range(STEPS):
        train_step(expected, step)
    first = make_run()
    torch.manual_seed(1)
    random.seed(1)
    checkpoints = checkpointer(tmp_path, first, every=3)
    for step in range(6):
        train_step(first, step)
        checkpoints.after_step(step + 1)
    resumed = make_run()
    start = checkpointer(tmp_path, resumed).resume()
    torch.manual_seed(12345)  # as if the random state had not come back
    for step in range(start, STEPS):
        train_step(resumed, step)
    assert not torch.equal(resumed.model[0].weight, expected.model[0].weight)


# -- 2. a fresh start --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_a_directory_without_checkpoints_starts_fresh_and_changes_nothing(tmp_path, exists):
    directory = tmp_path / "run"
    if exists:
        directory.mkdir()
    run = make_run()
    before = parameters(run.model)
    checkpoints = checkpointer(directory, run)
    assert checkpoints.resume() == 0
    assert checkpoints.extra == {} and checkpoints.resumed_from is None
    assert_bitwise(parameters(run.model), before)
    assert run.optimizer.state_dict()["state"] == {}  # no phantom step initialised the optimizer
    assert run.monitor.step == run.noise.step == 0 and run.monitor.records == run.noise.records == []
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        checkpoints.resume(required=True)
    assert directory.exists() == exists  # resume creates nothing


# -- 3. keep -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,expected", [(2, [4, 5]), (None, [1, 2, 3, 4, 5])])
def test_keep_leaves_only_the_newest_checkpoints(tmp_path, keep, expected):
    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, run, every=1, keep=keep)
    for step in range(5):
        train_step(run, step)
        assert checkpoints.after_step(step + 1) == step_dir(tmp_path, step + 1)
    # Nothing else either: no staging or half-deleted directories.
    assert names(tmp_path) == [step_dir(tmp_path, step).name for step in expected]
    assert [step for step, _ in checkpoints.checkpoints()] == expected


def test_after_step_saves_only_on_multiples_of_every(tmp_path):
    run = make_run(monitor=False, noise=False)
    train_step(run, 0)
    checkpoints = checkpointer(tmp_path, run, every=3)
    assert [checkpoints.after_step(step) for step in range(0, 7)] == [
        None, None, None, step_dir(tmp_path, 3), None, None, step_dir(tmp_path, 6)]
    assert checkpointer(tmp_path / "never", run).after_step(3) is None  # every=None: explicit saves only
    assert not (tmp_path / "never").exists()


# -- 4. a save killed halfway ------------------------------------------------------------------------------------------
class Killed(Exception):
    """The death of the process writing a checkpoint; DCP hands it on wrapped in a CheckpointException."""


def test_a_save_killed_halfway_is_invisible_and_removed_by_the_next_resume(tmp_path, monkeypatch):
    class DyingWriter(checkpoint.FileSystemWriter):
        """Writes its data files, then dies before DCP's .metadata and the manifest."""

        def write_data(self, plan, planner):
            super().write_data(plan, planner).wait()
            raise Killed("the process died while writing the checkpoint")

    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, run, every=1, keep=None)
    history = [parameters(run.model)]
    for step in range(3):
        train_step(run, step)
        if step + 1 == 3:
            with monkeypatch.context() as patch, pytest.raises(CheckpointException, match="the process died"):
                patch.setattr(checkpoint, "FileSystemWriter", DyingWriter)
                checkpoints.after_step(step + 1)
        else:
            checkpoints.after_step(step + 1)
        history.append(parameters(run.model))

    partial = tmp_path / "step-000000003.partial"
    assert any(path.suffix == ".distcp" for path in partial.iterdir())  # the data files were written
    assert not (partial / ".metadata").exists() and not (partial / checkpoint.MANIFEST).exists()
    assert [step for step, _ in checkpoints.checkpoints()] == [1, 2]

    resumed = make_run(monitor=False, noise=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an unfinished save is not a damaged checkpoint
        assert checkpointer(tmp_path, resumed).resume() == 2
    assert_bitwise(parameters(resumed.model), history[2])
    assert names(tmp_path) == ["step-000000001", "step-000000002"]


# -- 5. damaged checkpoints --------------------------------------------------------------------------------------------
def data_file(path: Path) -> Path:
    (found,) = path.glob("*.distcp")  # one process: one data file
    return found


def truncate(path: Path) -> None:
    file = data_file(path)
    with file.open("r+b") as handle:
        handle.truncate(file.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    file = data_file(path)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (truncate, "has .* bytes, the manifest says"),
    "no-metadata": (lambda path: (path / ".metadata").unlink(), ".metadata is missing"),
    "no-manifest": (lambda path: (path / checkpoint.MANIFEST).unlink(), "save did not finish"),
    "flipped-byte": (flip_a_byte, "does not match its SHA-256"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_used(tmp_path, kind):
    spoil, reason = DAMAGE[kind]
    history = saved_steps(tmp_path, 2)
    spoil(step_dir(tmp_path, 2))
    resumed = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, resumed)
    with pytest.warns(RuntimeWarning, match=f"step-000000002: .*{reason}"):
        assert checkpoints.resume() == 1
    assert checkpoints.resumed_from == step_dir(tmp_path, 1)
    assert_bitwise(parameters(resumed.model), history[1])
    assert not torch.equal(history[1][0], history[2][0])  # the two checkpoints do differ


def test_a_flipped_byte_passes_the_size_check_and_only_the_checksum_catches_it(tmp_path):
    saved_steps(tmp_path, 1)
    path = step_dir(tmp_path, 1)
    flip_a_byte(path)
    assert checkpoint.damage(path, checksums=False) is None
    assert "SHA-256" in checkpoint.damage(path)


def test_a_checkpoint_saved_without_checksums_is_checked_by_size(tmp_path):
    run = make_run(monitor=False, noise=False)
    train_step(run, 0)
    path = checkpointer(tmp_path, run, checksums=False).save(1)
    assert checkpoint.damage(path) is None  # its manifest has sizes only
    truncate(path)
    assert "bytes, the manifest says" in checkpoint.damage(path)


@pytest.mark.parametrize("kind", ["truncated", "no-manifest"])
def test_a_directory_of_damaged_checkpoints_raises_instead_of_starting_fresh(tmp_path, kind):
    spoil, _ = DAMAGE[kind]
    saved_steps(tmp_path, 2)
    for step in (1, 2):
        spoil(step_dir(tmp_path, step))
    resumed = make_run(monitor=False, noise=False)
    before = parameters(resumed.model)
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(RuntimeError, match="refusing to start from scratch"):
        checkpointer(tmp_path, resumed).resume()
    skipped = [str(warning.message) for warning in caught if "skipping damaged" in str(warning.message)]
    assert len(skipped) == 2 and "step-000000002" in skipped[0] and "step-000000001" in skipped[1]
    assert_bitwise(parameters(resumed.model), before)
    assert names(tmp_path) == ["step-000000001", "step-000000002"]  # nothing deleted: the user decides


# -- 6. a save mid-accumulation ----------------------------------------------------------------------------------------
def test_saving_while_micro_batches_are_accumulated_raises_and_writes_nothing(tmp_path):
    run = make_run(monitor=False, noise=False)
    x, y = torch.randn(BATCH, 6), torch.randn(BATCH, 3)
    run.accumulation.backward(nn.functional.mse_loss(run.model(x), y))  # one of two micro-batches
    checkpoints = checkpointer(tmp_path / "run", run, every=1)
    with pytest.raises(RuntimeError, match="accumulation holds 1 micro-batch"):
        checkpoints.save(1)
    with pytest.raises(RuntimeError, match="accumulation holds 1 micro-batch"):
        checkpoints.after_step(1)
    assert not (tmp_path / "run").exists()


# -- 7. another run's checkpoints --------------------------------------------------------------------------------------
def test_a_run_that_did_not_resume_may_not_save_beside_another_runs_checkpoints(tmp_path):
    saved_steps(tmp_path, 5, every=5)
    run = make_run(monitor=False, noise=False)
    train_step(run, 0)
    fresh = checkpointer(tmp_path, run)
    for step in (3, 5, 7):  # behind it, over it, past it (pruning would then delete it)
        with pytest.raises(ValueError, match=r"already holds step-000000005, of another run.*call resume\(\)"):
            fresh.save(step)
    assert names(tmp_path) == ["step-000000005"]

    resumed = checkpointer(tmp_path, run)
    assert resumed.resume() == 5
    train_step(run, 5)
    assert resumed.save(6) == step_dir(tmp_path, 6)
    assert names(tmp_path) == ["step-000000005", "step-000000006"]


# -- 8. a checkpoint of another run's model or objects -----------------------------------------------------------------
def test_resuming_with_a_model_the_checkpoint_lacks_names_the_missing_key(tmp_path):
    saved_steps(tmp_path, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    before = parameters(model)
    checkpoints = torchlamb.Checkpointer(tmp_path, model, torchlamb.Lamb(model.parameters()))
    with pytest.raises(ValueError, match=r"does not match this run: it has no model\.4\.weight, model\.4\.bias"):
        checkpoints.resume()
    assert_bitwise(parameters(model), before)
    assert checkpoints.resumed_from is None


def test_resuming_with_other_shapes_fails_in_dcp_naming_the_tensor(tmp_path):
    # Same names, other shapes: Checkpointer's own check passes and DCP's planner refuses. DCP raises a
    # CheckpointException, a BaseException (not caught by ``except Exception``), whose text names the tensor.
    saved_steps(tmp_path, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    before = parameters(model)
    optimizer = torchlamb.Lamb(model.parameters())
    monitor = torchlamb.TrustMonitor(model, optimizer)
    with pytest.raises(CheckpointException, match=r"Size mismatch .* for model\.0\.weight"):
        torchlamb.Checkpointer(tmp_path, model, optimizer).resume()
    assert_bitwise(parameters(model), before)
    # The load template's step at lr 0 (DCP's get_state_dict) left no state behind, and no hook saw it.
    assert not optimizer.state and monitor.step == 0 and not monitor.records


def test_resuming_with_an_object_the_checkpoint_lacks_names_it(tmp_path):
    saved_steps(tmp_path, 1)  # saved with an accumulation and a scheduler only
    run = make_run()
    with pytest.raises(ValueError, match=r"it has no objects\.monitor, objects\.noise"):
        checkpointer(tmp_path, run).resume()


# -- 9. bad arguments --------------------------------------------------------------------------------------------------
def test_bad_arguments_are_named(tmp_path):
    model = make_model()
    optimizer = torchlamb.Lamb(model.parameters())
    for options, error, message in [
        (dict(every=0), ValueError, "every must be an int >= 1, got 0"),
        (dict(every=True), ValueError, "every must be an int >= 1, got True"),
        (dict(keep=0), ValueError, "keep must be an int >= 1, got 0"),
        (dict(keep=2.0), ValueError, "keep must be an int >= 1, got 2.0"),
        (dict(data=object()), TypeError, "data=object has no state_dict/load_state_dict"),
        (dict(scheduler=[1, 2]), TypeError, "scheduler=list has no state_dict"),
    ]:
        with pytest.raises(error, match=message):
            torchlamb.Checkpointer(tmp_path, model, optimizer, **options)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        torchlamb.Checkpointer(tmp_path, model.state_dict(), optimizer)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        torchlamb.Checkpointer(tmp_path, model, list(model.parameters()))
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        torchlamb.Checkpointer(tmp_path, model, optimizer).save(-1)
    assert list(tmp_path.iterdir()) == []


# -- 10. TrustMonitor's state ------------------------------------------------------------------------------------------
def test_trust_monitor_state_round_trips_and_goes_on_recording_at_its_steps():
    run = make_run(noise=False)
    for step in range(3):
        train_step(run, step)
    state = run.monitor.state_dict()
    assert state["every"] == 2 and state["step"] == 3 and len(state["records"]) == 4 * 2  # steps 1 and 2

    other = make_run(noise=False)
    other.monitor.load_state_dict(state)
    assert other.monitor.step == 3 and other.monitor.records == run.monitor.records
    state["records"].clear()  # the monitor keeps its own copy
    assert len(other.monitor.records) == 8
    train_step(other, 3)  # step 4: a record step of every=2, counted from the loaded step
    assert [row["step"] for row in other.monitor.records] == [1] * 4 + [2] * 4 + [4] * 4


def test_trust_monitor_refuses_the_state_of_another_every():
    run = make_run(noise=False)
    train_step(run, 0)
    other = torchlamb.TrustMonitor(run.model, run.optimizer, every=3)
    with pytest.raises(ValueError, match="records every 2 steps, this monitor every 3"):
        other.load_state_dict(run.monitor.state_dict())
    assert other.step == 0 and other.records == []


# -- 11. replacing a damaged checkpoint --------------------------------------------------------------------------------
def test_a_save_replaces_a_damaged_checkpoint_of_the_same_step(tmp_path):
    saved_steps(tmp_path, 2)
    truncate(step_dir(tmp_path, 2))
    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, run, keep=None)
    with pytest.warns(RuntimeWarning, match="step-000000002"):
        assert checkpoints.resume() == 1
    train_step(run, 1, seed=2000)  # other data than the damaged checkpoint's run saw
    replacement = parameters(run.model)
    assert checkpoints.save(2) == step_dir(tmp_path, 2)
    assert checkpoint.damage(step_dir(tmp_path, 2)) is None

    again = make_run(monitor=False, noise=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing damaged is left to skip
        assert checkpointer(tmp_path, again).resume() == 2
    assert_bitwise(parameters(again.model), replacement)


def test_a_damaged_newer_checkpoint_that_resume_skipped_does_not_block_saves(tmp_path):
    # A truncated step 3 still has its manifest; only resume's skipping it tells it from another run's checkpoint.
    saved_steps(tmp_path, 3)
    truncate(step_dir(tmp_path, 3))
    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, run, keep=None)
    with pytest.warns(RuntimeWarning, match="step-000000003"):
        assert checkpoints.resume() == 2
    assert checkpoints.save(2) == step_dir(tmp_path, 2)
    train_step(run, 2)
    assert checkpoints.save(3) == step_dir(tmp_path, 3)
    assert [checkpoint.damage(path) for _, path in checkpoints.checkpoints()] == [None, None, None]


# -- 12. no checkpoint before the first step; pruning keeps what it just saved ----------------------------------------
def test_saving_before_the_first_step_is_refused_and_changes_nothing(tmp_path):
    # DCP's get_state_dict would fill the empty optimizer by one step at lr 0 (Lamb's step count 1, a phantom step
    # in TrustMonitor and NoiseScale); and a run killed before its first checkpoint starts over anyway.
    torch.manual_seed(1)
    random.seed(1)
    expected = make_run()
    for step in range(3):
        train_step(expected, step)
    torch.manual_seed(1)
    random.seed(1)
    run = make_run()
    with pytest.raises(ValueError, match="has taken no step yet"):
        checkpointer(tmp_path, run).save(0)
    assert run.optimizer.state_dict()["state"] == {} and run.monitor.step == run.noise.step == 0
    assert not tmp_path.exists() or names(tmp_path) == []
    for step in range(3):
        train_step(run, step)
    assert_bitwise(parameters(run.model), parameters(expected.model))


def test_pruning_never_deletes_the_checkpoint_just_saved_for_a_damaged_one(tmp_path):
    saved_steps(tmp_path, 4, every=2)
    truncate(step_dir(tmp_path, 4))
    run = make_run(monitor=False, noise=False)
    checkpoints = checkpointer(tmp_path, run, keep=1)
    with pytest.warns(RuntimeWarning, match="step-000000004"):
        assert checkpoints.resume() == 2
    train_step(run, 2)
    assert checkpoints.save(3).is_dir()
