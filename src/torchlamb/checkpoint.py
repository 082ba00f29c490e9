"""Checkpoints that survive a crash: save every N steps, keep the newest k, resume from the newest complete one.

A killed process (preempted node, OOM kill, cancelled job) must cost nothing but the steps since the last
checkpoint. :class:`Checkpointer` saves, with ``torch.distributed.checkpoint`` (DCP), everything a run needs to go on
exactly where it stopped: the model and the optimizer (sharded under FSDP2: each process writes its shards; float,
bf16 or 8-bit state and master weights alike), any other object with ``state_dict``/``load_state_dict`` (scheduler,
:class:`~torchlamb.GradientAccumulation`, :class:`~torchlamb.noise_scale.NoiseScale`, :class:`~torchlamb.TrustMonitor`,
:class:`~torchlamb.BatchRamp`, a GradScaler), the step, where the data stands, and each process's random number
generators. ::

    checkpoints = torchlamb.Checkpointer("ckpt", model, optimizer, every=500, scheduler=scheduler)
    start = checkpoints.resume()                  # 0 in an empty directory, else the step of the newest checkpoint
    for step in range(start, total_steps):
        ...                                       # forward, backward, optimizer.step(), scheduler.step()
        checkpoints.after_step(step + 1)          # saves after every 500th step

The directory holds one subdirectory per checkpoint, ``step-000000500``. How a crash at any moment is survived:

* **Visible only when complete.** A save writes into ``step-….partial``; when every process has written its files
  and DCP its ``.metadata``, process 0 writes a manifest (each file's size and SHA-256) and renames the directory to
  its final name. A save killed halfway leaves a ``.partial`` directory, which no resume reads and the next resume
  removes.
* **Damaged checkpoints are skipped.** Resuming checks the newest checkpoint's files against its manifest (missing
  or truncated file, missing ``.metadata``, missing manifest); a damaged one is skipped with a warning naming it and
  the previous one is tried. If the directory holds checkpoints and none is usable, resuming raises: a run is
  never silently restarted from scratch. An empty directory (a run killed before its first save) starts fresh.
* **Exact.** The state is saved between optimizer steps, so nothing of an unfinished step (accumulated micro-batch
  gradients) is lost or counted twice; saving while a GradientAccumulation holds micro-batches raises. Resumed at
  the same number of processes, a run ends with bitwise the parameters of the run that was never interrupted (tested
  under ``torchrun --max-restarts`` with workers killed before, between and during saves). At another number of
  processes DCP reshards the model and optimizer; the parameters then agree to rounding (each process sums another
  share of the batch), and processes the checkpoint had no random state for keep their own (a warning says so).

Every process must call ``save``/``after_step`` and ``resume`` at the same steps (they are collective), and the
directory must be one every process sees (a shared filesystem across machines). Saves are synchronous: the step
waits for the files (DCP's ``async_save`` could overlap them with training; not provided here).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ._validation import check_count
from .accumulate import GradientAccumulation

try:  # torch.distributed is absent from some builds (e.g. some macOS wheels)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None

MANIFEST = "torchlamb-manifest.json"  # written last, inside the checkpoint: its presence marks the save complete
_NAME = re.compile(r"step-(\d+)")  # a checkpoint's directory; staging and deleting ones carry a suffix
_PARTIAL, _DELETING = ".partial", ".deleting"


class Stateful(Protocol):
    """What :class:`Checkpointer` saves beside the model and the optimizer: anything with these two methods."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Checkpointer:
    """Save a training run every ``every`` steps into ``directory``, keep the newest ``keep``, and resume it.

    Args:
        directory: where the checkpoints go (created if missing); one directory per run.
        model: the model (plain, DDP or FSDP2).
        optimizer: its optimizer (any ``torch.optim.Optimizer``).
        every: :meth:`after_step` saves when the step is a multiple of it; None: only explicit :meth:`save` calls.
        keep: how many checkpoints to keep (older ones are deleted after each save); None keeps all.
        checksums: record and check each file's SHA-256 (else sizes only: faster for very large checkpoints).
        process_group: the processes that share the checkpoint (default: all).
        **objects: anything else with ``state_dict``/``load_state_dict``, saved under its keyword (from process 0:
            they must be the same on every process, as schedulers and torchlamb's telemetry are) and loaded in the
            order given (put a BatchRamp before the accumulation and the NoiseScale it resizes).

    Attributes:
        extra: the keyword arguments passed to the :meth:`save` that wrote the checkpoint :meth:`resume` loaded
            (a data loader's position, an epoch), ``{}`` after a fresh start.
        resumed_from: the directory :meth:`resume` loaded, or None.
    """

    def __init__(self, directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 every: int | None = None, keep: int | None = 3, checksums: bool = True,
                 process_group: Any = None, **objects: Stateful) -> None:
        if dist is None:  # pragma: no cover - depends on the torch build
            raise RuntimeError("Checkpointer needs torch.distributed (torch.distributed.checkpoint)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if every is not None:
            check_count("every", every)
        if keep is not None:
            check_count("keep", keep)
        for name, value in objects.items():
            if not (callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))):
                raise TypeError(f"{name}={type(value).__name__} has no state_dict/load_state_dict to checkpoint")
        self.directory = Path(directory)
        self.model, self.optimizer, self.objects = model, optimizer, objects
        self.every, self.keep, self.checksums, self.process_group = every, keep, checksums, process_group
        self.extra: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self._resumed = False  # resume() was called: the checkpoints found here are this run's
        self._written: set[Path] = set()  # the checkpoints this Checkpointer saved
        self._skipped: set[Path] = set()  # damaged checkpoints latest() passed over: neither kept nor resumed

    # -- where this process stands -----------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return dist.is_initialized()

    def _rank(self) -> int:
        return dist.get_rank(self.process_group) if self._distributed() else 0

    def _from_rank0(self, value: Any) -> Any:
        """Process 0's ``value`` on every process (a decision only process 0 makes, about files it read)."""
        if not self._distributed():
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.process_group, 0)
                                   if self.process_group is not None else 0, group=self.process_group)
        return box[0]

    # -- saving ------------------------------------------------------------------------------------------------------
    def after_step(self, step: int, **extra: Any) -> Path | None:
        """Call after each optimizer step with the number of steps taken: saves (and returns the checkpoint's path)
        when ``every`` divides ``step``."""
        if self.every is not None and step > 0 and step % self.every == 0:
            return self.save(step, **extra)
        return None

    def save(self, step: int, **extra: Any) -> Path:
        """Save the run after ``step`` optimizer steps as ``step-<step>``; ``extra`` (picklable) comes back as
        :attr:`extra` on resume. Collective: every process calls it. Returns the checkpoint's path.

        Raises ValueError before the optimizer's first step (there is no state yet) and when the directory holds
        checkpoints of another run (this Checkpointer neither wrote them nor called :meth:`resume`), RuntimeError
        while a GradientAccumulation holds micro-batches of an unfinished step; nothing is written then."""
        check_count("step", step, low=0)
        for name, value in self.objects.items():
            if isinstance(value, GradientAccumulation) and value.count:
                raise RuntimeError(f"Checkpointer.save: {name} holds {value.count} micro-batch(es) of an unfinished "
                                   "step, which a checkpoint does not keep; save right after an optimizer step")
        if not self.optimizer.state:
            raise ValueError(f"Checkpointer.save(step={step}): the optimizer has taken no step yet, so there is no "
                             "state to save (a run killed before its first checkpoint starts again from its "
                             "initialisation)")
        final = self.directory / f"step-{step:09d}"
        staging = final.with_name(final.name + _PARTIAL)
        problem = None
        if self._rank() == 0:
            problem = self._foreign(step)
            if problem is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                _remove(staging)  # left by a save of this step that was killed
        problem = self._from_rank0(problem)  # also keeps the others from writing before the staging is clean
        if problem is not None:
            raise ValueError(problem)

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state,
                                 "rng": {f"rank{self._rank()}": _pack(rng_state())}}
        if self._rank() == 0:
            state["progress"] = _pack({"step": step, "extra": extra})
            state["objects"] = {name: _pack(value.state_dict()) for name, value in self.objects.items()}
        dcp.save(state, storage_writer=FileSystemWriter(staging), process_group=self.process_group,
                 no_dist=not self._distributed())

        if self._rank() == 0:  # every process has written its files and DCP its .metadata: commit
            world = dist.get_world_size(self.process_group) if self._distributed() else 1
            write_manifest(staging, {"step": step, "world_size": world}, checksums=self.checksums)
            if final.exists():  # an earlier save of this step: the one resumed from, or a damaged one skipped
                _remove(final)
            os.replace(staging, final)
            _fsync_directory(self.directory)
            self._written.add(final)
            self._prune()
        self._from_rank0(None)  # the checkpoint is visible to everyone when save returns
        return final

    def _foreign(self, step: int) -> str | None:
        """Why saving here would be wrong: the directory holds another run's checkpoints (this one did not resume
        from them: saving would mix the two runs, and pruning would delete theirs), else None."""
        if self._resumed:
            return None
        others = [path for _, path in self.checkpoints() if (path / MANIFEST).is_file() and path not in self._written]
        if not others:
            return None
        return (f"Checkpointer.save(step={step}): {self.directory} already holds {others[-1].name}, of another run; "
                "call resume() to continue it, or give this run an empty directory")

    def _prune(self) -> None:
        if self.keep is None:
            return
        # Damaged checkpoints resume() skipped are not among the kept: they would push out good ones.
        complete = [path for _, path in self.checkpoints() if (path / MANIFEST).is_file() and path not in self._skipped]
        for path in complete[:-self.keep]:
            _remove(path)

    # -- finding and resuming -----------------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """The checkpoint directories (complete or damaged, not the ``.partial`` ones), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.directory.iterdir()
                 if path.is_dir() and (match := _NAME.fullmatch(path.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, checked against its manifest; damaged ones are skipped with a warning.
        Reads files on this process only."""
        for _, path in reversed(self.checkpoints()):
            reason = damage(path, checksums=self.checksums)
            if reason is None:
                return path
            warnings.warn(f"skipping damaged checkpoint {path}: {reason}; trying the one before it", RuntimeWarning,
                          stacklevel=2)
            self._skipped.add(path)
        return None

    def resume(self, required: bool = False) -> int:
        """Load the newest complete checkpoint into the model, the optimizer and the objects, restore each
        process's random number generators, and return its step (where training goes on). Returns 0 and changes
        nothing when the directory holds no checkpoint (unless ``required``: then ValueError). Raises RuntimeError
        when it holds checkpoints and none is usable. Collective: every process calls it."""
        self._resumed = True
        choice: tuple[str | None, int] = (None, 0)
        if self._rank() == 0:
            for leftover in self.directory.iterdir() if self.directory.is_dir() else []:
                if leftover.name.endswith((_PARTIAL, _DELETING)):
                    _remove(leftover)  # a save or a deletion killed halfway
            latest = self.latest()
            choice = (str(latest) if latest else None, len(self.checkpoints()))
        path, found = self._from_rank0(choice)
        if path is None and found:
            raise RuntimeError(f"{self.directory} holds {found} checkpoint(s) and none is complete (see the warnings "
                               "on process 0); refusing to start from scratch: move them away to do that")
        if path is None:
            if required:
                raise ValueError(f"no checkpoint to resume in {self.directory}")
            self.extra, self.resumed_from = {}, None
            return 0
        return self._load(Path(path))

    def _load(self, path: Path) -> int:
        saved = FileSystemReader(path).read_metadata().state_dict_metadata.keys()
        missing = [f"model.{key}" for key in get_model_state_dict(self.model) if f"model.{key}" not in saved]
        missing += [f"objects.{name}" for name in self.objects if f"objects.{name}" not in saved]
        if missing:
            raise ValueError(f"checkpoint {path} does not match this run: it has no {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        fresh = not self.optimizer.state
        try:
            model_state, optimizer_state = self._state_dicts()
            rng_key = f"rank{self._rank()}"
            state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state, "progress": b"",
                                     "objects": {name: b"" for name in self.objects}}
            if f"rng.{rng_key}" in saved:
                state["rng"] = {rng_key: b""}
            dcp.load(state, storage_reader=FileSystemReader(path), process_group=self.process_group,
                     no_dist=not self._distributed())
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            for name, value in self.objects.items():
                value.load_state_dict(_unpack(state["objects"][name]))
        except BaseException:
            if fresh:  # undo the state _state_dicts created; a model DCP loaded part of stays as it is
                self.optimizer.state.clear()
            raise
        if "rng" in state:
            set_rng_state(_unpack(state["rng"][rng_key]))
        else:
            warnings.warn(f"checkpoint {path} has no random state for process {self._rank()} (it was saved by fewer "
                          "processes): this process keeps its own", RuntimeWarning, stacklevel=3)
        progress = _unpack(state["progress"])
        self.extra, self.resumed_from = progress["extra"], path
        return progress["step"]

    def _state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``get_state_dict(model, optimizer)`` without firing the optimizer's step hooks: torch fills an empty
        optimizer's state by one step at lr 0 on zero gradients, which TrustMonitor and NoiseScale would count."""
        optimizer = self.optimizer
        hooks = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
        optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
        try:
            return get_state_dict(self.model, optimizer)
        finally:
            optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = hooks


# -- the manifest ----------------------------------------------------------------------------------------------------
def write_manifest(directory: Path, info: dict[str, Any], checksums: bool = True) -> None:
    """Write the manifest of ``directory``'s files (size, SHA-256) and ``info``; flushed to disk before returning."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        files[path.name] = {"bytes": path.stat().st_size, **({"sha256": _sha256(path)} if checksums else {})}
    manifest = directory / MANIFEST
    with manifest.open("w", encoding="utf-8") as file:
        json.dump({**info, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def damage(directory: Path, checksums: bool = True) -> str | None:
    """Why ``directory`` is not a complete checkpoint (missing manifest, missing or truncated file, wrong
    checksum), or None when it is."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if ".metadata" not in files:
        return "its manifest lists no .metadata"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if checksums and "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    """Delete a directory so that no crash leaves it half deleted under a checkpoint's name: rename, then delete."""
    if not path.exists():
        return
    doomed = path if path.name.endswith(_DELETING) else path.with_name(path.name + _DELETING)
    if doomed != path:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; Windows has no directory handles to flush)."""
    if os.name != "posix":  # pragma: no cover - platform
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# -- random state and packing ----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random number generators: torch's CPU generator, CUDA's (if initialised), Python's, and
    NumPy's global one if NumPy is loaded."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if (numpy := sys.modules.get("numpy")) is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where this process has as many devices)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and (numpy := sys.modules.get("numpy")) is not None:
        numpy.random.set_state(state["numpy"])


def _pack(value: Any) -> bytes:
    """``value`` as one opaque item for DCP, which would otherwise split nested dicts and lists into one entry each
    (and could then load a list only into a template of the same length, as records are not)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    # Our own file, written by _pack (as DCP itself loads its pickled entries): not weights-only.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
