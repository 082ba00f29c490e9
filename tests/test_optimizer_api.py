"""Lamb and Lars follow torch.optim's conventions; bad input fails early and clearly without corrupting state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchlamb import Lamb, Lars, param_groups
from torchlamb._dispatch import choose_implementation
from torchlamb.kernels import cpu as cpu_kernels

# foreach=None (with fused=None) is the default: the fused kernels on the CPU.
IMPLEMENTATIONS = pytest.mark.parametrize("foreach", [False, True, None], ids=["single_tensor", "foreach", "default"])
OPTIMIZERS = pytest.mark.parametrize("optimizer_class", [Lamb, Lars])


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def train(model, optimizer, steps: int, seed: int = 0, scheduler=None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_tensors(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict())


def assert_same_state_dict(a, b) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for name in a["state"][key]:
            assert torch.equal(a["state"][key][name], b["state"][key][name])


# -- torch.optim conventions ---------------------------------------------------------------------------------------


@IMPLEMENTATIONS
@OPTIMIZERS
def test_state_dict_round_trip_resumes_bitwise(optimizer_class, foreach):
    model = make_model()
    optimizer = optimizer_class(param_groups(model), lr=1e-2, max_grad_norm=1.0, trust_clip=(0.0, 10.0),
                                foreach=foreach)
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, 4, seed=1)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optimizer_class(param_groups(resumed_model), foreach=foreach)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[0]["trust_clip"] == (0.0, 10.0)
    assert_same_state_dict(resumed.state_dict(), checkpoint["optimizer"])
    train(resumed_model, resumed, 4, seed=1)
    assert_same_tensors(model.parameters(), resumed_model.parameters())


@pytest.mark.parametrize(("optimizer_class", "keys"), [(Lamb, {"exp_avg", "exp_avg_sq"}), (Lars, {"momentum_buffer"})])
def test_state_holds_step_tensor_and_its_buffers(optimizer_class, keys):
    model = make_model()
    optimizer = optimizer_class(model.parameters())
    train(model, optimizer, 2)
    for p in model.parameters():
        state = optimizer.state[p]
        assert set(state) == {"step", *keys}
        assert isinstance(state["step"], torch.Tensor) and state["step"].item() == 2
        assert all(state[key].shape == p.shape for key in keys)


@OPTIMIZERS
def test_trust_stats_are_not_saved(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters())
    train(model, optimizer, 1)
    assert optimizer.trust_stats and "trust_stats" not in optimizer.state_dict()
    assert optimizer.trust_stats[0].params == list(model.parameters())


@IMPLEMENTATIONS
@OPTIMIZERS
def test_maximize_equals_minimizing_the_negated_gradient(optimizer_class, foreach):
    torch.manual_seed(0)
    start = torch.randn(5, 4)
    grads = [torch.randn(5, 4) for _ in range(3)]
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_a = optimizer_class([a], lr=0.1, maximize=True, foreach=foreach)
    opt_b = optimizer_class([b], lr=0.1, foreach=foreach)
    for g in grads:
        a.grad, b.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@IMPLEMENTATIONS
@OPTIMIZERS
def test_params_without_grad_are_skipped(optimizer_class, foreach):
    used, unused = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    before = unused.detach().clone()
    optimizer = optimizer_class([used, unused], foreach=foreach)
    used.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(unused.detach(), before) and unused not in optimizer.state
    assert optimizer.trust_stats[0].params == [used]


@OPTIMIZERS
def test_zero_grad_clears_gradients(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters())
    train(model, optimizer, 1)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@OPTIMIZERS
def test_lr_schedulers_drive_the_learning_rate(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step >= 2 else 1.0)
    train(model, optimizer, 2, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, 2, scheduler=scheduler)  # lr = 0: nothing moves
    assert_same_tensors(frozen, model.parameters())

    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer_class(model.parameters(), lr=0.1), T_max=10)
    cosine.optimizer.zero_grad()
    for _ in range(5):
        cosine.optimizer.step()
        cosine.step()
    assert cosine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@IMPLEMENTATIONS
@OPTIMIZERS
def test_tensor_lr_equals_float_lr(optimizer_class, foreach):
    models = [make_model(), make_model()]
    train(models[0], optimizer_class(models[0].parameters(), lr=0.02, foreach=foreach), 3)
    train(models[1], optimizer_class(models[1].parameters(), lr=torch.tensor(0.02), foreach=foreach), 3)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


@OPTIMIZERS
def test_add_param_group_with_its_own_options(optimizer_class):
    first, second = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    optimizer = optimizer_class([first], lr=0.1)
    optimizer.add_param_group({"params": [second], "lr": 0.0, "adapt": False})
    assert optimizer.param_groups[1]["weight_decay"] == optimizer.defaults["weight_decay"]  # defaults fill in
    before = second.detach().clone()
    first.grad, second.grad = torch.ones(4, 4), torch.ones(4, 4)
    optimizer.step()
    assert torch.equal(second.detach(), before)  # lr 0
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [torch.randn(2, requires_grad=True)], "lr": -1.0})
    assert len(optimizer.param_groups) == 2


@OPTIMIZERS
def test_implementation_choice(optimizer_class):  # the choice lives in torchlamb._dispatch
    params = [torch.zeros(1, requires_grad=True), torch.zeros(2, requires_grad=True)]
    grads = [torch.zeros(1), torch.zeros(2)]

    def chosen(**options):
        optimizer = optimizer_class(params, **options)
        return choose_implementation(optimizer_class.__name__, optimizer.param_groups[0], params, grads)

    assert chosen(foreach=True) == "foreach"
    assert chosen(foreach=False) == "single_tensor"
    if cpu_kernels.load() is not None:
        assert chosen() == "fused"  # dense CPU tensors: the fused kernels by default
        assert chosen(fused=True) == "fused"
    assert chosen(fused=False) == "foreach"  # foreach=None: one device


@IMPLEMENTATIONS
@OPTIMIZERS
def test_max_grad_norm_scales_gradients_without_touching_them(optimizer_class, foreach):
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(7)]
    grads = [torch.randn(4, 3) * 10, torch.randn(7) * 10]
    total = torch.cat([g.flatten() for g in grads]).norm()
    clipped = [p.clone().requires_grad_() for p in start]
    manual = [p.clone().requires_grad_() for p in start]
    opt_clipped = optimizer_class(clipped, max_grad_norm=1.0, foreach=foreach)
    opt_manual = optimizer_class(manual, foreach=foreach)
    for p, g in zip(clipped, grads):
        p.grad = g.clone()
    for p, g in zip(manual, grads):
        p.grad = g / total
    opt_clipped.step()
    opt_manual.step()
    for p, g in zip(clipped, grads):
        assert torch.equal(p.grad, g)  # p.grad is never rescaled in place
    torch.testing.assert_close(opt_clipped.grad_norm, total)
    for a, b in zip(clipped, manual):
        torch.testing.assert_close(a, b)
    for p, m in zip(clipped, manual):  # the state saw the clipped gradient
        for key in optimizer_class._state_keys:
            torch.testing.assert_close(opt_clipped.state[p][key], opt_manual.state[m][key])


class _HostSyncDetector(TorchDispatchMode):
    """Records every op that copies a tensor value to the host (item(), bool(), float(), if tensor: ...)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


