"""Lamb's and Lars's Triton kernels (torchlamb/kernels/triton_steps.py), run by Triton's interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels where no GPU is. The optimizer takes the
Triton path on CPU tensors here because the tests set ``switches.triton_on_cpu`` (on CUDA tensors it is the default).
With a GPU the same tests run compiled kernels on CUDA tensors (benchmarks/gpu_check.sh).
Checked: the float64 reference over the option matrix of test_matrix.py, the fused CPU kernels (the same arithmetic)
for float32, bfloat16 and float16 parameters, the skip flag on the device, GradScaler, zero-norm, empty and 0-dim
tensors, tensors over several chunks, determinism and a bitwise resume.
"""

from __future__ import annotations

import pytest
import torch

import torchlamb
from switches import set_skip_flag_on_device, set_triton_on_cpu
from torchlamb import Lamb, Lars, kernels
from torchlamb._storage import StepScratch

steps_module = kernels.triton_module()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(steps_module is None, reason="triton is not installed")

from test_matrix import LAMB_OPTIONS, LARS_OPTIONS, run_case  # noqa: E402

OPTIONS = {Lamb: LAMB_OPTIONS, Lars: LARS_OPTIONS}
BOTH = pytest.mark.parametrize("optimizer_class", [Lamb, Lars])


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """The dispatch sends CPU tensors to the Triton kernels; ``calls`` counts their pass-1 launches."""
    calls = []

    def counting(first_pass):
        def counted(*args, **kwargs):
            calls.append(len(args[0]))
            return first_pass(*args, **kwargs)
        return counted

    set_triton_on_cpu(monkeypatch)
    for name in ("lamb_first_pass", "lars_first_pass"):
        monkeypatch.setattr(steps_module, name, counting(getattr(steps_module, name)))
    return calls


