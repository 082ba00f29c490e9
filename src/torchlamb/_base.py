"""What every layer-wise optimizer in torchlamb shares: validation, state handling and the step skeleton.

A subclass says which hyper-parameters it has (``_validate_group``), what state a parameter holds
(``_new_state``) and how one group is updated (``_update_group``, which computes the direction and hands it to
the trust stage in :mod:`torchlamb.trust`). Everything else lives here once.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from torch import Tensor

from . import distributed, kernels, quantized
from .kernels import cpu as cpu_kernels
from .trust import FirstPass, TrustStats, clip_factor, global_norm, norm_dtype, sums_of_squares, trust_ratio

# A group's ``adapt``: apply the trust ratio (True), not (False), or only where weight_decay != 0 ("if_decayed").
Adapt = Union[bool, Literal["if_decayed"]]
# How a group's update runs: a Python loop over tensors, torch._foreach_* ops, or the fused CPU kernels.
Implementation = Literal["single_tensor", "foreach", "fused", "triton"]
# What a step does with NaN/Inf gradients: let them into the update (torch's behaviour) or change nothing.
NonFinite = Literal["propagate", "skip"]
# Parameters that get a float32 master copy and float32 state in groups with master_weights=True.
LOW_PRECISION = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------------------
# Hyper-parameter checks. Each raises ValueError/TypeError naming the argument and the allowed range.


def _where(group_index: int | None) -> str:
    return "" if group_index is None else f" (param group {group_index})"


def check_number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, group_index: int | None = None) -> None:
    """Raise unless ``value`` is a real number in the interval (or half-open interval) from ``low`` to ``high``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name} as a Tensor must hold one real value, got shape {tuple(value.shape)}"
                             f"{_where(group_index)}")
        number = float(value.detach().cpu())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{_where(group_index)}")
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):  # also rejects NaN
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {number}{_where(group_index)}")


def check_clip_range(name: str, value: Any, *, group_index: int | None = None) -> None:
    """Raise unless ``value`` is None or a pair ``(low, high)`` with ``0 <= low <= high``."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be None or a (min, max) pair, got {value!r}{_where(group_index)}")
    low, high = value
    check_number(f"{name}[0] (min)", low, low=0.0, group_index=group_index)
    check_number(f"{name}[1] (max)", high, low=0.0, group_index=group_index)
    if low > high:
        raise ValueError(f"{name} must have min <= max, got {tuple(value)}{_where(group_index)}")


def check_bool(name: str, value: Any, *, allow_none: bool = False, group_index: int | None = None) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r}{_where(group_index)}")


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the per-group update that every direction shares.


def effective_grad(grad: Tensor, maximize: bool, grad_factor: Tensor | None) -> Tensor:
    """The gradient the update uses: negated to maximize, times the global clip factor (and GradScaler's inverse
    scale). ``p.grad`` is untouched. A float16/bfloat16 gradient is multiplied in float32: the factor itself, e.g.
    0.1·2⁻²⁰, is not representable in float16."""
    if maximize:
        grad = -grad
    if grad_factor is not None:
        if grad.dtype in LOW_PRECISION:
            grad = (grad.float() * grad_factor.float()).to(grad.dtype)
        else:
            grad = grad * grad_factor.to(grad.dtype)
    return grad


def effective_grads(grads: list[Tensor], maximize: bool, grad_factor: Tensor | None) -> list[Tensor]:
    """:func:`effective_grad` for a list, with ``torch._foreach_*`` ops (float16/bfloat16 ones one by one)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if grad_factor is not None:
        wide = [g for g in grads if g.dtype not in LOW_PRECISION]
        scale_by_dtype = {dtype: grad_factor.to(dtype) for dtype in {g.dtype for g in wide}}
        scaled = iter(torch._foreach_mul(wide, [scale_by_dtype[g.dtype] for g in wide]) if wide else [])
        grads = [effective_grad(g, False, grad_factor) if g.dtype in LOW_PRECISION else next(scaled) for g in grads]
    return grads


def zero_if_skipped(grads: list[Tensor], keep: Tensor | None) -> list[Tensor]:
    """The gradients, or zeros when the step is skipped (``keep`` 0): a skipped step's gradients may hold Inf,
    and 0·Inf is NaN, so they are replaced rather than multiplied by ``keep``."""
    if keep is None:
        return grads
    kept = keep.bool()
    return [torch.where(kept.to(g.device), g, 0) for g in grads]


def if_kept(keep: Tensor | None, value: float, otherwise: float) -> float | Tensor:
    """``value`` for a step that is not skipped; with a skip flag ``keep``, a 0-dim float64 device tensor (float32
    on MPS, which has no float64) holding ``value`` or ``otherwise`` (e.g. a moment's weight 1 − β, or 0 to leave
    the moment as it is)."""
    if keep is None:
        return value
    dtype = torch.float32 if keep.device.type == "mps" else torch.float64
    return torch.where(keep.bool(), value, otherwise).to(dtype)


