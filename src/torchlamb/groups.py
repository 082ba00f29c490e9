"""Split a model's parameters into the groups layer-wise optimizers want: adapted and decayed, or exempt."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

# Every parameter of these modules is exempt: normalisation scales and shifts have small norms, and scaling their
# updates by ‖θ‖/‖u‖ makes the ratio unstable (You et al. 2019, "Large Batch Optimization for Deep Learning: Training
# BERT in 76 minutes").
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d and their lazy forms
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    exclude: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Return parameter groups for any ``torch.optim`` optimizer, with LAMB's exemptions applied.

    A parameter is *exempt* (``weight_decay=0`` and ``adapt=False``: no decay and no trust-ratio scaling) when it is
    a bias (its name in its module ends in ``bias``), belongs to a normalisation module (LayerNorm, GroupNorm,
    BatchNorm*, InstanceNorm*, RMSNorm), has ``ndim <= 1``, or its full name matches one of the glob patterns in
    ``exclude`` (e.g. ``"*.pos_embed"``). Every other parameter gets ``weight_decay`` and ``adapt=True``.

    Every parameter, frozen ones included, lands in exactly one group; a parameter shared by several modules (tied
    weights) appears once, under its first name, and is exempt if any of its owners makes it so. Groups carry
    ``param_names``, so optimizers and error messages can name parameters. Empty groups are left out.

    Example::

        optimizer = torchlamb.Lamb(torchlamb.param_groups(model, weight_decay=0.01), lr=1e-2)
    """
    patterns = tuple(exclude)
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of glob patterns, e.g. ('*.pos_embed',), not a string")
    exempt_ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_MODULES)
        for local_name, param in module.named_parameters(recurse=False):
            if is_norm or local_name.endswith("bias"):
                exempt_ids.add(id(param))

    decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": weight_decay, "adapt": True}
    no_decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": 0.0, "adapt": False}
    for name, param in model.named_parameters():  # yields each shared tensor once
        exempt = (
            id(param) in exempt_ids
            or param.ndim <= 1
            or any(fnmatchcase(name, pattern) for pattern in patterns)
        )
        group = no_decay if exempt else decay
        group["params"].append(param)
        group["param_names"].append(name)
    return [group for group in (decay, no_decay) if group["params"]]


def split_exempt(params: Any, exempt: str | None) -> Any:
    """``params`` (tensors, (name, tensor) pairs or groups) with each group's tensors that ``exempt`` names
    (``"ndim == 1"`` or ``"ndim <= 1"``) moved to a group right after it, with ``weight_decay=0`` and
    ``adapt=False``; unchanged when ``exempt`` is None. Used by ``Lars.from_preset`` for code bases whose LARS exempts
    tensors by their number of dimensions (Barlow Twins, VICReg, DINO: 1-D; pytorch_optimizer: up to 1-D)."""
    if exempt is None:
        return params
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of Tensors or dicts, but got Tensor")
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    is_exempt = (lambda t: t.ndim == 1) if exempt == "ndim == 1" else (lambda t: t.ndim <= 1)
    result = []
    for group in groups:
        members = group["params"]
        members = [members] if isinstance(members, Tensor) else list(members)
        names = group.get("param_names")
        kept: dict[str, Any] = {**group, "params": [], **({"param_names": []} if names is not None else {})}
        moved: dict[str, Any] = {**kept, "params": [], "weight_decay": 0.0, "adapt": False,
                                 **({"param_names": []} if names is not None else {})}
        for position, member in enumerate(members):
            tensor = member[1] if isinstance(member, tuple) else member
            target = moved if is_exempt(tensor) else kept
            target["params"].append(member)
            if names is not None:
                target["param_names"].append(names[position])
        result.extend(g for g in (kept, moved) if g["params"])
    return result
