"""The step skeleton every layer-wise optimizer in torchlamb shares.

``step()`` runs, for all parameter groups together:

1. **prepare** — check every gradient, then the skip flag (:mod:`torchlamb._gradients`) and the global gradient
   norm for ``max_grad_norm``;
2. **first pass per group** — pick the implementation and look it up in the optimizer's path table
   (:mod:`torchlamb._dispatch`); the direction is computed up to the trust stage (a
   :class:`~torchlamb.trust.PendingUpdate`), or, for the fused CPU kernels on unsharded tensors, the whole step,
   whose lists are kept as the group's plan and reused while they hold (:mod:`torchlamb._plans`);
3. **trust stage** — the per-tensor sums of squares of all groups, made whole-tensor sums by one all-reduce where
   parameters are sharded, become trust ratios and the updates are applied (:func:`torchlamb.trust.trust_stage`);
4. **finish** — master weights and working copies of state written back (:class:`torchlamb._storage.StepScratch`).

A subclass (lamb.py, lars.py) says which options it has (``_validate_group``), its state (``_state_keys``,
``_quantized``, ``_new_state``), its options as its functions take them (``_options``, ``_trust_options``), the
ratio's denominator (``_update_norm``) and its path table (``_PATHS``). Storage lives in :mod:`torchlamb._storage`,
checkpoints in :mod:`torchlamb._checkpoints`, checks in :mod:`torchlamb._validation`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from torch import Tensor

from . import _checkpoints, _gradients, _storage, distributed, quantized
from ._dispatch import Implementation, PathTable, choose_implementation
from ._gradients import params_with_grads, real, skip_flag
from ._plans import FusedPart, FusedPlan
from ._storage import StepScratch
from ._validation import check_common_options, check_nonfinite
from .trust import PendingUpdate, TrustStats, clip_factor, global_norm, trust_stage

# A group's ``adapt``: apply the trust ratio (True), not (False), or only where weight_decay != 0 ("if_decayed").
Adapt = Union[bool, Literal["if_decayed"]]
# What a step does with NaN/Inf gradients: let them into the update (torch's behaviour) or change nothing.
NonFinite = Literal["propagate", "skip"]


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
    _quantized: tuple[quantized.QuantizedKey, ...] = ()
    # (implementation, 8-bit state) -> the functions that compute a group's update (see torchlamb._dispatch).
    _PATHS: PathTable = {}

    # torch.amp.GradScaler then leaves unscaling and skipping to step(): it sets self.grad_scale (the loss scale) and
    # self.found_inf (> 0 after an overflow) before calling step(), which divides the gradients by the scale and
    # makes the step a no-op on overflow, without reading either value on the host.
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, defaults: dict[str, Any], partition_group: Any | None = None,
                 nonfinite: NonFinite = "propagate") -> None:
        # The constructor's arguments are checked like any later group: add_param_group sees them as defaults.
        self._validate_group(defaults, None)
        check_nonfinite(nonfinite)
        # Options of the whole step, not of a group (a process group could not go into a state_dict either).
        self.partition_group = partition_group
        self.nonfinite = nonfinite
        self._warned: set[str] = set()  # warnings given once per optimizer
        super().__init__(params, defaults)
        # What the last step measured, in one dict that step() updates in place: under torch.compile, assignments to
        # an optimizer's attributes are dropped after the compiled step, a container's mutations are not.
        self._last_step: dict[str, Any] = {"trust_stats": [], "grad_norm": None}
        self._plans: dict[int, FusedPlan] = {}  # per group index: the fused step's lists (torchlamb._plans)

    @property
    def trust_stats(self) -> list[TrustStats]:
        return self._last_step["trust_stats"]

    @property
    def grad_norm(self) -> Tensor | None:
        return self._last_step["grad_norm"]

    # -- what a subclass provides ---------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], group_index: int | None) -> None:
        """Check the options shared by every layer-wise optimizer; subclasses extend this."""
        check_common_options(group, group_index)

    def _new_state(self, param: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        """The zero state of ``param``, its tensors in ``dtype`` (float32 under master weights)."""
        raise NotImplementedError

    @staticmethod
    def _options(group: dict[str, Any]) -> dict[str, Any]:
        """The group's options as the path functions take them."""
        raise NotImplementedError

    def _trust_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's options for :func:`torchlamb.trust.trust_ratio`."""
        # 'if_decayed' reproduces apex's and timm's LAMB, which skip the ratio for groups without weight decay.
        adapt = group["adapt"] is True or (group["adapt"] == "if_decayed" and group["weight_decay"] != 0)
        return dict(adapt=adapt, weight_norm_clip=group["weight_norm_clip"], trust_clip=group["trust_clip"],
                    trust_eps=group["trust_eps"])

    def _update_norm(self, group: dict[str, Any], norms: Tensor) -> Tensor:
        """The ratio's denominator per tensor from the norms (square roots of a PendingUpdate's columns)."""
        raise NotImplementedError

    # -- parameter groups, pickling, checkpoints ---------------------------------------------------------------
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

    def _option_names(self) -> set[str]:
        # torch.optim.Optimizer.__setstate__ adds 'differentiable' to defaults; it is not one of our options.
        return set(self.defaults) - {"differentiable"}

    @staticmethod
    def _param_label(group: dict[str, Any], group_index: int, position: int) -> str:
        names = group.get("param_names")
        where = f"param group {group_index}, position {position}"
        return f"parameter {names[position]!r} ({where})" if names else f"parameter at {where}"

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
        self.__dict__.setdefault("_warned", set())
        self.__dict__.setdefault("_last_step", {"trust_stats": [], "grad_norm": None})
        self._plans = {}  # not pickled (torch's __getstate__ leaves it out): the next step makes new plans

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
        _checkpoints.load_state_dict(self, state_dict)

    # -- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Each group's update runs up to the trust stage; the per-tensor sums of squares of all groups are made
        whole-tensor sums — for sharded (FSDP2, HSDP, tensor-parallel) parameters one all-reduce per process group
        they are split over, nothing otherwise — turned into trust ratios, and the updates completed. Fused groups
        of whole tensors do all that in one call.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # prepare: check every gradient before touching any state, so a bad one leaves the optimizer as it was.
        name = type(self).__name__
        gathered = [params_with_grads(name, group["params"],
                                      lambda position, g=group, i=index: self._param_label(g, i, position))
                    for index, group in enumerate(self.param_groups)]
        all_params = [param for params, _ in gathered for param in params]
        all_grads = [grad for _, grads in gathered for grad in grads]
        sharded = distributed.any_sharded(all_params)

        # GradScaler's loss scale (gradients are divided by it) and overflow flag, when it drives this step.
        loss_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        inverse_scale = None if loss_scale is None else loss_scale.double().reciprocal().float()
        # A process without gradients (a ZeRO share) still takes part in the collectives, on its parameters' device.
        device = next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
        skip = skip_flag(all_grads, found_inf, device, self.nonfinite, self.partition_group)
        self._last_step["grad_norm"] = grad_norm = None
        if (skip is not None and all(p.device.type in _gradients.HOST_READABLE for p in all_params)
                and not torch.compiler.is_compiling()):  # compiled: the flag stays a tensor, as on an accelerator
            if skip.item():  # a CPU value: no synchronisation
                self._last_step["trust_stats"] = []
                return loss
            skip = None
        step_weight = None if skip is None else (~skip).float()

        if any(group["max_grad_norm"] is not None for group in self.param_groups):
            if sharded or self.partition_group is not None:  # every process takes part, with or without gradients
                grad_norm = distributed.grad_norm(all_grads, partition_group=self.partition_group, device=device)
            elif all_grads:
                grad_norm = global_norm(real(all_grads))
            if grad_norm is not None and inverse_scale is not None:
                grad_norm = grad_norm * inverse_scale.to(grad_norm.device)
            self._last_step["grad_norm"] = grad_norm

        def grad_factor(group: dict[str, Any]) -> Tensor | None:
            """What the group's gradients are multiplied by: the global clip factor, GradScaler's 1/scale."""
            if grad_norm is None:
                return inverse_scale
            clip = clip_factor(grad_norm, group["max_grad_norm"])
            return clip if inverse_scale is None else clip * inverse_scale.to(clip.device)

        # first pass per group
        for removed in [index for index in self._plans if index >= len(self.param_groups)]:
            del self._plans[removed]  # a group taken out of param_groups: its plan would keep its tensors alive
        scratch = StepScratch()
        unplanned: list[Tensor] = []  # the parameters of groups without a plan: only they can have master copies
        stats: dict[int, TrustStats] = {}
        pending: list[tuple[int, list[Tensor], PendingUpdate]] = []
        for index, (group, (params, grads)) in enumerate(zip(self.param_groups, gathered)):
            if not params:
                continue
            plan = self._plans.pop(index, None)
            if (plan is not None and not sharded and step_weight is None and not torch.compiler.is_compiling()
                    and plan.holds(group, self.state, params)):  # the fused whole step as last time
                self._plans[index] = plan
                stats[index] = self._run_whole_step(group, params, plan.parts, grads, grad_factor(group))
                continue
            unplanned += params
            for position, param in enumerate(group["params"]):
                if param.grad is not None and not self.state[param]:
                    self.state[param] = _storage.initial_state(
                        name, group, param, self._param_label(group, index, position), self._quantized,
                        self._new_state)
            targets, target_grads = _storage.targets(self.state, params, grads)
            # State the fused kernels cannot read as stored takes the foreach path.
            fusable = all(_storage.fused_reads_state(group, self.state[p], p) for p in params)
            implementation = choose_implementation(name, group, targets, target_grads, step_weight,
                                                   fused_possible=fusable, warned=self._warned)
            if implementation == "fused" and not sharded:
                stats[index] = self._whole_step(index, group, params, targets, target_grads, grad_factor(group),
                                                scratch)
            else:
                pending.append((index, params, self._first_pass(group, params, targets, target_grads,
                                                                grad_factor(group), implementation, step_weight,
                                                                scratch)))

        # trust stage: one all-reduce of all groups' squares where tensors are sharded
        if pending:
            squares = [update.squares for _, _, update in pending]
            if sharded:
                devices, widths = [s.device for s in squares], [s.shape[1] for s in squares]
                width = max(widths)  # groups' columns may differ (Lamb's caution): zeros pad them for the sum
                packed = distributed.sum_over_shards_(
                    torch.cat([torch.nn.functional.pad(s.to(devices[0]), (0, width - s.shape[1])) for s in squares]),
                    [p for _, params, _ in pending for p in params])
                squares = [part[:, :w].to(device)
                           for part, device, w in zip(packed.split([len(s) for s in squares]), devices, widths)]
            for (index, params, update), group_squares in zip(pending, squares):
                group = self.param_groups[index]
                stats[index] = trust_stage(update, group_squares, params,
                                           lambda norms, g=group: self._update_norm(g, norms),
                                           self._trust_options(group))
        # finish
        scratch.finish(self.state, unplanned)
        self._last_step["trust_stats"] = [stats[index] for index in sorted(stats)]
        return loss

    def _path_arguments(self, params: list[Tensor], eight_bit: bool, state_as_stored: bool,
                        scratch: StepScratch) -> list[Any]:
        """The state arguments of a path function: each state key's list (float state), or each parameter's state
        dict (8-bit state: the path reads the codes and scales it needs), then the step counts."""
        if eight_bit:
            states: list[Any] = [_storage.local_states(self.state, params)]
        else:
            states = [_storage.states_of(self.state, params, key, scratch, state_as_stored)
                      for key in self._state_keys]
        return [*states, _storage.states_of(self.state, params, "step", scratch)]

    def _first_pass(self, group: dict[str, Any], params: list[Tensor], targets: list[Tensor], grads: list[Tensor],
                    grad_factor: Tensor | None, implementation: Implementation, step_weight: Tensor | None,
                    scratch: StepScratch) -> PendingUpdate:
        """The group's update up to the trust stage, by the path table's function for each storage present."""
        parts = []
        for eight_bit, positions, (some_params, some_targets, some_grads) in _storage.by_storage(
                group, params, targets, grads):
            path = self._PATHS[implementation, eight_bit]
            copies = ({"copies": _storage.copies_in_kernel(self.state, some_params, scratch)} if path.writes_copies
                      else {})
            update = path.first_pass(some_targets, some_grads,
                                     *self._path_arguments(some_params, eight_bit, path.state_as_stored, scratch),
                                     **self._options(group), grad_factor=grad_factor, step_weight=step_weight,
                                     **copies)
            parts.append((positions, update))
        return _storage.merged(len(params), parts)

    def _whole_step(self, index: int, group: dict[str, Any], params: list[Tensor], targets: list[Tensor],
                    grads: list[Tensor], grad_factor: Tensor | None, scratch: StepScratch) -> TrustStats:
        """The fused CPU kernels' whole step (trust stage included) for tensors that are whole on this process. Its
        lists are kept as the group's plan for the next steps where that is possible (torchlamb._plans)."""
        write_backs = len(scratch.write_backs)
        parts = []
        for eight_bit, positions, (some_params, some_targets) in _storage.by_storage(group, params, targets):
            path = self._PATHS["fused", eight_bit]
            arguments = [some_targets, *self._path_arguments(some_params, eight_bit, path.state_as_stored, scratch)]
            parts.append(FusedPart(positions, path, arguments))
        if len(scratch.write_backs) == write_backs and FusedPlan.possible(self.state, params):
            self._plans[index] = FusedPlan.make(group, self.state, params, parts)
        return self._run_whole_step(group, params, parts, grads, grad_factor)

    def _run_whole_step(self, group: dict[str, Any], params: list[Tensor], parts: list[FusedPart],
                        grads: list[Tensor], grad_factor: Tensor | None) -> TrustStats:
        """Each part's whole step, with the gradients at its positions; the TrustStats of ``params``."""
        results = []
        for part in parts:
            some_grads = grads if len(parts) == 1 else [grads[i] for i in part.positions]
            targets, *rest = part.arguments
            stats = part.path.whole_step(targets, some_grads, *rest, **self._options(group),
                                         grad_factor=grad_factor, trust_options=self._trust_options(group))
            results.append((part.positions, stats))
        return TrustStats(params, *_storage.merged_stats(len(params), results))