def odd_problem(dtype=torch.float32, seed=0):
    """Tensors across chunk boundaries (BLOCK = 1024), a 0-dim one, an empty one and a zero-initialised one."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3001,), (1024,), (2, 1025), (), (0, 3), (17,)]
    params = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes]
    params[5].zero_()
    grads = [[torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes] for _ in range(3)]
    return params, grads


def make(optimizer_class, tensors, **options):
    if optimizer_class is Lars:
        return Lars(tensors, **{"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, **options})
    return Lamb(tensors, **{"lr": 0.01, "weight_decay": 0.01, **options})


def train(params, grads, optimizer_class=Lamb, **options):
    tensors = [p.clone().requires_grad_() for p in params]
    optimizer = make(optimizer_class, tensors, **options)
    for step_grads in grads:
        for tensor, grad in zip(tensors, step_grads):
            tensor.grad = grad.clone()
        optimizer.step()
    return tensors, optimizer


@pytest.mark.parametrize(("optimizer_class", "option", "dtype"),
                         [(c, option, torch.float32) for c in (Lamb, Lars) for option in OPTIONS[c]]
                         + [(Lamb, "defaults", torch.bfloat16), (Lamb, "defaults", torch.float16)], ids=str)
def test_triton_path_follows_the_float64_reference(triton_on_cpu, optimizer_class, option, dtype):
    # bfloat16 and float16 with master weights (run_case's rule): the kernels run on the float32 masters, so the
    # option matrix in float32 covers the kernels' arithmetic.
    run_case(optimizer_class, dtype, "fused", OPTIONS[optimizer_class][option],
             [{"weight_decay": 0.01}, {"weight_decay": 0.0}], DEVICE)
    assert triton_on_cpu, "the Triton kernels did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("optimizer_class", "option"), [(Lamb, "defaults"), (Lamb, "pytorch_optimizer"),
                                                         (Lamb, "deepspeed"), (Lamb, "caution"), (Lamb, "bnb"),
                                                         (Lars, "defaults"), (Lars, "nesterov_split"),
                                                         (Lars, "dampening"), (Lars, "mlperf")], ids=str)
def test_triton_path_equals_the_fused_cpu_kernels(triton_on_cpu, optimizer_class, option, dtype, monkeypatch):
    # Both compute in float32 and round each stored value once; only sums' order differs (norms, hence ratios).
    params, grads = odd_problem(dtype)
    options = OPTIONS[optimizer_class][option]
    triton, triton_optimizer = train(params, grads, optimizer_class, fused=True, **options)
    assert len(triton_on_cpu) == len(grads)
    set_triton_on_cpu(monkeypatch, False)
    params, grads = [p.cpu() for p in params], [[g.cpu() for g in step] for step in grads]
    cpu, cpu_optimizer = train(params, grads, optimizer_class, fused=True, **options)
    ulps = 0 if dtype == torch.float32 else 1  # a ratio a few float32 ulps apart may round θ the other way
    triton = [t.detach().cpu() for t in triton]
    for a, b in zip(triton, cpu):
        tolerance = (2e-6 if dtype == torch.float32 else 0) + ulps * torch.finfo(dtype).eps * b.detach().abs().float()
        assert ((a.detach().float() - b.detach().float()).abs() <= tolerance + 1e-7).all()
    # Caution's ‖u‖² is assembled from sums (k²‖a⊙M‖² + 2kλΣ(a⊙M)·θ + λ²‖θ‖²) whose float32 partials may partly
    # cancel: their order's rounding shows a little more there.
    rtol = 1e-5 if optimizer_class is Lamb and options.get("caution") else 2e-6
    for field in ("weight_norm", "update_norm", "trust_ratio"):
        torch.testing.assert_close(getattr(triton_optimizer.trust_stats[0], field).cpu(),
                                   getattr(cpu_optimizer.trust_stats[0], field), rtol=rtol, atol=0)


def test_a_non_contiguous_gradient_is_read_in_its_parameters_order(triton_on_cpu):
    weight = torch.randn(5, 7, device=DEVICE)
    grad = torch.randn(7, 5, device=DEVICE).t()  # shape (5, 7), strides of the transpose
    assert not grad.is_contiguous()
    results = []
    for options in ({}, {"foreach": True}):
        tensor = weight.clone().requires_grad_()
        tensor.grad = grad.clone() if options else grad
        Lamb([tensor], lr=0.01, **options).step()
        results.append(tensor.detach())
    assert len(triton_on_cpu) == 1
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_zero_empty_and_0dim_tensors(triton_on_cpu):
    params, grads = odd_problem()
    tensors, optimizer = train(params, grads[:1])
    stats = optimizer.trust_stats[0]
    assert stats.weight_norm[5] == 0 and stats.trust_ratio[5] == 1.0  # the zero-norm fallback at the first step
    assert tensors[4].numel() == 0 and stats.weight_norm[4] == 0 and stats.trust_ratio[4] == 1.0
    assert all(torch.isfinite(t).all() for t in tensors)
    assert not torch.equal(tensors[3], params[3])  # the 0-dim tensor moved


@BOTH
def test_two_runs_are_bitwise_equal_and_a_resume_is_bitwise_identical(triton_on_cpu, optimizer_class):
    params, grads = odd_problem()
    first, _ = train(params, grads, optimizer_class)
    second, _ = train(params, grads, optimizer_class)
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    resumed_params, optimizer = train(params, grads[:2], optimizer_class)
    copy = [p.detach().clone().requires_grad_() for p in resumed_params]
    resumed = make(optimizer_class, copy)
    resumed.load_state_dict(optimizer.state_dict())
    for tensor, grad in zip(copy, grads[2]):
        tensor.grad = grad.clone()
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(first, copy))


@BOTH
def test_a_skipped_step_changes_nothing_without_reading_the_flag(triton_on_cpu, monkeypatch, optimizer_class):
    set_skip_flag_on_device(monkeypatch)  # the flag stays a tensor, as on a GPU
    params, grads = odd_problem()
    tensors, optimizer = train(params, grads[:2], optimizer_class, nonfinite="skip")
    before = [t.detach().clone() for t in tensors]
    state = {key: value.clone() for key, value in optimizer.state[tensors[0]].items()}
    for tensor, grad in zip(tensors, grads[2]):
        tensor.grad = grad.clone()
    tensors[0].grad[7] = float("inf")
    optimizer.step()
    assert len(triton_on_cpu) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    for key, value in optimizer.state[tensors[0]].items():
        assert torch.equal(value, state[key]), key


@BOTH
def test_gradscaler_unscales_inside_the_kernel(triton_on_cpu, optimizer_class):
    params, grads = odd_problem()
    expected, _ = train(params, grads, optimizer_class, max_grad_norm=1.0)
    tensors = [p.clone().requires_grad_() for p in params]
    optimizer = make(optimizer_class, tensors, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    for step_grads in grads:
        loss = sum((t * g).sum() for t, g in zip(tensors, step_grads))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    for a, b in zip(tensors, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@BOTH
def test_a_changing_tensor_lr_is_read_from_the_device(triton_on_cpu, optimizer_class):
    params, grads = odd_problem()
    tensors = [p.clone().requires_grad_() for p in params]
    optimizer = make(optimizer_class, tensors, lr=torch.tensor(0.01, device=DEVICE))
    scheduler = torchlamb.warmup_poly(optimizer, warmup_steps=2, total_steps=6)
    foreach = [p.clone().requires_grad_() for p in params]
    reference = make(optimizer_class, foreach, lr=torch.tensor(0.01, device=DEVICE), foreach=True)
    reference_scheduler = torchlamb.warmup_poly(reference, warmup_steps=2, total_steps=6)
    for step_grads in grads:
        for a, b, grad in zip(tensors, foreach, step_grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        scheduler.step()
        reference_scheduler.step()
    assert len(triton_on_cpu) == len(grads)
    for a, b in zip(tensors, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@BOTH
def test_fused_without_triton_names_what_to_install(monkeypatch, optimizer_class):
    monkeypatch.setattr(kernels, "triton_module", lambda: None)
    params, grads = odd_problem()
    with pytest.raises(RuntimeError, match=r"triton.*torchlamb\[gpu\]"):
        train(params, grads, optimizer_class, fused=True)
    train(params, grads, optimizer_class)  # fused=None: the other paths, silently


@BOTH
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_are_written_to_the_parameters_inside_pass_2(triton_on_cpu, optimizer_class, dtype,
                                                                   monkeypatch):
    """Pass 2 writes the low-precision parameter from its updated float32 master, rounded to nearest even (bit
    operations for bfloat16: the interpreter's cast truncates), and the step copies nothing afterwards."""
    copied = []
    finish = StepScratch.finish
    monkeypatch.setattr(StepScratch, "finish", lambda self, state, params: copied.extend(
        p for p in params if "master" in state[p] and id(p) not in self.written_in_kernel) or finish(self, state,
                                                                                                   params))
    params, grads = odd_problem(dtype)
    tensors, optimizer = train(params, grads, optimizer_class, fused=True, master_weights=True)
    assert len(triton_on_cpu) == len(grads) and not copied
    for tensor in tensors:
        master = optimizer.state[tensor]["master"]
        assert tensor.dtype == dtype and torch.equal(tensor.detach(), master.to(dtype))
    assert any(not torch.equal(t.detach(), p) for t, p in zip(tensors, params))


@BOTH
def test_8bit_state_in_the_kernels_equals_the_torch_operations(triton_on_cpu, monkeypatch, optimizer_class):
    """state_dtype="8bit" on the Triton path (codes and scales read and written in the kernels, one program per
    block) against the torch operations on the same device: Lamb's codes and scales equal after one step from zero
    state (its moments do not depend on the ratio), and the parameters within float rounding after three steps."""
    name = "lamb_first_pass_8bit" if optimizer_class is Lamb else "lars_first_pass_8bit"
    first_pass, calls = getattr(steps_module, name), []
    monkeypatch.setattr(steps_module, name, lambda *args, **kw: calls.append(1) or first_pass(*args, **kw))
    options = dict(lr=0.01, weight_decay=0.01) if optimizer_class is Lamb else dict(lr=1.0, trust_coefficient=0.02)
    generator = torch.Generator().manual_seed(5)
    shapes = [(16, 300), (17, 256), (128,)]  # rows of 300: blocks of 256 and 44; a 1-D tensor in float state
    params = [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    results = []
    for path in (dict(fused=True), dict(foreach=True)):
        tensors = [p.to(DEVICE).requires_grad_() for p in params]
        optimizer = optimizer_class(tensors, state_dtype="8bit", **options, **path)
        for step, step_grads in enumerate(grads):
            for tensor, grad in zip(tensors, step_grads):
                tensor.grad = grad.to(DEVICE)
            optimizer.step()
            if step == 0:
                first = {key: value.clone() for key, value in optimizer.state[tensors[0]].items()
                         if key.endswith(("_codes", "_absmax"))}
        results.append((first, [t.detach().cpu() for t in tensors]))
    assert len(calls) == 3  # the Triton run's three steps; the foreach run took torch operations
    (kernel_state, kernel_params), (torch_state, torch_params) = results
    assert kernel_state.keys() == torch_state.keys() and kernel_state
    if optimizer_class is Lamb:
        for key, value in kernel_state.items():
            assert torch.equal(value, torch_state[key]), key
    for a, b in zip(kernel_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state_dtype", [None, "8bit"], ids=["float", "8bit"])
def test_lars_pass_2_reads_gradients_that_are_still_alive(state_dtype, monkeypatch):
    # Lars's pass 2 reads the gradients again. bfloat16 gradients of float32 masters are float32 copies made for the
    # step: each group's copies must live until its pass 2, after every group's pass 1. Two groups of the same
    # shapes: a freed copy's memory goes to the next group's copies, whose gradients pass 2 would then read.
    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 96), (40,)]
    params = [torch.randn(shape, generator=generator).to(DEVICE, torch.bfloat16) for shape in shapes * 2]
    grads = [[torch.randn(p.shape, generator=generator).to(DEVICE, torch.bfloat16) for p in params]
             for _ in range(2)]

    def run(**path):
        tensors = [p.clone().requires_grad_() for p in params]
        groups = [dict(params=tensors[:2]), dict(params=tensors[2:], weight_decay=0.0)]
        optimizer = Lars(groups, lr=0.5, weight_decay=0.01, master_weights=True, state_dtype=state_dtype, **path)
        for step_grads in grads:
            for tensor, grad in zip(tensors, step_grads):
                tensor.grad = grad.clone()
            optimizer.step()
        return [optimizer.state[t]["master"] for t in tensors]

    triton = run(fused=True)
    set_triton_on_cpu(monkeypatch, False)
    for a, b in zip(triton, run(foreach=True)):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6)


