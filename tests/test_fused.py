"""The fused CPU kernels of Lamb and Lars against the foreach path, when they are chosen, and their fallbacks.

The float64 reference tests (test_reference.py) run the fused paths on random problems as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from torchlamb import PRESETS, Lamb, Lars
from torchlamb.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the fused kernel could not be built here")


def run(params, grads_per_step, optimizer_class=Lamb, **options):
    tensors = [p.clone().requires_grad_() for p in params]
    optimizer = optimizer_class(tensors, **options)
    for grads in grads_per_step:
        for t, g in zip(tensors, grads):
            t.grad = g.clone()
        optimizer.step()
    return tensors, optimizer


def problem(dtype=torch.float32, steps=4):
    torch.manual_seed(0)
    params = [torch.randn(64, 33, dtype=dtype), torch.randn(33, dtype=dtype), torch.zeros(17, dtype=dtype),
              30 * torch.randn(2, 3, 4, dtype=dtype), torch.randn((), dtype=dtype)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    grads[1][1].zero_()  # an all-zero gradient
    return params, grads


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_foreach_for_every_preset(preset, dtype):
    params, grads = problem(dtype)
    fused, fused_opt = run(params, grads, **{**PRESETS[preset], "lr": 0.02, "max_grad_norm": 1.0, "fused": True})
    multi, multi_opt = run(params, grads, **{**PRESETS[preset], "lr": 0.02, "max_grad_norm": 1.0, "foreach": True})
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(fused, multi):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(fused_opt.trust_stats[0].trust_ratio, multi_opt.trust_stats[0].trust_ratio,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [dict(maximize=True), dict(adapt=False), dict(weight_decay=0.0),
                                     dict(decay_outside_ratio=True, weight_decay=0.1),
                                     dict(caution=True, weight_decay=0.1, maximize=True, trust_coefficient=0.5),
                                     dict(caution=True, decay_outside_ratio=True, corrected_weight_decay=True,
                                          weight_decay=0.1),
                                     dict(decay_after_step=True, weight_decay=0.1, trust_clip=(0.0, 1.0)),
                                     dict(bias_correction=False, trust_clip=(0.0, 10.0))])
def test_fused_equals_foreach_with_options(options):
    params, grads = problem()
    fused, _ = run(params, grads, lr=0.01, fused=True, **options)
    multi, _ = run(params, grads, lr=0.01, foreach=True, **options)
    for a, b in zip(fused, multi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_non_contiguous_parameters_fall_back_to_foreach_with_one_warning(optimizer_class):
    params, grads = problem()
    transposed = [params[0].t().contiguous().t()]  # same values, column-major
    with pytest.warns(RuntimeWarning, match="dense contiguous CPU tensors") as warned:
        fused, _ = run(transposed, [[g[0]] for g in grads], optimizer_class, lr=0.01, fused=True)
    assert len([w for w in warned if "contiguous" in str(w.message)]) == 1  # 4 steps, one warning
    multi, _ = run(transposed, [[g[0]] for g in grads], optimizer_class, lr=0.01, foreach=True)
    torch.testing.assert_close(fused[0], multi[0], rtol=0, atol=0)


def test_fused_and_foreach_together_are_rejected():
    with pytest.raises(ValueError, match="foreach and fused"):
        Lamb([torch.zeros(2, requires_grad=True)], foreach=True, fused=True)


LARS_OPTIONS = [dict(), dict(weight_decay=0.01), dict(weight_decay=0.01, nesterov=True),
                dict(weight_decay=0.01, denominator="split", maximize=True), dict(adapt=False, momentum=0.5),
                dict(weight_decay=0.01, trust_eps=1e-3, trust_coefficient=0.02),
                dict(weight_decay=0.1, max_grad_norm=0.5, trust_clip=(0.0, 0.5), weight_norm_clip=(0.1, 5.0))]


@pytest.mark.parametrize("options", LARS_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_lars_equals_foreach(options, dtype):
    params, grads = problem(dtype)
    fused, fused_opt = run(params, grads, Lars, lr=0.5, fused=True, **options)
    multi, multi_opt = run(params, grads, Lars, lr=0.5, foreach=True, **options)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(fused, multi):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * max(1.0, b.abs().max().item()))
    for key in ("weight_norm", "update_norm", "trust_ratio"):
        torch.testing.assert_close(getattr(fused_opt.trust_stats[0], key), getattr(multi_opt.trust_stats[0], key),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_mixed_dtypes_in_one_group(optimizer_class):
    torch.manual_seed(1)
    params = [torch.randn(40_000), torch.randn(300, dtype=torch.float64), torch.randn(500).bfloat16(),
              torch.randn(7).half()]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    fused, fused_opt = run(params, grads, optimizer_class, lr=0.01, fused=True)
    multi, multi_opt = run(params, grads, optimizer_class, lr=0.01, foreach=True)
    for a, b in zip(fused, multi):
        assert a.dtype == b.dtype
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(a.dtype, 1e-2)
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    # The norms in float64, as one parameter is (trust.norm_dtype); the bfloat16 tensor's ratio differs by ~0.3%.
    for key in ("weight_norm", "update_norm", "trust_ratio"):
        fused_stat, multi_stat = getattr(fused_opt.trust_stats[0], key), getattr(multi_opt.trust_stats[0], key)
        assert fused_stat.dtype == multi_stat.dtype == torch.float64
        torch.testing.assert_close(fused_stat, multi_stat, rtol=1e-2, atol=0)


@pytest.mark.parametrize("state_dtype", [None, "8bit"], ids=["float", "8bit"])
@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_non_contiguous_gradients_of_contiguous_parameters_give_the_same_step(optimizer_class, state_dtype):
    # The kernels read a gradient with its parameter's index: one that is not contiguous is copied first (in C++).
    torch.manual_seed(2)
    params = [torch.randn(64, 80), torch.randn(200, 300), torch.randn(33)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    column_major = [[g.t().contiguous().t() if g.dim() == 2 else g for g in step] for step in grads]
    assert not column_major[0][0].is_contiguous()
    options = dict(lr=0.01, fused=True, state_dtype=state_dtype)
    expected, _ = run(params, grads, optimizer_class, **options)
    got, _ = run(params, column_major, optimizer_class, **options)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_large_tensors_split_across_threads_match_foreach():
    # Tensors above the kernels' grain (32768 elements) are reduced in chunks; the sums must not depend on that.
    params, grads = [torch.randn(3, 70_001)], [[torch.randn(3, 70_001)] for _ in range(3)]
    for optimizer_class in (Lamb, Lars):
        fused, _ = run(params, grads, optimizer_class, lr=0.01, fused=True)
        multi, _ = run(params, grads, optimizer_class, lr=0.01, foreach=True)
        torch.testing.assert_close(fused[0], multi[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_default_picks_the_fused_kernels_on_cpu(optimizer_class, monkeypatch):
    calls = []
    name = "lamb_whole_step" if optimizer_class is Lamb else "lars_whole_step"
    original = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    params, grads = problem()
    run(params, grads[:1], optimizer_class)  # fused=None, foreach=None
    run(params, grads[:1], optimizer_class, foreach=True)
    run(params, grads[:1], optimizer_class, foreach=False)
    assert calls == [1]


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_default_falls_back_quietly_where_the_kernels_do_not_apply(optimizer_class, recwarn):
    params, grads = problem()
    transposed = [params[0].t()]  # not contiguous
    fused, _ = run(transposed, [[g[0].t()] for g in grads], optimizer_class, lr=0.01)
    multi, _ = run(transposed, [[g[0].t()] for g in grads], optimizer_class, lr=0.01, foreach=True)
    torch.testing.assert_close(fused[0], multi[0], rtol=0, atol=0)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_unbuildable_kernels_mean_foreach(optimizer_class, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)  # as after a failed build (which warned once)
    params, grads = problem()
    for options in (dict(), dict(fused=True)):
        fused, _ = run(params, grads, optimizer_class, lr=0.01, **options)
        multi, _ = run(params, grads, optimizer_class, lr=0.01, foreach=True)
        for a, b in zip(fused, multi):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_failed_build_warns_once_and_returns_none(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    cpu_kernels.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no compiler"):
            assert cpu_kernels.load() is None
        assert cpu_kernels.load() is None  # cached: no second warning, no second attempt
    finally:
        cpu_kernels.load.cache_clear()


def test_a_build_is_announced_and_timed_and_a_cached_load_is_silent(monkeypatch, tmp_path, capsys):
    import types

    import torch.utils.cpp_extension as cpp_extension

    builds = []

    def fake_load_inline(name, *, build_directory, **kwargs):  # builds once, as torch does with a warm cache
        library = Path(build_directory, f"{name}.so")
        if not library.exists():
            builds.append(name)
            library.write_bytes(b"")
        return types.SimpleNamespace()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", fake_load_inline)
    try:
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is not None
        first = capsys.readouterr().err
        cpu_kernels.load.cache_clear()  # a new process: the library is on disk now
        assert cpu_kernels.load() is not None
        second = capsys.readouterr().err
    finally:
        cpu_kernels.load.cache_clear()
    assert len(builds) == 1
    assert "building the fused CPU kernels" in first and str(tmp_path) in first
    assert re.search(r"fused CPU kernels built in \d+\.\d s", first)
    assert second == ""


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_resuming_from_a_checkpoint_is_bitwise_identical(optimizer_class):
    params, grads = problem(steps=5)
    straight, _ = run(params, grads, optimizer_class, lr=0.01, fused=True)
    first, first_opt = run(params, grads[:3], optimizer_class, lr=0.01, fused=True)
    resumed = [t.detach().clone().requires_grad_() for t in first]
    optimizer = optimizer_class(resumed, lr=0.01, fused=True)
    optimizer.load_state_dict(first_opt.state_dict())
    for step_grads in grads[3:]:
        for t, g in zip(resumed, step_grads):
            t.grad = g.clone()
        optimizer.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_loaded_state_takes_its_parameters_layout():
    # A checkpoint whose moments are laid out differently (here column-major) still feeds the fused kernels.
    params, grads = problem()
    tensors, optimizer = run(params[:1], [g[:1] for g in grads[:2]], Lamb, lr=0.01, fused=True)
    state = optimizer.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        value = state["state"][0][key]
        state["state"][0][key] = value.t().contiguous().t()
    optimizer.load_state_dict(state)
    assert all(optimizer.state[tensors[0]][key].is_contiguous() for key in ("exp_avg", "exp_avg_sq"))
    tensors[0].grad = grads[2][0].clone()
    optimizer.step()
    assert optimizer.trust_stats[0].trust_ratio.isfinite().all()


# -- Lars's lr_inside_momentum, dampening, larc_clip and zero_fallback ------------------------------------------------
# larc_clip with η = 0.3: r above the lr for some tensors and steps, below it for others; an lr of 1.5 at the first
# step, where the zero tensor's fallback r = 1 is 1/1.5 with larc_clip=True and stays 1 with "computed".
LARS_NEW_OPTIONS = dict(weight_decay=0.01, trust_coefficient=0.3, denominator="split", lr_inside_momentum=True,
                        dampening=0.3, larc_clip=True, zero_fallback="grad")
LARS_LRS = (1.5, 0.15, 0.05, 0.3, 1.0)


def lars_problem():
    """problem()'s tensors and one of 96×128 (8-bit under state_dtype="8bit"); an all-zero gradient at step 2."""
    params, grads = problem(steps=len(LARS_LRS))
    params.append(torch.randn(96, 128))
    for step_grads in grads:
        step_grads.append(torch.randn(96, 128))
    return params, grads


