"""Hyper-parameter checks: each raises ValueError/TypeError naming the argument and the allowed range.

The options every layer-wise optimizer shares are checked by :func:`check_common_options`; each optimizer checks
its own beside it (``_validate_group`` in lamb.py, lars.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# The dtypes a group's state_dtype may name besides None and "8bit".
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def where(group_index: int | None) -> str:
    """" (param group i)" for a message about group i; "" for the constructor's arguments."""
    return "" if group_index is None else f" (param group {group_index})"


def check_number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, group_index: int | None = None) -> None:
    """Raise unless ``value`` is a real number in the interval (or half-open interval) from ``low`` to ``high``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            # torch's wording ("Tensor lr must be 1-element"), which torch's own optimizer tests look for.
            raise ValueError(f"Tensor {name} must be 1-element and real: {name} as a Tensor must hold one real "
                             f"value, got shape {tuple(value.shape)}{where(group_index)}")
        number = float(value.detach().cpu())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{where(group_index)}")
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):  # also rejects NaN
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {number}{where(group_index)}")


def check_count(name: str, value: Any, *, low: int = 1, hint: str = "") -> None:
    """Raise unless ``value`` is an int (not a bool) >= ``low``; ``hint`` says, in parentheses, what it counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{f' ({hint})' if hint else ''}, got {value!r}")


def check_clip_range(name: str, value: Any, *, group_index: int | None = None) -> None:
    """Raise unless ``value`` is None or a pair ``(low, high)`` with ``0 <= low <= high``."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be None or a (min, max) pair, got {value!r}{where(group_index)}")
    low, high = value
    check_number(f"{name}[0] (min)", low, low=0.0, group_index=group_index)
    check_number(f"{name}[1] (max)", high, low=0.0, group_index=group_index)
    if low > high:
        raise ValueError(f"{name} must have min <= max, got {tuple(value)}{where(group_index)}")


def check_bool(name: str, value: Any, *, allow_none: bool = False, group_index: int | None = None) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r}{where(group_index)}")


def check_common_options(group: dict[str, Any], group_index: int | None) -> None:
    """Check the options every layer-wise optimizer has: lr, weight decay, the trust stage's, the path's, storage."""
    check_number("lr", group["lr"], low=0.0, group_index=group_index)
    check_number("weight_decay", group["weight_decay"], low=0.0, group_index=group_index)
    check_clip_range("weight_norm_clip", group["weight_norm_clip"], group_index=group_index)
    check_clip_range("trust_clip", group["trust_clip"], group_index=group_index)
    if group["max_grad_norm"] is not None:
        check_number("max_grad_norm", group["max_grad_norm"], low=0.0, low_open=True, group_index=group_index)
    check_number("trust_eps", group["trust_eps"], low=0.0, group_index=group_index)
    if not (isinstance(group["adapt"], bool) or group["adapt"] == "if_decayed"):
        raise TypeError(f"adapt must be True, False or 'if_decayed' (adapt only when weight_decay != 0), "
                        f"got {group['adapt']!r}{where(group_index)}")
    check_bool("maximize", group["maximize"], group_index=group_index)
    check_bool("foreach", group["foreach"], allow_none=True, group_index=group_index)
    check_bool("fused", group["fused"], allow_none=True, group_index=group_index)
    check_bool("master_weights", group["master_weights"], group_index=group_index)
    if group["state_dtype"] not in (None, "8bit", *STATE_DTYPES):
        raise TypeError(f"state_dtype must be None, a floating torch.dtype (e.g. torch.bfloat16) or '8bit', "
                        f"got {group['state_dtype']!r}{where(group_index)}")
    if group["fused"] and group["foreach"]:
        raise ValueError("foreach and fused cannot both be True: choose one implementation")


def check_nonfinite(nonfinite: Any) -> None:
    if nonfinite not in ("propagate", "skip"):
        raise ValueError(f"nonfinite must be 'propagate' (as torch optimizers: NaN/Inf flow into the update) or "
                         f"'skip' (a step with any NaN/Inf gradient changes nothing), got {nonfinite!r}")