# The paths that also run on accelerators; the fused kernels run on the CPU only, where reading a value is free.
@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@OPTIMIZERS
def test_step_never_reads_device_values_on_the_host(optimizer_class, foreach):
    model = make_model()
    optimizer = optimizer_class(param_groups(model), lr=torch.tensor(0.01), max_grad_norm=0.5,
                                weight_norm_clip=(0.0, 10.0), trust_clip=(0.0, 10.0), maximize=True, foreach=foreach)
    train(model, optimizer, 1)
    model(torch.randn(8, 6)).sum().backward()
    with _HostSyncDetector() as detector:
        optimizer.step()
    assert detector.syncs == []
    # The detector works: it does see an explicit read.
    with _HostSyncDetector() as detector:
        optimizer.trust_stats[0].trust_ratio[0].item()
    assert detector.syncs


@pytest.mark.parametrize("path", ["single_tensor", "foreach", "triton"])
def test_lars_options_with_a_tensor_lr_never_read_device_values_on_the_host(path, monkeypatch):
    # larc_clip divides by the tensor lr, the lr inside the momentum multiplies the buffer's increment and dampening
    # reads the step counts: all on the device. "triton": its kernels in Triton's interpreter on CPU tensors.
    calls = []
    if path == "triton":
        from switches import set_triton_on_cpu
        from torchlamb import kernels

        module = kernels.triton_module()
        if module is None:
            pytest.skip("triton is not installed")
        set_triton_on_cpu(monkeypatch)
        first_pass = module.lars_first_pass
        monkeypatch.setattr(module, "lars_first_pass", lambda *args, **kw: calls.append(1) or first_pass(*args, **kw))
    model = make_model()
    lr = torch.tensor(0.5)
    optimizer = Lars(param_groups(model), lr=lr, weight_decay=0.01, trust_coefficient=0.3, denominator="split",
                     lr_inside_momentum=True, dampening=0.2, larc_clip=True, zero_fallback="grad",
                     max_grad_norm=0.5, **({"foreach": path == "foreach"} if path != "triton" else {"fused": True}))
    train(model, optimizer, 1)
    lr.fill_(0.2)
    model(torch.randn(8, 6)).sum().backward()
    with _HostSyncDetector() as detector:
        optimizer.step()
    assert detector.syncs == []
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())
    assert len(calls) == (4 if path == "triton" else 0)  # two groups (param_groups), two steps


