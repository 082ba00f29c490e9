"""How a parameter's state is stored, and what the update works on.

- **State dtypes.** Moments (or momentum buffers) are stored in ``state_dtype`` (None: the computing dtype) and the
  update computes in the parameter's dtype, or float32 under master weights. Where the two differ, the torch paths
  get a working copy in the computing dtype that is written back when the step ends (:class:`StepScratch`); the
  fused kernels read and write bfloat16/float16 state of float32 tensors in place.
- **8-bit state.** ``state_dtype="8bit"`` keeps the state of tensors that :func:`torchlamb.quantized.quantizes`
  as codes and block scales (:class:`torchlamb.quantized.QuantizedKey`); a group's parameters are split by storage
  for their paths (:func:`by_storage`) and their pending updates merged back (:func:`merged`).
- **Master weights.** A float16/bfloat16 parameter of a group with ``master_weights=True`` has a float32 copy in its
  state; the update works on it (:func:`targets`) and the parameter is written from it when the step ends (by the
  Triton kernels themselves, :func:`copies_in_kernel`, or :meth:`StepScratch.finish`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed, quantized
from ._gradients import LOW_PRECISION, real
from .trust import PendingUpdate


@dataclass
class StepScratch:
    """What one ``step()`` has to put back when it ends, filled while the groups' updates are prepared.

    ``write_backs``: (stored state, working copy) pairs of state kept in another dtype than the update computes in;
    ``written_in_kernel``: ids of parameters the Triton kernels wrote from their masters (not copied again).
    """

    write_backs: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    written_in_kernel: set[int] = field(default_factory=set)

    def finish(self, state: Mapping[Tensor, dict[str, Any]], params: list[Tensor]) -> None:
        """θ ← master (rounded to θ's dtype) for the parameters with a master copy that no kernel wrote, then the
        working copies of state into their stored dtype."""
        for param in params:
            master = state[param].get("master")
            if master is not None and id(param) not in self.written_in_kernel:
                distributed.local([param])[0].copy_(distributed.local([master])[0])
        for stored, working in self.write_backs:
            stored.copy_(working)
        self.write_backs.clear()


def has_master(group: dict[str, Any], param: Tensor) -> bool:
    return bool(group["master_weights"]) and param.dtype in LOW_PRECISION


def stores_8bit(group: dict[str, Any], param: Tensor) -> bool:
    """Whether ``param``'s state is kept in 8 bits: ``state_dtype="8bit"`` and a real floating tensor of at least
    ``torchlamb.quantized.MIN_NUMEL`` elements (smaller ones keep it in float)."""
    return group["state_dtype"] == "8bit" and quantized.quantizes(param)


def compute_dtype(param_state: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype the update of ``param`` computes in: float32 with a master copy, else the parameter's (the real
    dtype of a complex one)."""
    if "master" in param_state:
        return torch.float32
    return param.real.dtype if param.is_complex() else param.dtype


def state_dtype(group: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype ``param``'s moments or buffers are stored in, where they are not stored in 8 bits."""
    if group["state_dtype"] not in (None, "8bit"):
        return group["state_dtype"] if not param.is_complex() else param.dtype
    return torch.float32 if has_master(group, param) else param.dtype


def fused_reads_state(group: dict[str, Any], param_state: dict[str, Any], param: Tensor) -> bool:
    """Whether the fused kernels take ``param``'s state as stored: in the computing dtype, bfloat16/float16 beside
    float32 (read and written in place), or in 8 bits."""
    if group["state_dtype"] is None or stores_8bit(group, param):
        return True
    stored, computed = state_dtype(group, param), compute_dtype(param_state, param)
    return stored == computed or (computed == torch.float32 and stored in LOW_PRECISION)


def initial_state(optimizer_name: str, group: dict[str, Any], param: Tensor, label: str,
                  quantized_keys: tuple[quantized.QuantizedKey, ...],
                  new_state: Callable[[Tensor, torch.dtype], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The state of a parameter before its first step: step 0, zero moments or buffers (``new_state``, or their
    8-bit codes and scales), and the master copy."""
    state = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
    if stores_8bit(group, param):
        # Sharded (FSDP2): codes and scales are DTensors placed as the parameter, each process holding those of
        # its rows. Blocks lie within rows (torchlamb.quantized), so only the first dimension may be split.
        if not distributed.shards_only_rows(param):
            raise ValueError(f"{optimizer_name}(state_dtype='8bit'): {label} is split along a dimension "
                             f"other than its first ({param.placements}); 8-bit blocks lie within rows, so "
                             "only the first dimension may be sharded (as FSDP2 does). Use "
                             "state_dtype=torch.bfloat16 for this model")
        local = distributed.local([param])[0]
        for key in quantized_keys:
            for name, value in key.zeros(local).items():
                state[name] = distributed.placed_like(value, param, key.global_shape(name, param.shape))
    else:
        state.update(new_state(param, state_dtype(group, param)))
    if has_master(group, param):
        state["master"] = param.detach().to(torch.float32, copy=True)
    return state


def states_of(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor], key: str, scratch: StepScratch,
              as_stored: bool = False) -> list[Tensor]:
    """This process's part of state ``key`` of each parameter (``params`` as the optimizer holds them), complex
    state as real views. State stored in another dtype than the update computes in comes as a working copy in the
    computing dtype, which ``scratch`` writes back when the step ends — unless ``as_stored`` (for the fused
    kernels, which read and write bfloat16/float16 state themselves)."""
    states = real([state[p][key] for p in params])
    if key == "step" or as_stored:
        return states
    working = []
    for param, stored in zip(params, states):
        dtype = compute_dtype(state[param], param)
        if stored.dtype == dtype:
            working.append(stored)
        else:
            copy = stored.to(dtype)
            scratch.write_backs.append((stored, copy))
            working.append(copy)
    return working


def local_states(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor]) -> list[dict[str, Tensor]]:
    """Each parameter's state with this process's part of each tensor (a DTensor's local shard is a view: writes
    reach the DTensor)."""
    return [{key: distributed.local([value])[0] for key, value in state[p].items()} for p in params]


def targets(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor],
            grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """What the update works on: this process's part of each parameter, or of its float32 master copy under
    master weights, and the gradients in the same dtype. A complex tensor is seen as real pairs
    (``torch.view_as_real``): its norm is that of its real and imaginary parts together, and its moments are
    per part, as torch's Adam does."""
    working, working_grads = [], []
    for param, grad in zip(params, grads):
        master = state[param].get("master")
        target = param if master is None else master
        working.append(target)
        working_grads.append(grad if grad.dtype == target.dtype else grad.to(target.dtype))
    return real(working), real(working_grads)


def copies_in_kernel(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor],
                     scratch: StepScratch) -> list[Tensor | None]:
    """For the Triton kernels, which write a low-precision parameter from its float32 master in pass 2 (rounded
    to nearest even): this process's part of each parameter that has a master, None for the others. Those
    parameters are then not copied again when the step ends."""
    copies = []
    for param in params:
        has_copy = "master" in state[param]
        if has_copy:
            scratch.written_in_kernel.add(id(param))
        copies.append(distributed.local([param])[0] if has_copy else None)
    return copies


def by_storage(group: dict[str, Any], *columns: list[Tensor]) -> list[tuple[bool, list[int], list[list[Tensor]]]]:
    """The parameters split by how their state is stored: [(in 8 bits, their positions, each of ``columns`` at
    those positions)] for the float and the 8-bit ones present (``columns[0]``: the parameters)."""
    eight_bit = [stores_8bit(group, p) for p in columns[0]]
    parts = []
    for wanted in (False, True):
        positions = [i for i, is_8bit in enumerate(eight_bit) if is_8bit == wanted]
        if positions:
            parts.append((wanted, positions, [[column[i] for i in positions] for column in columns]))
    return parts


@functools.lru_cache(maxsize=64)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """Positions as an index tensor on ``device``, made once: copying a host list to a GPU every step would wait."""
    return torch.tensor(positions, dtype=torch.int64, device=device)


def merged(n: int, parts: list[tuple[list[int], PendingUpdate]]) -> PendingUpdate:
    """One PendingUpdate of ``n`` tensors from those of some of them: ``parts`` holds (their positions, theirs)."""
    if len(parts) == 1:
        return parts[0][1]
    first_squares = parts[0][1].squares
    squares = first_squares.new_zeros(n, first_squares.shape[1])
    indices = [_index(tuple(positions), squares.device) for positions, _ in parts]
    for index, (_, part) in zip(indices, parts):
        squares[index] = part.squares.to(squares.device)

    def apply(ratio: Tensor) -> None:
        for index, (_, part) in zip(indices, parts):
            part.apply(ratio[index.to(ratio.device)])

    complete = None
    if parts[0][1].complete is not None:  # the parts of one group share its options: all complete, or none
        def complete(whole: Tensor) -> Tensor:
            done = [(index, part.complete(whole[index.to(whole.device)])) for index, (_, part) in zip(indices, parts)]
            result = whole.new_zeros(n, done[0][1].shape[1])
            for index, part_squares in done:
                result[index.to(whole.device)] = part_squares
            return result

    return PendingUpdate(squares, apply, complete)


def merged_stats(n: int, parts: list[tuple[list[int], tuple[Tensor, Tensor, Tensor]]]) -> tuple[Tensor, Tensor, Tensor]:
    """(‖θ‖, the ratio's denominator, r) of ``n`` tensors from those of some of them, as :func:`merged`."""
    if len(parts) == 1:
        return parts[0][1]
    columns = parts[0][1][0].new_zeros(3, n)
    for positions, stats in parts:
        columns[:, positions] = torch.stack(stats)
    weight_norm, update_norm, ratio = columns.unbind(0)
    return weight_norm, update_norm, ratio