def test_lars_lr_inside_and_dampening_resume_bitwise_with_a_changing_lr(triton_on_cpu):
    # The buffer holds lr-scaled steps and the dampening factor comes from the step counts on the device: a
    # state_dict round trip after 2 steps resumes bitwise identical to not stopping.
    params, grads = odd_problem()
    options = dict(lr_inside_momentum=True, dampening=0.3, larc_clip=True, zero_fallback="grad",
                   trust_coefficient=0.3)
    lrs = (0.5, 0.1, 1.0)

    def steps(tensors, optimizer, lrs, step_grads):
        for lr, gs in zip(lrs, step_grads):
            optimizer.param_groups[0]["lr"] = lr
            for tensor, grad in zip(tensors, gs):
                tensor.grad = grad.clone()
            optimizer.step()

    straight = [p.clone().requires_grad_() for p in params]
    steps(straight, make(Lars, straight, **options), lrs, grads)
    first = [p.clone().requires_grad_() for p in params]
    first_optimizer = make(Lars, first, **options)
    steps(first, first_optimizer, lrs[:2], grads[:2])
    resumed = [t.detach().clone().requires_grad_() for t in first]
    optimizer = make(Lars, resumed, **options)
    optimizer.load_state_dict(first_optimizer.state_dict())
    steps(resumed, optimizer, lrs[2:], grads[2:])
    assert len(triton_on_cpu) == 6
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