@OPTIMIZERS
def test_amp_grad_scaler_default_unscale_path_skips_overflow(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 6)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.parameters())

    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(optimizer)  # overflow: GradScaler skips the step
    scaler.update()
    assert_same_tensors(before, model.parameters())
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.parameters())


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_norm_clip": (2.0, 1.0)}, "weight_norm_clip"),
        ({"weight_norm_clip": (-1.0, 1.0)}, "weight_norm_clip"),
        ({"trust_clip": (0.0, -10.0)}, "trust_clip"),
        ({"trust_clip": 10.0}, "trust_clip"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"bias_correction": "yes"}, "bias_correction"),
        ({"foreach": 1}, "foreach"),
    ],
)
def test_bad_hyperparameters_are_rejected_by_name(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        Lamb([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -0.1}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.5}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"nesterov": None}, "nesterov"),
        ({"denominator": "sum"}, "denominator"),
        ({"trust_clip": (1.0, 0.5)}, "trust_clip"),
        ({"max_grad_norm": -2.0}, "max_grad_norm"),
    ],
)
def test_bad_lars_hyperparameters_are_rejected_by_name(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        Lars([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_a_tensor_lr_of_two_elements_is_refused_in_torchs_words(optimizer_class):
    # The message says what torch's optimizers say (torch's optimizer test suite matches this text); it changed
    # from "lr as a Tensor must hold one real value", which it still contains.
    with pytest.raises(ValueError, match="Tensor lr must be 1-element") as raised:
        optimizer_class([torch.zeros(2, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))
    assert "lr as a Tensor must hold one real value, got shape (2,)" in str(raised.value)


def test_bad_group_option_names_the_group():
    with pytest.raises(ValueError, match=r"eps.*param group 1"):
        Lamb([{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(2, requires_grad=True)], "eps": -1.0}])


@OPTIMIZERS
def test_a_real_gradient_on_a_complex_parameter_is_rejected(optimizer_class):
    param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    optimizer = optimizer_class([param])
    param.grad = torch.zeros(3, dtype=torch.complex64)
    optimizer.step()
    param.grad_dtype = None  # torch itself refuses a gradient of another dtype unless told to allow it
    param.grad = torch.zeros(3)
    with pytest.raises(TypeError, match="complex"):
        optimizer.step()


@IMPLEMENTATIONS
@OPTIMIZERS
def test_sparse_gradient_is_rejected_and_leaves_state_untouched(optimizer_class, foreach):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Linear(4, 1)
    optimizer = optimizer_class(list(dense.parameters()) + list(embedding.parameters()), foreach=foreach)
    dense(embedding(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in dense.parameters()]
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
    assert len(optimizer.state) == 0  # the dense parameters listed first were not stepped either
    assert_same_tensors(before, dense.parameters())


def _trained_state():
    model = make_model()
    optimizer = Lamb(model.named_parameters(), lr=1e-2)
    train(model, optimizer, 2)
    return model, optimizer


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3)), r"'0\.weight'.*shape"),
        (lambda sd: sd["state"][1].__setitem__("exp_avg_sq", sd["state"][1]["exp_avg_sq"].double()),
         r"'0\.bias'.*dtype"),
        (lambda sd: sd["state"][2].pop("exp_avg"), r"'1\.weight'.*keys"),
        (lambda sd: sd["state"][2].__setitem__("momentum_buffer", torch.zeros(16)), r"'1\.weight'.*keys"),
        (lambda sd: sd["state"][3].__setitem__("step", torch.zeros(2)), r"'1\.bias'.*step"),
        (lambda sd: sd["state"].__setitem__(99, {}), "99"),
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters"),
        (lambda sd: sd["param_groups"][0].__setitem__("betas", (2.0, 0.9)), "betas"),
        (lambda sd: sd["param_groups"][0].__setitem__("eps", 0.0), "eps"),
        (lambda sd: (sd["param_groups"][0].pop("maximize"), sd["param_groups"][0].__setitem__("eps", 0.0)),
         "eps"),  # a missing option is filled in, a bad one still refused
        (lambda sd: sd.pop("state"), "state"),
    ],
)
def test_mismatched_checkpoint_is_rejected_and_optimizer_unchanged(corrupt, message):
    model, optimizer = _trained_state()
    checkpoint = snapshot(optimizer)
    corrupt(checkpoint)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(checkpoint)
    assert_same_state_dict(optimizer.state_dict(), before)
    train(model, optimizer, 1)  # and it still works