# ----------------------------------------------------------------------------------------------------------------


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of :class:`~torchlamb.Lamb` and :class:`~torchlamb.Lars`; not meant to be used directly.

    Attributes:
        trust_stats: one :class:`~torchlamb.trust.TrustStats` per parameter group updated by the last ``step``:
            per-tensor ‖θ‖, ‖u‖ and trust ratio as device tensors. Not saved in ``state_dict``.
        grad_norm: the global gradient norm of the last step as a 0-dim device tensor, when some group has
            ``max_grad_norm`` set (it is only computed then), else None.

    Each parameter's ``state['step']`` is a 0-dim float32 tensor beside the parameter, also where torch's
    optimizers would make it float64 (under ``torch.set_default_dtype(torch.float64)``) and after loading a
    checkpoint that saved it otherwise: the fused kernels and checkpoints then see one dtype whatever the global
    default; float32 counts every step exactly up to 2²⁴ (16,777,216), where it stops; and the bias corrections
    1 − βᵗ are computed in float64 from it anyway (float32 on MPS, which has no float64).

    ``copy.deepcopy`` gives an optimizer with its own copy of the state (and of the parameters it holds) that steps
    as the original would; it shares the ``partition_group``. ``pickle`` carries the same, but refuses an optimizer
    with a ``partition_group``: a process group cannot leave its process. Hooks are not carried, as in torch.
    """

    # The keys that each parameter's state holds, besides 'step'; set by subclasses.
    _state_keys: tuple[str, ...] = ()
    # How each of them is kept under state_dtype="8bit" (codes and block scales, see torchlamb.quantized).
    _quantized: tuple[quantized.Stored, ...] = ()

    # torch.amp.GradScaler then leaves unscaling and skipping to step(): it sets self.grad_scale (the loss scale) and
    # self.found_inf (> 0 after an overflow) before calling step(), which divides the gradients by the scale and
    # makes the step a no-op on overflow, without reading either value on the host.
    _step_supports_amp_scaling = True
    # On the CPU reading a flag costs nothing, so a skipped step returns at once; tests switch this off to run the
    # accelerator path (coefficients multiplied by 0 or 1 on the device) on the CPU.
    _read_skip_flag_on_cpu = True

    def __init__(self, params: Any, defaults: dict[str, Any], partition_group: Any | None = None,
                 nonfinite: NonFinite = "propagate") -> None:
        # The constructor's arguments are checked like any later group: add_param_group sees them as defaults.
        self._validate_group(defaults, None)
        if nonfinite not in ("propagate", "skip"):
            raise ValueError(f"nonfinite must be 'propagate' (as torch optimizers: NaN/Inf flow into the update) or "
                             f"'skip' (a step with any NaN/Inf gradient changes nothing), got {nonfinite!r}")
        # Options of the whole step, not of a group (a process group could not go into a state_dict either).
        self.partition_group = partition_group
        self.nonfinite = nonfinite
        super().__init__(params, defaults)
        # What the last step measured, in one dict that step() updates in place: under torch.compile, assignments to
        # an optimizer's attributes are dropped after the compiled step, a container's mutations are not.
        self._last_step: dict[str, Any] = {"trust_stats": [], "grad_norm": None}

    @property
    def trust_stats(self) -> list[TrustStats]:
        return self._last_step["trust_stats"]

    @property
    def grad_norm(self) -> Tensor | None:
        return self._last_step["grad_norm"]

    # -- what a subclass provides ---------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], group_index: int | None) -> None:
        """Check the options shared by every layer-wise optimizer; subclasses extend this."""
        check_number("lr", group["lr"], low=0.0, group_index=group_index)
        check_number("weight_decay", group["weight_decay"], low=0.0, group_index=group_index)
        check_clip_range("weight_norm_clip", group["weight_norm_clip"], group_index=group_index)
        check_clip_range("trust_clip", group["trust_clip"], group_index=group_index)
        if group["max_grad_norm"] is not None:
            check_number("max_grad_norm", group["max_grad_norm"], low=0.0, low_open=True, group_index=group_index)
        check_number("trust_eps", group["trust_eps"], low=0.0, group_index=group_index)
        if not (isinstance(group["adapt"], bool) or group["adapt"] == "if_decayed"):
            raise TypeError(f"adapt must be True, False or 'if_decayed' (adapt only when weight_decay != 0), "
                            f"got {group['adapt']!r}{_where(group_index)}")
        check_bool("maximize", group["maximize"], group_index=group_index)
        check_bool("foreach", group["foreach"], allow_none=True, group_index=group_index)
        check_bool("fused", group["fused"], allow_none=True, group_index=group_index)
        check_bool("master_weights", group["master_weights"], group_index=group_index)
        if group["state_dtype"] not in (None, "8bit", torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"state_dtype must be None, a floating torch.dtype (e.g. torch.bfloat16) or '8bit', "
                            f"got {group['state_dtype']!r}{_where(group_index)}")
        if group["fused"] and group["foreach"]:
            raise ValueError("foreach and fused cannot both be True: choose one implementation")

    def _new_state(self, param: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        """The zero state of ``param``, its tensors in ``dtype`` (float32 under master weights)."""
        raise NotImplementedError

    def _quantized_first_pass(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor],
                              grads: list[Tensor], grad_factor: Tensor | None, implementation: Implementation,
                              keep: Tensor | None) -> FirstPass:
        """:meth:`_first_pass` for parameters whose state is stored in 8 bits (see :meth:`_stores_8bit`): in the
        Triton kernels on that path, else with torch operations."""
        raise NotImplementedError

    def _quantized_whole_step(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor],
                              grads: list[Tensor], grad_factor: Tensor | None) -> TrustStats:
        """:meth:`_whole_step` for parameters whose state is stored in 8 bits."""
        raise NotImplementedError

    def _trust_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's options for :func:`torchlamb.trust.trust_ratio`."""
        # 'if_decayed' reproduces apex's and timm's LAMB, which skip the ratio for groups without weight decay.
        adapt = group["adapt"] is True or (group["adapt"] == "if_decayed" and group["weight_decay"] != 0)
        return dict(adapt=adapt, weight_norm_clip=group["weight_norm_clip"], trust_clip=group["trust_clip"],
                    trust_eps=group["trust_eps"])

    def _first_pass(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor], grads: list[Tensor],
                    grad_factor: Tensor | None, implementation: Implementation, keep: Tensor | None) -> FirstPass:
        """Update the state of ``params`` and return the sums of squares the trust stage needs, with the function
        that completes the update. ``targets`` and ``grads`` are what the update works on (see :meth:`_targets`);
        ``params`` only name the state.

        ``keep`` (a 0-dim float device tensor, or None for 1) is 0 when the step must change nothing: every change
        to the state and the parameters is then multiplied by 0 (gradients are zeroed first, as they may be Inf).
        """
        raise NotImplementedError

    def _update_norm(self, group: dict[str, Any], norms: Tensor) -> Tensor:
        """The ratio's denominator per tensor from the square roots of :class:`FirstPass` ``squares``."""
        raise NotImplementedError

    def _whole_step(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor], grads: list[Tensor],
                    grad_factor: Tensor | None) -> TrustStats:
        """The fused step in one call, trust stage included, for tensors that are whole on this process."""
        raise NotImplementedError

    def _states(self, params: list[Tensor], key: str, as_stored: bool = False) -> list[Tensor]:
        """This process's part of state ``key`` of each parameter (``params`` as the optimizer holds them), complex
        state as real views. State stored in another dtype than the update computes in (``state_dtype``) comes as
        a working copy in the computing dtype, written back at the end of the step — unless ``as_stored`` (for the
        fused kernels, which read and write bfloat16/float16 state themselves)."""
        states = _real([self.state[p][key] for p in params])
        if key == "step" or as_stored:
            return states
        working = []
        for param, stored in zip(params, states):
            dtype = self._compute_dtype(param)
            if stored.dtype == dtype:
                working.append(stored)
            else:
                copy = stored.to(dtype)
                self._write_backs.append((stored, copy))
                working.append(copy)
        return working

    def _compute_dtype(self, param: Tensor) -> torch.dtype:
        """The dtype the update of ``param`` computes in: float32 with a master copy, else the parameter's (the
        real dtype of a complex one)."""
        if "master" in self.state[param]:
            return torch.float32
        return param.real.dtype if param.is_complex() else param.dtype

    def _state_dtype(self, group: dict[str, Any], param: Tensor) -> torch.dtype:
        """The dtype ``param``'s moments or buffers are stored in, where they are not stored in 8 bits."""
        if group["state_dtype"] not in (None, "8bit"):
            return group["state_dtype"] if not param.is_complex() else param.dtype
        return torch.float32 if self._has_master(group, param) else param.dtype

    def _fused_reads_state(self, group: dict[str, Any], param: Tensor) -> bool:
        """Whether the fused kernels take ``param``'s state as stored: in the computing dtype, bfloat16/float16
        beside float32 (read and written in place), or in 8 bits (the Triton path hands those to torch
        operations)."""
        if group["state_dtype"] is None or self._stores_8bit(group, param):
            return True
        stored, computed = self._state_dtype(group, param), self._compute_dtype(param)
        return stored == computed or (computed == torch.float32 and stored in LOW_PRECISION)

    @staticmethod
    def _stores_8bit(group: dict[str, Any], param: Tensor) -> bool:
        """Whether ``param``'s state is kept in 8 bits: ``state_dtype="8bit"`` and a real floating tensor of at least
        ``torchlamb.quantized.MIN_NUMEL`` elements (smaller ones keep it in float)."""
        return group["state_dtype"] == "8bit" and quantized.quantizes(param)

    def _initial_state(self, group: dict[str, Any], param: Tensor, label: str) -> dict[str, Tensor]:
        """The state of a parameter before its first step: step 0, zero moments or buffers, and the master copy."""
        state = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
        if self._stores_8bit(group, param):
            # Sharded (FSDP2): codes and scales are DTensors placed as the parameter, each process holding those of
            # its rows. Blocks lie within rows (torchlamb.quantized), so only the first dimension may be split.
            if not distributed.shards_only_rows(param):
                raise ValueError(f"{type(self).__name__}(state_dtype='8bit'): {label} is split along a dimension "
                                 f"other than its first ({param.placements}); 8-bit blocks lie within rows, so "
                                 "only the first dimension may be sharded (as FSDP2 does). Use "
                                 "state_dtype=torch.bfloat16 for this model")
            local = distributed.local([param])[0]
            for stored in self._quantized:
                for key, value in stored.zeros(local).items():
                    state[key] = distributed.placed_like(value, param, stored.global_shape(key, param.shape))
        else:
            state.update(self._new_state(param, self._state_dtype(group, param)))
        if self._has_master(group, param):
            state["master"] = param.detach().to(torch.float32, copy=True)
        return state

    def _local_states(self, params: list[Tensor]) -> list[dict[str, Tensor]]:
        """Each parameter's state with this process's part of each tensor (a DTensor's local shard is a view:
        writes reach the DTensor)."""
        return [{key: distributed.local([value])[0] for key, value in self.state[p].items()} for p in params]

    def _by_storage(self, group: dict[str, Any], *columns: list[Tensor]) -> list[tuple[bool, list[int], list]]:
        """The parameters split by how their state is stored: [(in 8 bits, their positions, each of ``columns``
        at those positions)] for the float and the 8-bit ones present (``columns[0]``: the parameters)."""
        eight_bit = [self._stores_8bit(group, p) for p in columns[0]]
        parts = []
        for wanted in (False, True):
            positions = [i for i, is_8bit in enumerate(eight_bit) if is_8bit == wanted]
            if positions:
                parts.append((wanted, positions, [[column[i] for i in positions] for column in columns]))
        return parts

    def _group_first_pass(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor],
                          grads: list[Tensor], grad_factor: Tensor | None, implementation: Implementation,
                          keep: Tensor | None) -> FirstPass:
        """:meth:`_first_pass`, with the parameters whose state is stored in 8 bits taken apart to
        :meth:`_quantized_first_pass`; the results are put back in the order of ``params``."""
        parts = [(positions, self._quantized_first_pass(group, *picked, grad_factor, implementation, keep) if eight_bit
                  else self._first_pass(group, *picked, grad_factor, implementation, keep))
                 for eight_bit, positions, picked in self._by_storage(group, params, targets, grads)]
        return parts[0][1] if len(parts) == 1 else _merged(len(params), parts)

    def _group_whole_step(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor],
                          grads: list[Tensor], grad_factor: Tensor | None) -> TrustStats:
        """:meth:`_whole_step`, with the parameters whose state is stored in 8 bits taken apart to
        :meth:`_quantized_whole_step`; the statistics are put back in the order of ``params``."""
        parts = [(positions, self._quantized_whole_step(group, *picked, grad_factor) if eight_bit
                  else self._whole_step(group, *picked, grad_factor))
                 for eight_bit, positions, picked in self._by_storage(group, params, targets, grads)]
        if len(parts) == 1:
            return parts[0][1]
        columns = parts[0][1].weight_norm.new_zeros(3, len(params))
        for positions, stats in parts:
            columns[:, positions] = torch.stack([stats.weight_norm, stats.update_norm, stats.trust_ratio])
        return TrustStats(params, *columns.unbind(0))

    # -- master weights ------------------------------------------------------------------------------------
    @staticmethod
    def _has_master(group: dict[str, Any], param: Tensor) -> bool:
        return bool(group["master_weights"]) and param.dtype in LOW_PRECISION

    def _targets(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """What the update works on: this process's part of each parameter, or of its float32 master copy under
        master weights, and the gradients in the same dtype. A complex tensor is seen as real pairs
        (``torch.view_as_real``): its norm is that of its real and imaginary parts together, and its moments are
        per part, as torch's Adam does."""
        targets, target_grads = [], []
        for param, grad in zip(params, grads):
            master = self.state[param].get("master")
            target = param if master is None else master
            targets.append(target)
            target_grads.append(grad if grad.dtype == target.dtype else grad.to(target.dtype))
        return _real(targets), _real(target_grads)

    def _copies_in_kernel(self, params: list[Tensor]) -> list[Tensor | None]:
        """For the Triton kernels, which write a low-precision parameter from its float32 master in pass 2 (rounded
        to nearest even): this process's part of each parameter that has a master, None for the others. Those
        parameters are then not copied again after the step."""
        copies = []
        for param in params:
            has_master = "master" in self.state[param]
            if has_master:
                self._written_in_kernel.add(id(param))
            copies.append(distributed.local([param])[0] if has_master else None)
        return copies

    def _write_back_masters(self, params: list[Tensor]) -> None:
        """θ ← master (rounded to θ's dtype) for the parameters with a master copy that no kernel wrote."""
        for param in params:
            master = self.state[param].get("master")
            if master is not None and id(param) not in self._written_in_kernel:
                distributed.local([param])[0].copy_(distributed.local([master])[0])

    # -- parameter groups ----------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as :meth:`torch.optim.Optimizer.add_param_group` does, after checking its options."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if not isinstance(param_group.get("params"), (Tensor, set)):
            param_group["params"] = list(param_group["params"])  # a generator can be read only once
        index = len(self.param_groups)
        self._validate_group({**self.defaults, **param_group}, index)
        members = param_group["params"]
        for item in [members] if isinstance(members, Tensor) else members:
            tensor = item[1] if isinstance(item, tuple) else item
            if isinstance(tensor, Tensor):
                distributed.check_not_fsdp1(tensor, f"a parameter of param group {index}")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle carries: torch's ``defaults``, ``state`` and ``param_groups``, and the step's own options
        (``nonfinite``, ``partition_group``). A process group belongs to the process that made it and cannot be
        pickled, so an optimizer with a ``partition_group`` refuses to be (``copy.deepcopy`` shares it instead)."""
        if self.partition_group is not None:
            raise TypeError(f"a {type(self).__name__} with a partition_group cannot be pickled: a process group "
                            "belongs to the process that made it. Set optimizer.partition_group = None before "
                            "pickling and set it again after unpickling (copy.deepcopy shares the process group)")
        return self._carried_state()

    def _carried_state(self) -> dict[str, Any]:
        return {**super().__getstate__(), "nonfinite": self.nonfinite, "partition_group": self.partition_group}

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerwiseOptimizer:
        """A copy with its own parameters and state, sharing the ``partition_group`` (which cannot be copied)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        if self.partition_group is not None:
            memo[id(self.partition_group)] = self.partition_group
        copied.__setstate__(copy.deepcopy(self._carried_state(), memo))
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Pickles of earlier versions carry neither option; torch's load_state_dict passes only state and groups.
        self.__dict__.setdefault("nonfinite", "propagate")
        self.__dict__.setdefault("partition_group", None)
        self.__dict__.setdefault("_last_step", {"trust_stats": [], "grad_norm": None})

    # -- checkpoints ---------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict``, after checking that it fits these parameters.

        In order: the hooks of ``register_load_state_dict_pre_hook`` (on a shallow copy, as in torch: a hook can
        repair an old checkpoint), the check, torch's loading, then the post-hooks, which see the loaded state.

        An option a saved group lacks (one added to torchlamb after the checkpoint was written) takes this
        optimizer's value for that group — the constructor's default unless the group set its own — and is
        checked with the others. Keys that are not options (``initial_lr`` of a scheduler) are kept as saved.

        Every option is restored as saved except ``state_dtype``: how the state is stored is this optimizer's
        choice, not part of the training's math. Saved state that fits the saved ``state_dtype`` is converted to
        this optimizer's (e.g. a float32-state checkpoint into ``state_dtype="8bit"``, or back).

        Raises ValueError, naming the parameter, when groups, state keys, shapes or dtypes do not match, and
        ValueError/TypeError for an option out of range; the optimizer is unchanged then.
        """
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict, params_by_id = self._loadable(state_dict)
        # torch's loading would run the hooks again, and the post-hooks before the fix-ups below: it runs without.
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        # torch's loading replaces state and param_groups whole, so putting them back undoes a failed load.
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            self._take_saved_state(state_dict["state"], params_by_id)
        except BaseException:
            self.state, self.param_groups = before
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for hook in post_hooks.values():
            hook(self)

    def _take_saved_state(self, saved_state: dict[Any, dict[str, Any]],
                          params_by_id: dict[Any, tuple[Tensor, str, dict[str, Any]]]) -> None:
        """Undo what torch's loading does to our state, which is not an ordinary optimizer's, and convert the saved
        state to this optimizer's ``state_dtype``."""
        groups = {param: group for group in self.param_groups for param in group["params"]}
        for saved_id, saved in saved_state.items():
            param, _, saved_group = params_by_id[saved_id]
            state = self.state[param]
            # torch casts every loaded tensor to its parameter's dtype: that would round float32 master weights and
            # moments to bfloat16 (apex's mixed-precision LAMB loses its masters that way). Take the saved ones.
            for key in set(saved) - {"step"}:
                if saved[key].dtype != param.dtype:
                    state[key] = saved[key].to(param.device, copy=True)
            # torch keeps a loaded 'step' where it was saved, in its dtype; ours lives beside its parameter (no host
            # sync) and is float32 whatever the default dtype (see the class docstring).
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
            self._convert_state_(state, param, saved_group, groups[param])
            # State keeps its parameter's memory layout, as when it is created, so the fused kernels can take it.
            for key in (*self._state_keys, *(stored.codes_key for stored in self._quantized), "master"):
                if key in state and state[key].stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=state[key].dtype).copy_(state[key])

    def _convert_state_(self, state: dict[str, Tensor], param: Tensor, saved_group: dict[str, Any],
                        group: dict[str, Any]) -> None:
        """Turn ``param``'s state, stored as ``saved_group`` says, into the storage ``group`` asks for: float to
        8-bit, 8-bit to float, or one float dtype to another."""
        was_8bit, is_8bit = self._stores_8bit(saved_group, param), self._stores_8bit(group, param)
        if was_8bit != is_8bit and distributed.is_sharded(param):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint keeps the state of a sharded "
                             f"parameter in {'8 bits' if was_8bit else 'float'} and this optimizer in "
                             f"{'8 bits' if is_8bit else 'float'}; converting sharded state is not supported: load "
                             "it with the checkpoint's state_dtype")
        dtype = self._state_dtype(group, param)
        for stored in self._quantized:
            if was_8bit and not is_8bit:
                value = stored.to_float(state).to(dtype)
                del state[stored.codes_key], state[stored.absmax_key]
                state[stored.key] = value
            elif is_8bit and not was_8bit:
                state.update(stored.from_float(state.pop(stored.key)))
            elif not is_8bit and state[stored.key].dtype != dtype:
                state[stored.key] = state[stored.key].to(dtype)

    def _loadable(self, state_dict: Any) -> tuple[dict[str, Any], dict[Any, tuple[Tensor, str, dict[str, Any]]]]:
        """Raise ValueError/TypeError unless ``state_dict`` fits. Return it with the options its groups lack filled
        in (a new dict: the caller's is not changed) and {saved id: (parameter, its label, its filled group)}."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and 'param_groups' keys")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
            raise ValueError(f"{name}.load_state_dict expects 'param_groups' as a list and 'state' as a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this {name} has "
                             f"{len(self.param_groups)}")
        filled_groups = []
        params_by_id: dict[Any, tuple[Tensor, str, dict[str, Any]]] = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"checkpoint's param group {index} is not a dict with a 'params' key")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"checkpoint's param group {index} has {len(saved['params'])} parameters, "
                                 f"this {name}'s has {len(group['params'])}")
            missing = self._option_names() - saved.keys()
            filled = {**{key: group[key] if key in group else self.defaults[key] for key in sorted(missing)},
                      **saved}
            self._validate_group(filled, index)
            filled_groups.append({**filled, "state_dtype": group["state_dtype"]})
            for position, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                # The loaded group's master_weights is the one that will hold.
                params_by_id[saved_id] = (param, self._param_label(group, index, position), filled)
        for saved_id, state in saved_state.items():
            if saved_id not in params_by_id:
                raise ValueError(f"checkpoint has state for parameter id {saved_id!r}, which no param group lists")
            param, label, group = params_by_id[saved_id]
            master = self._has_master(group, param)
            eight_bit = self._stores_8bit(group, param)
            moment_keys = ([key for stored in self._quantized for key in (stored.codes_key, stored.absmax_key)]
                           if eight_bit else self._state_keys)
            expected_keys = {"step", *moment_keys, *(["master"] if master else [])}
            if not isinstance(state, dict) or set(state) != expected_keys:
                keys = sorted(state) if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"state of {label} has keys {keys}, expected {sorted(expected_keys)}")
            step = state["step"]
            if not (isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1)):
                raise ValueError(f"state of {label}: 'step' must be a number or a one-element tensor")
            if eight_bit:
                for stored in self._quantized:
                    stored.check(state, param, label)
            for key in expected_keys - {"step", *(moment_keys if eight_bit else [])}:
                value = state[key]
                if not isinstance(value, Tensor):
                    raise ValueError(f"state of {label}: {key!r} must be a tensor, got {type(value).__name__}")
                dtype = torch.float32 if key == "master" else self._state_dtype(group, param)
                if value.shape != param.shape or value.dtype != dtype:
                    raise ValueError(f"state of {label}: {key!r} has shape {tuple(value.shape)} and dtype "
                                     f"{value.dtype}, expected {tuple(param.shape)} and {dtype}")
        return {**state_dict, "param_groups": filled_groups}, params_by_id

    def _option_names(self) -> set[str]:
        # torch.optim.Optimizer.__setstate__ adds 'differentiable' to defaults; it is not one of our options.
        return set(self.defaults) - {"differentiable"}

    @staticmethod
    def _param_label(group: dict[str, Any], group_index: int, position: int) -> str:
        names = group.get("param_names")
        where = f"param group {group_index}, position {position}"
        return f"parameter {names[position]!r} ({where})" if names else f"parameter at {where}"

    # Whether the tests run the Triton kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), where
    # they otherwise run on CUDA tensors only.
    _triton_on_cpu = False

    def _triton_takes(self, fused: bool | None, foreach: bool | None, params: list[Tensor],
                      fused_possible: bool) -> bool:
        """fused=True, or fused and foreach both None, on CUDA tensors the kernels take: the Triton kernels.
        fused=True on CUDA without triton is an error that names what to install."""
        device_type = params[0].device.type if params else "cpu"
        on_device = device_type == "cuda" or (self._triton_on_cpu and device_type == "cpu")
        wanted = fused or (fused is None and foreach is None)
        if not (on_device and wanted and fused_possible):
            return False
        module = kernels.triton_module()
        if module is None:
            if fused:
                raise RuntimeError(f"{type(self).__name__}(fused=True) on CUDA runs Triton kernels, and triton does "
                                   "not import here: pip install 'torchlamb[gpu]' (or foreach=True)")
            return False
        return module.supports(params)

    # -- the step ------------------------------------------------------------------------------------------
    def _params_with_grads(self, group: dict[str, Any], group_index: int) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for position, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                f"({self._param_label(group, group_index, position)}): the trust ratio needs "
                                "the whole update of each tensor; use a dense embedding (sparse=False)")
            if grad.is_complex() != param.is_complex():
                raise TypeError(f"{type(self).__name__}: the gradient of "
                                f"{self._param_label(group, group_index, position)} is "
                                f"{'' if grad.is_complex() else 'not '}complex, its parameter "
                                f"{'is' if param.is_complex() else 'is not'}")
            params.append(param)
            grads.append(grad)
        return params, grads

    def _choose_implementation(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                               keep: Tensor | None = None, fused_possible: bool = True) -> Implementation:
        """fused=True, or fused and foreach both None: the fused kernels where they apply (dense contiguous CPU
        tensors, kernels built, no skip flag left on the device, state in the computing dtype); else foreach=None
        picks foreach when all tensors share a device. Under torch.compile: foreach (single-tensor if foreach=False).
        """
        fused, foreach = group["fused"], group["foreach"]
        tensors = params + grads
        if torch.compiler.is_compiling():
            # The C++ kernels are opaque to torch.compile (a graph break); the compiler fuses the foreach path itself.
            return "foreach" if foreach is not False else "single_tensor"
        if self._triton_takes(fused, foreach, params, fused_possible):
            return "triton"
        if (fused or (fused is None and foreach is None)) and keep is None and fused_possible:
            # Checking the parameters suffices: the state has their layout (see load_state_dict), and the fused
            # step makes gradients contiguous where they are not.
            if cpu_kernels.supports(params) and cpu_kernels.load() is not None:
                return "fused"
            if fused:
                if not cpu_kernels.supports(params) and not getattr(self, "_warned_fused", False):
                    self._warned_fused = True
                    warnings.warn(f"{type(self).__name__}(fused=True) runs on dense contiguous CPU tensors only; "
                                  "using the foreach implementation", RuntimeWarning, stacklevel=3)
                return "foreach"
        if foreach is None:
            foreach = len({t.device for t in tensors}) == 1 and not torch.jit.is_scripting()
        return "foreach" if foreach else "single_tensor"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Each group's update runs up to the trust stage (``_first_pass``); the per-tensor sums of squares of all
        groups are made whole-tensor sums — for sharded (FSDP2, HSDP, tensor-parallel) parameters one all-reduce
        per process group they are split over, nothing otherwise — turned into trust ratios, and the updates
        completed. Fused groups of whole tensors do all that in one call.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Check every gradient before touching any state, so a bad one leaves the optimizer as it was.
        gathered = [self._params_with_grads(group, index) for index, group in enumerate(self.param_groups)]
        all_params = [param for params, _ in gathered for param in params]
        all_grads = [grad for _, grads in gathered for grad in grads]
        sharded = distributed.any_sharded(all_params)

        # GradScaler's loss scale (gradients are divided by it) and overflow flag, when it drives this step.
        loss_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        inverse_scale = None if loss_scale is None else loss_scale.double().reciprocal().float()
        # A process without gradients (a ZeRO share) still takes part in the collectives, on its parameters' device.
        device = next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
        skip = self._skip_flag(all_grads, found_inf, device)
        self._last_step["grad_norm"] = grad_norm = None
        if (skip is not None and self._read_skip_flag_on_cpu and all(p.is_cpu for p in all_params)
                and not torch.compiler.is_compiling()):  # compiled: the flag stays a tensor, as on an accelerator
            if skip.item():  # a CPU value: no synchronisation
                self._last_step["trust_stats"] = []
                return loss
            skip = None
        keep = None if skip is None else (~skip).float()

        if any(group["max_grad_norm"] is not None for group in self.param_groups):
            if sharded or self.partition_group is not None:  # every process takes part, with or without gradients
                grad_norm = distributed.grad_norm(all_grads, partition_group=self.partition_group, device=device)
            elif all_grads:
                grad_norm = global_norm(_real(all_grads))
            if grad_norm is not None and inverse_scale is not None:
                grad_norm = grad_norm * inverse_scale.to(grad_norm.device)
            self._last_step["grad_norm"] = grad_norm

        stats: dict[int, TrustStats] = {}
        pending: list[tuple[int, list[Tensor], FirstPass]] = []
        self._write_backs: list[tuple[Tensor, Tensor]] = []  # (stored state, working copy), see _states
        self._written_in_kernel: set[int] = set()  # ids of parameters written from their masters, see _copies_in_kernel
        for index, (group, (params, grads)) in enumerate(zip(self.param_groups, gathered)):
            if not params:
                continue
            for position, param in enumerate(group["params"]):
                if param.grad is not None and not self.state[param]:
                    self.state[param] = self._initial_state(group, param,
                                                            self._param_label(group, index, position))
            grad_factor = inverse_scale
            if grad_norm is not None:
                clip = clip_factor(grad_norm, group["max_grad_norm"])
                grad_factor = clip if grad_factor is None else clip * grad_factor.to(clip.device)
            targets, target_grads = self._targets(params, grads)
            # State the fused kernels cannot read as stored takes the foreach path (see _fused_reads_state).
            fusable = all(self._fused_reads_state(group, p) for p in params)
            implementation = self._choose_implementation(group, targets, target_grads, keep, fused_possible=fusable)
            if implementation == "fused" and not sharded:
                stats[index] = self._group_whole_step(group, params, targets, target_grads, grad_factor)
            else:
                pending.append((index, params, self._group_first_pass(group, params, targets, target_grads,
                                                                      grad_factor, implementation, keep)))

        if pending:
            squares = [first.squares for _, _, first in pending]
            if sharded:  # all groups' squares together: one all-reduce per process group
                devices = [s.device for s in squares]
                packed = distributed.sum_over_shards_(
                    torch.cat([s.to(devices[0]) for s in squares]),
                    [p for _, params, _ in pending for p in params])
                squares = [part.to(device) for part, device in zip(packed.split([len(s) for s in squares]), devices)]
            for (index, params, first), group_squares in zip(pending, squares):
                group = self.param_groups[index]
                norms = group_squares.sqrt().to(norm_dtype(params))
                weight_norm, update_norm = norms[:, 0], self._update_norm(group, norms)
                ratio = trust_ratio(weight_norm, update_norm, **self._trust_options(group))
                first.finish(ratio)
                stats[index] = TrustStats(params, weight_norm, update_norm, ratio)
        self._write_back_masters(all_params)
        for stored, working in self._write_backs:
            stored.copy_(working)
        self._write_backs = []
        self._last_step["trust_stats"] = [stats[index] for index in sorted(stats)]
        return loss

    def _skip_flag(self, grads: list[Tensor], found_inf: Tensor | None, device: torch.device) -> Tensor | None:
        """A 0-dim bool device tensor, True when this step must change nothing (GradScaler found an overflow, or
        ``nonfinite="skip"`` and some gradient holds NaN/Inf); None when no such rule applies.

        Where the model is spread over processes (sharded parameters, or ``partition_group``), each process sees
        only its gradients: the flag is then agreed on by an all-reduce (max), so that every process skips or none.
        """
        if found_inf is None and self.nonfinite != "skip":
            return None
        # A copy: the all-reduce below must not write into the GradScaler's own tensor.
        flag = torch.zeros((), device=device) if found_inf is None else found_inf.reshape(()).to(device, torch.float32,
                                                                                                   copy=True)
        # Empty tensors hold nothing non-finite (and _foreach_norm(inf) refuses them: no identity for max).
        local_grads = [g for g in distributed.local(grads) if g.numel()]
        if self.nonfinite == "skip" and local_grads:
            # The largest |g| of each tensor is NaN or Inf exactly when the tensor holds one (no overflow, unlike ‖g‖²).
            largest = torch.stack([m.to(device) for m in torch._foreach_norm(local_grads, math.inf)])
            flag = torch.maximum(flag, (~largest.isfinite().all()).float())
        distributed.agree_(flag, grads, self.partition_group)
        return flag > 0


def _real(tensors: list[Tensor]) -> list[Tensor]:
    """This process's part of each tensor (see torchlamb.distributed.local), complex ones as real views."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in distributed.local(tensors)]


@functools.lru_cache(maxsize=64)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """Positions as an index tensor on ``device``, made once: copying a host list to a GPU every step would wait."""
    return torch.tensor(positions, dtype=torch.int64, device=device)


def _merged(n: int, parts: list[tuple[list[int], FirstPass]]) -> FirstPass:
    """One FirstPass of ``n`` tensors from FirstPasses of some of them: ``parts`` holds (their positions, theirs)."""
    first_squares = parts[0][1].squares
    squares = first_squares.new_zeros(n, first_squares.shape[1])
    indices = [_index(tuple(positions), squares.device) for positions, _ in parts]
    for index, (_, first) in zip(indices, parts):
        squares[index] = first.squares.to(squares.device)

    def finish(ratio: Tensor) -> None:
        for index, (_, first) in zip(indices, parts):
            first.finish(ratio[index.to(ratio.device)])

    return FirstPass(squares, finish)


def squares_of(*columns: list[Tensor]) -> Tensor:
    """The float64 [n, k] sums of squares of a FirstPass: column j holds ‖x‖² of each tensor of ``columns[j]``."""
    return torch.stack([sums_of_squares(column) for column in columns], 1)
