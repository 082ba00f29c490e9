"""A group's fused-step arguments, kept from one step to the next while they still hold.

With many small tensors the fused CPU step's time is mostly Python gathering its lists: each parameter's state
looked up, its storage and dtypes checked, its local and real views taken -- several microseconds per tensor,
every step (2000 tensors of 4096 values: ~12 ms of Python around an ~9 ms kernel call), for lists that change
only when the model or the optimizer does. A :class:`FusedPlan` keeps the lists of one group's fused whole step.

It is reused only while it still describes the optimizer exactly (:meth:`FusedPlan.holds`): the same parameters
have gradients, in the same order, dtype, device and layout; each holds the very same state tensors (checked by
identity, so ``load_state_dict``, state replaced, cleared or converted all end it); the group's options that
choose the path and the storage are unchanged. It is made only for plain tensors (no DTensor, no complex
parameter, no master copy, no working copy of state): the case where nothing per tensor is derived from the
gradients. The gradients and every numeric option (lr, betas, ...) are read afresh each step.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed
from ._dispatch import Path

# The group options that decide the implementation and how state is stored.
_PLAN_OPTIONS = ("fused", "foreach", "state_dtype", "master_weights")


def plan_options(group: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(group[name] for name in _PLAN_OPTIONS)


def _state_values(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor]) -> list[Any]:
    return [value for param in params for value in state[param].values()]


def _dtypes(params: list[Tensor]) -> list[torch.dtype]:
    return [p.dtype for p in params]


def _on_cpu_contiguous(params: list[Tensor]) -> bool:
    # No tuple per tensor: thousands of new containers each step would set off Python's garbage collector.
    return all(p.is_cpu and p.is_contiguous() for p in params)


@dataclass
class FusedPart:
    """The parameters of one storage (float or 8-bit) of a group: their positions in the group's list of
    parameters with gradients, the path, and the path's arguments but the gradients: the tensors it updates, then
    the state (lists, or dicts for 8-bit state) and the step counts (``LayerwiseOptimizer._path_arguments``)."""

    positions: list[int]
    path: Path
    arguments: list[Any]


@dataclass
class FusedPlan:
    """One group's fused whole step but its gradients: the parts by storage, and what they were made for (the
    group's options, its parameters with gradients, their dtypes and every state tensor they held)."""

    options: tuple[Any, ...]
    params: list[Tensor]
    dtypes: list[torch.dtype]
    state_values: list[Any]
    parts: list[FusedPart]

    @staticmethod
    def possible(state: Mapping[Tensor, dict[str, Any]], params: list[Tensor]) -> bool:
        """Whether a plan may be made for these parameters: plain real tensors without a master copy."""
        return _on_cpu_contiguous(params) and not any(
            distributed.is_sharded(p) or p.is_complex() or "master" in state[p] for p in params)

    @classmethod
    def make(cls, group: dict[str, Any], state: Mapping[Tensor, dict[str, Any]], params: list[Tensor],
             parts: list[FusedPart]) -> FusedPlan:
        return cls(plan_options(group), list(params), _dtypes(params), _state_values(state, params), parts)

    def holds(self, group: dict[str, Any], state: Mapping[Tensor, dict[str, Any]], params: list[Tensor]) -> bool:
        """Whether this plan still describes ``params`` (the group's parameters with gradients) and their state."""
        if plan_options(group) != self.options or len(params) != len(self.params):
            return False
        if not all(map(operator.is_, params, self.params)):
            return False
        values = _state_values(state, params)
        return (len(values) == len(self.state_values) and all(map(operator.is_, values, self.state_values))
                and _dtypes(params) == self.dtypes and _on_cpu_contiguous(params))