def test_checkpoint_from_another_model_is_rejected():
    _, optimizer = _trained_state()
    other = torch.nn.Linear(6, 16)
    other_optimizer = Lamb(other.parameters())
    train_step = other(torch.randn(2, 6)).sum()
    train_step.backward()
    other_optimizer.step()
    with pytest.raises(ValueError, match="param group 0 has 2 parameters"):
        optimizer.load_state_dict(other_optimizer.state_dict())


def test_checkpoint_of_another_optimizer_is_rejected():
    model = make_model()
    lars = Lars(model.parameters())
    train(model, lars, 1)
    lamb = Lamb(model.parameters())
    # Lamb fills the options Lars's groups lack (as for an older checkpoint), but refuses Lars's state.
    with pytest.raises(ValueError, match=r"keys \['momentum_buffer', 'step'\], expected \['exp_avg'"):
        lamb.load_state_dict(lars.state_dict())
    assert len(lamb.state) == 0


@IMPLEMENTATIONS
@pytest.mark.parametrize("bias_correction", [True, False, "step_size"])
def test_float32_parameters_keep_float32_updates(foreach, bias_correction):
    """The float64 bias corrections must not promote a float32 update to float64: a 0-dim parameter's would be."""
    params = [torch.randn(4, 3, requires_grad=True), torch.randn((), requires_grad=True)]
    optimizer = Lamb(params, bias_correction=bias_correction, foreach=foreach)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    stats = optimizer.trust_stats[0]
    assert stats.weight_norm.dtype == stats.update_norm.dtype == stats.trust_ratio.dtype == torch.float32
    assert all(p.dtype == optimizer.state[p]["exp_avg"].dtype == torch.float32 for p in params)
