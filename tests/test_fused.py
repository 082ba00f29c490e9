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
    fused, _ = run(params, grads, optimizer_class, lr=0.01, fused=True)
    multi, _ = run(params, grads, optimizer_class, lr=0.01, foreach=True)
    for a, b in zip(fused, multi):
        assert a.dtype == b.dtype
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(a.dtype, 1e-2)
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


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