def run_lars_lrs(params, grads, lrs, optimizer=None, tensors=None, **options):
    """Lars steps with each step's lr; continues ``optimizer`` over ``tensors`` when given."""
    if optimizer is None:
        tensors = [p.clone().requires_grad_() for p in params]
        optimizer = Lars(tensors, lr=lrs[0], **options)
    for lr, step_grads in zip(lrs, grads):
        optimizer.param_groups[0]["lr"] = lr
        for t, g in zip(tensors, step_grads):
            t.grad = g.clone()
        optimizer.step()
    return tensors, optimizer


@pytest.mark.parametrize("larc_clip", [True, "computed"])
@pytest.mark.parametrize("state_dtype", [None, "8bit"], ids=["float", "8bit"])
def test_lars_options_in_the_sharded_phases_equal_the_whole_step_and_foreach(state_dtype, larc_clip, monkeypatch):
    """The phases of a sharded step (kNorms, the Python trust stage, kApply; here a single process whose tensors
    the step takes as sharded), the whole step (kWhole: the trust stage in C++, larc_clip and the zero fallback
    included) and foreach agree with the new Lars options and a changing lr."""
    import torchlamb.distributed

    params, grads = lars_problem()
    options = dict(LARS_NEW_OPTIONS, state_dtype=state_dtype, max_grad_norm=5.0, larc_clip=larc_clip)
    whole, whole_opt = run_lars_lrs(params, grads, LARS_LRS, fused=True, **options)
    multi, multi_opt = run_lars_lrs(params, grads, LARS_LRS, foreach=True, **options)
    name = "lars_first_pass" + ("_8bit" if state_dtype else "")
    first_pass, calls = getattr(cpu_kernels, name), []
    monkeypatch.setattr(cpu_kernels, name, lambda *args, **kw: calls.append(1) or first_pass(*args, **kw))
    monkeypatch.setattr(torchlamb.distributed, "any_sharded", lambda params: True)
    phases, phases_opt = run_lars_lrs(params, grads, LARS_LRS, fused=True, **options)
    assert len(calls) == len(LARS_LRS)
    if state_dtype:
        assert "momentum_buffer_codes" in phases_opt.state[phases[-1]]
    for a, b, c, start in zip(phases, whole, multi, params):
        if state_dtype and start.numel() >= 4096:
            # 8-bit: a ratio some float32 ulps apart (ratios in float32 in Python, float64 in kWhole), or the torch
            # operations' order, may round a buffer value to the next code; the movements agree to the bound
            # test_quantized_state holds each path to against the reference storing 8 bits.
            moved = c.detach().double() - start.double()
            for other in (a, b):
                assert float((other.detach().double() - start.double() - moved).norm() / moved.norm()) < 1e-3
            continue
        scale = max(1.0, c.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6 * scale)
    for key in ("weight_norm", "update_norm", "trust_ratio"):
        for optimizer in (phases_opt, whole_opt):
            torch.testing.assert_close(getattr(optimizer.trust_stats[0], key),
                                       getattr(multi_opt.trust_stats[0], key), rtol=1e-5, atol=0)
    ratios = multi_opt.trust_stats[0].trust_ratio
    assert (ratios == 1).any() and (ratios < 1).any()  # larc_clip: r ≥ lr for some tensors, r < lr for others


