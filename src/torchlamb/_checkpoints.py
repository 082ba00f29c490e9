"""Loading a checkpoint into a layer-wise optimizer: checked first, converted to this optimizer's storage, and
undone whole if anything fails (:func:`load_state_dict`; the docstring of
:meth:`torchlamb._base.LayerwiseOptimizer.load_state_dict` states the rules). ``state_dict()`` itself is torch's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed
from ._storage import has_master, state_dtype, stores_8bit

if TYPE_CHECKING:
    from ._base import LayerwiseOptimizer

# {saved parameter id: (the parameter, its label for messages, its saved group with missing options filled in)}
SavedParams = dict[Any, tuple[Tensor, str, dict[str, Any]]]


def load_state_dict(optimizer: LayerwiseOptimizer, state_dict: dict[str, Any]) -> None:
    """Pre-hooks (on a shallow copy, as in torch), the check, torch's loading, our fix-ups, then the post-hooks."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    state_dict, params_by_id = loadable(optimizer, state_dict)
    # torch's loading would run the hooks again, and the post-hooks before the fix-ups below: it runs without.
    pre_hooks = optimizer._optimizer_load_state_dict_pre_hooks
    post_hooks = optimizer._optimizer_load_state_dict_post_hooks
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    # torch's loading replaces state and param_groups whole, so putting them back undoes a failed load.
    before = optimizer.state, optimizer.param_groups
    try:
        torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
        take_saved_state(optimizer, state_dict["state"], params_by_id)
    except BaseException:
        optimizer.state, optimizer.param_groups = before
        raise
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = pre_hooks
        optimizer._optimizer_load_state_dict_post_hooks = post_hooks
    for hook in post_hooks.values():
        hook(optimizer)


def take_saved_state(optimizer: LayerwiseOptimizer, saved_state: dict[Any, dict[str, Any]],
                     params_by_id: SavedParams) -> None:
    """Undo what torch's loading does to our state, which is not an ordinary optimizer's, and convert the saved
    state to this optimizer's ``state_dtype``."""
    groups = {param: group for group in optimizer.param_groups for param in group["params"]}
    for saved_id, saved in saved_state.items():
        param, _, saved_group = params_by_id[saved_id]
        state = optimizer.state[param]
        # torch casts every loaded tensor to its parameter's dtype: that would round float32 master weights and
        # moments to bfloat16 (apex's mixed-precision LAMB loses its masters that way). Take the saved ones.
        for key in set(saved) - {"step"}:
            if saved[key].dtype != param.dtype:
                state[key] = saved[key].to(param.device, copy=True)
        # torch keeps a loaded 'step' where it was saved, in its dtype; ours lives beside its parameter (no host
        # sync) and is float32 whatever the default dtype (see the class docstring).
        state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
        convert_state_(optimizer, state, param, saved_group, groups[param])
        # State keeps its parameter's memory layout, as when it is created, so the fused kernels can take it.
        for key in (*optimizer._state_keys, *(q.codes_key for q in optimizer._quantized), "master"):
            if key in state and state[key].stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=state[key].dtype).copy_(state[key])


def convert_state_(optimizer: LayerwiseOptimizer, state: dict[str, Tensor], param: Tensor,
                   saved_group: dict[str, Any], group: dict[str, Any]) -> None:
    """Turn ``param``'s state, stored as ``saved_group`` says, into the storage ``group`` asks for: float to 8-bit,
    8-bit to float, or one float dtype to another."""
    was_8bit, is_8bit = stores_8bit(saved_group, param), stores_8bit(group, param)
    if was_8bit != is_8bit and distributed.is_sharded(param):
        raise ValueError(f"{type(optimizer).__name__}.load_state_dict: the checkpoint keeps the state of a sharded "
                         f"parameter in {'8 bits' if was_8bit else 'float'} and this optimizer in "
                         f"{'8 bits' if is_8bit else 'float'}; converting sharded state is not supported: load "
                         "it with the checkpoint's state_dtype")
    dtype = state_dtype(group, param)
    for quantized_key in optimizer._quantized:
        key = quantized_key.key
        if was_8bit and not is_8bit:
            value = quantized_key.to_float(state).to(dtype)
            del state[quantized_key.codes_key], state[quantized_key.absmax_key]
            state[key] = value
        elif is_8bit and not was_8bit:
            state.update(quantized_key.from_float(state.pop(key)))
        elif not is_8bit and state[key].dtype != dtype:
            state[key] = state[key].to(dtype)


def loadable(optimizer: LayerwiseOptimizer, state_dict: Any) -> tuple[dict[str, Any], SavedParams]:
    """Raise ValueError/TypeError unless ``state_dict`` fits. Return it with the options its groups lack filled
    in (a new dict: the caller's is not changed) and the saved parameters by id."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and 'param_groups' keys")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise ValueError(f"{name}.load_state_dict expects 'param_groups' as a list and 'state' as a dict")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this {name} has "
                         f"{len(optimizer.param_groups)}")
    filled_groups = []
    params_by_id: SavedParams = {}
    for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError(f"checkpoint's param group {index} is not a dict with a 'params' key")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"checkpoint's param group {index} has {len(saved['params'])} parameters, "
                             f"this {name}'s has {len(group['params'])}")
        missing = optimizer._option_names() - saved.keys()
        filled = {**{key: group[key] if key in group else optimizer.defaults[key] for key in sorted(missing)},
                  **saved}
        optimizer._validate_group(filled, index)
        filled_groups.append({**filled, "state_dtype": group["state_dtype"]})
        for position, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
            # The loaded group's master_weights is the one that will hold.
            params_by_id[saved_id] = (param, optimizer._param_label(group, index, position), filled)
    for saved_id, state in saved_state.items():
        if saved_id not in params_by_id:
            raise ValueError(f"checkpoint has state for parameter id {saved_id!r}, which no param group lists")
        param, label, group = params_by_id[saved_id]
        _check_saved_state(optimizer, state, param, label, group)
    return {**state_dict, "param_groups": filled_groups}, params_by_id


def _check_saved_state(optimizer: LayerwiseOptimizer, state: Any, param: Tensor, label: str,
                       group: dict[str, Any]) -> None:
    """Raise ValueError unless ``state`` has the keys, shapes and dtypes ``param``'s state has under ``group``."""
    eight_bit = stores_8bit(group, param)
    moment_keys = ([name for q in optimizer._quantized for name in (q.codes_key, q.absmax_key)] if eight_bit
                   else optimizer._state_keys)
    expected_keys = {"step", *moment_keys, *(["master"] if has_master(group, param) else [])}
    if not isinstance(state, dict) or set(state) != expected_keys:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state of {label} has keys {keys}, expected {sorted(expected_keys)}")
    step = state["step"]
    if not (isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1)):
        raise ValueError(f"state of {label}: 'step' must be a number or a one-element tensor")
    if eight_bit:
        for quantized_key in optimizer._quantized:
            quantized_key.check(state, param, label)
    for key in expected_keys - {"step", *(moment_keys if eight_bit else [])}:
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"state of {label}: {key!r} must be a tensor, got {type(value).__name__}")
        dtype = torch.float32 if key == "master" else state_dtype(group, param)
        if value.shape != param.shape or value.dtype != dtype:
            raise ValueError(f"state of {label}: {key!r} has shape {tuple(value.shape)} and dtype "
                             f"{value.dtype}, expected {tuple(param.shape)} and {dtype}")