def test_lars_options_zero_fallback_reports_a_zero_denominator():
    params, grads = lars_problem()
    _, whole_opt = run_lars_lrs(params, grads[:2], LARS_LRS, fused=True, **LARS_NEW_OPTIONS)
    _, multi_opt = run_lars_lrs(params, grads[:2], LARS_LRS, foreach=True, **LARS_NEW_OPTIONS)
    for optimizer in (whole_opt, multi_opt):
        stats = optimizer.trust_stats[0]
        assert stats.update_norm[1] == 0 and stats.trust_ratio[1] == 1  # ‖g‖ = 0; λ‖θ‖ > 0
        assert (stats.update_norm[[0, 3]] > 0).all()


@pytest.mark.parametrize("state_dtype", [None, "8bit"], ids=["float", "8bit"])
def test_lars_lr_inside_and_dampening_resume_bitwise(state_dtype):
    """A state_dict round trip after 3 steps (the buffer holds lr-scaled steps; the step counts decide dampening)
    resumes bitwise identical to not stopping, on the fused kernels."""
    params, grads = lars_problem()
    options = dict(LARS_NEW_OPTIONS, state_dtype=state_dtype, fused=True)
    straight, _ = run_lars_lrs(params, grads, LARS_LRS, **options)
    first, first_opt = run_lars_lrs(params, grads[:3], LARS_LRS[:3], **options)
    resumed = [t.detach().clone().requires_grad_() for t in first]
    optimizer = Lars(resumed, lr=1.0, **options)
    optimizer.load_state_dict(first_opt.state_dict())
    run_lars_lrs(params, grads[3:], LARS_LRS[3:], optimizer, resumed)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
