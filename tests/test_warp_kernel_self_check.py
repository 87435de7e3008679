"""The CUDA kernels' self-check (warp_kernel.self_check), on the CUDA extension run on CPU threads:
a right kernel passes and is used; a planted wrong one (a value, or a gradient) is replaced by
the pure-PyTorch op with one warning under "auto" and refused under "cuda"; the check runs once
per op and dtype, not per call, and WARP_KERNEL_SELF_CHECK=0 turns it off."""

import collections
import warnings

import pytest
import torch

import warp_kernel
from warp_kernel import self_check
from warp_kernel.testing import make_inputs, run_flow_warp, run_warp_ssim

SHAPE = (2, 3, 20, 17)


class Planted:
    """The emulated CUDA extension under another name, counting the calls of its functions, with
    `faults` altering some results: {function name: fn(outputs) -> outputs}."""

    def __init__(self, emu, name, faults=None):
        self.__name__ = f"warp_kernel_cuda_{name}"  # the prefix marks the CUDA kernels
        self.emu, self.faults = emu, faults or {}
        self.calls = collections.Counter()

    def __getattr__(self, attr):
        function = getattr(self.emu, attr)

        def call(*args):
            self.calls[attr] += 1
            out = function(*args)
            return self.faults[attr](out) if attr in self.faults else out

        return call


def value_off(out):
    """The warped image 0.1% too bright."""
    return out * 1.001


def flow_gradient_off(outputs):
    """warp_ssim's flow gradient 1% too large (the SSIM and the warped image are right)."""
    ssim, warped, unit_warped, unit_flow, unit_ref = outputs
    if unit_flow is not None:
        unit_flow = unit_flow * 1.01
    return ssim, warped, unit_warped, unit_flow, unit_ref


@pytest.fixture
def fresh(monkeypatch):
    """No verdict yet, the check on, and every self-check counted by (op, dtype)."""
    monkeypatch.setattr(warp_kernel, "_verdicts", {})
    monkeypatch.setattr(warp_kernel, "_warned", set())
    monkeypatch.delenv(warp_kernel.SELF_CHECK_ENV, raising=False)
    monkeypatch.delenv(warp_kernel.IMPL_ENV, raising=False)
    checks = collections.Counter()
    run = self_check.run

    def counted(op, ext, dtype, device):
        checks[op, dtype] += 1
        return run(op, ext, dtype, device)

    monkeypatch.setattr(self_check, "run", counted)
    return checks


@pytest.fixture
def install(emu, fresh, monkeypatch):
    """install(name, faults) -> the Planted module that impl="auto" and impl="cuda" run on CPU
    tensors."""

    def put(name, faults=None):
        planted = Planted(emu, name, faults)
        resolve = warp_kernel._resolve
        monkeypatch.setattr(
            warp_kernel,
            "_resolve",
            lambda impl, device: planted if impl in ("auto", "cuda") else resolve(impl, device),
        )
        return planted

    return put


def test_a_right_kernel_passes_and_is_used(install, fresh):
    install("right")
    img, flow, ref, grad = make_inputs(SHAPE, seed=1)
    for dtype in (torch.float32, torch.float64):
        inputs = [t.to(dtype) for t in (img, flow, ref, grad)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = run_warp_ssim("auto", *inputs[:3], "border", inputs[3], (True, True, True), True)
            got += run_flow_warp("auto", inputs[0], inputs[1], inputs[3], "reflection")
            got += (warp_kernel.ssim(inputs[0], inputs[2]),)
        assert fresh == {(op, dtype): 1 for op in ("warp_ssim", "flow_warp", "ssim")}
        fresh.clear()
        # the same launches with the check off: the same bits
        with pytest.MonkeyPatch.context() as m:
            m.setenv(warp_kernel.SELF_CHECK_ENV, "0")
            want = run_warp_ssim("auto", *inputs[:3], "border", inputs[3], (True, True, True), True)
            want += run_flow_warp("auto", inputs[0], inputs[1], inputs[3], "reflection")
            want += (warp_kernel.ssim(inputs[0], inputs[2]),)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert all(verdict is None for verdict in warp_kernel._verdicts.values())


def test_a_wrong_value_warns_once_and_the_reference_takes_over(install, fresh):
    planted = install("value_off", {"flow_warp_forward": value_off})
    img, flow, ref, grad = make_inputs(SHAPE, seed=2)
    want = run_flow_warp("torch", img, flow, grad, "border")
    with pytest.warns(RuntimeWarning) as caught:
        got = run_flow_warp("auto", img, flow, grad, "border")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "warp_kernel.flow_warp in float32" in message
    assert "warped image (border): Mismatched elements" in message
    assert "Greatest absolute difference" in message
    assert "WARP_KERNEL_SELF_CHECK=0" in message
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    calls = planted.calls["flow_warp_forward"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for _ in range(2):
            got = run_flow_warp("auto", img, flow, grad, "border")
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        # the other ops passed theirs and keep the kernel
        run_warp_ssim("auto", img, flow, ref, "border", grad, (False, True, False), True)
    assert planted.calls["flow_warp_forward"] == calls
    assert planted.calls["warp_ssim_forward"] > 0
    assert fresh == {("flow_warp", torch.float32): 1, ("warp_ssim", torch.float32): 1}


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_wrong_gradient_is_found_under_no_grad_too(install, fresh, mode):
    """The first call needs no gradient, the check computes one anyway; the caller's random state
    is left as it was."""
    install("flow_gradient_off", {"warp_ssim_forward": flow_gradient_off})
    img, flow, ref, grad = make_inputs(SHAPE, seed=3)
    rng = torch.get_rng_state()
    with mode(), pytest.warns(RuntimeWarning, match=r"warp_ssim in float32 .*d ssim / d flow"):
        s, warped = warp_kernel.warp_ssim(img, flow, ref)
    assert torch.equal(torch.get_rng_state(), rng)
    want = warp_kernel.warp_ssim(img, flow, ref, impl="torch")
    assert torch.equal(s, want[0]) and torch.equal(warped, want[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for needs, use_warped in [((False, True, False), False), ((True, True, True), True)]:
            got = run_warp_ssim("auto", img, flow, ref, "reflection", grad, needs, use_warped)
            want = run_warp_ssim("torch", img, flow, ref, "reflection", grad, needs, use_warped)
            for a, b in zip(got, want):
                assert (a is None and b is None) or torch.equal(a, b)
    assert fresh == {("warp_ssim", torch.float32): 1}


def test_cuda_asked_for_by_name_falls_back_too_and_says_so(install, fresh, monkeypatch):
    """impl="cuda" (or WARP_KERNEL_IMPL=cuda) gets the reference's result too, with one warning
    that names the request; the check runs once."""
    install("flow_gradient_off", {"warp_ssim_forward": flow_gradient_off})
    img, flow, ref, _ = make_inputs(SHAPE, seed=4)
    flow.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"although impl='cuda' asks for the kernel") as seen:
        s, _ = warp_kernel.warp_ssim(img, flow, ref, impl="cuda")
        (got,) = torch.autograd.grad(s.sum(), flow)
    assert len(seen) == 1
    s_ref, _ = warp_kernel.warp_ssim(img, flow, ref, impl="torch")
    (want,) = torch.autograd.grad(s_ref.sum(), flow)
    assert torch.allclose(got, want, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv(warp_kernel.IMPL_ENV, "cuda")
        warp_kernel.warp_ssim(img, flow.detach(), ref)  # the verdict stands: no second warning
        warp_kernel.flow_warp(img, flow.detach(), impl="cuda")  # a right op runs
    assert fresh == {("warp_ssim", torch.float32): 1, ("flow_warp", torch.float32): 1}


def test_the_environment_variable_turns_the_check_off(install, fresh, monkeypatch):
    planted = install("value_off", {"flow_warp_forward": value_off})
    img, flow, _, _ = make_inputs(SHAPE, seed=5)
    monkeypatch.setenv(warp_kernel.SELF_CHECK_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = warp_kernel.flow_warp(img, flow)
    assert torch.equal(got, planted.emu.flow_warp_forward(img, flow, 0) * 1.001)
    assert not fresh and not warp_kernel._verdicts
    monkeypatch.setenv(warp_kernel.SELF_CHECK_ENV, "no")
    with pytest.raises(ValueError, match="WARP_KERNEL_SELF_CHECK='no' is not 0"):
        warp_kernel.flow_warp(img, flow)


def test_the_check_runs_once_per_op_and_dtype(install, fresh):
    """Not per call: later calls run the kernel once each and nothing else. float16 computes in
    float32, so it is float32's check that covers it."""
    planted = install("right")
    img, flow, ref, _ = make_inputs(SHAPE, seed=6)
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float16):
        i, f, r = (t.to(dtype) for t in (img, flow, ref))
        for _ in range(3):
            before = planted.calls.copy()
            warp_kernel.flow_warp(i, f)
            warp_kernel.ssim(i, r)
            warp_kernel.warp_ssim(i, f, r)
        calls = planted.calls - before
        assert calls == {"flow_warp_forward": 1, "ssim_forward": 1, "warp_ssim_forward": 1}
    ops = ("flow_warp", "ssim", "warp_ssim")
    assert fresh == {(op, d): 1 for op in ops for d in (torch.float32, torch.float64)}


def test_other_backends_are_not_checked(fresh):
    img, flow, ref, _ = make_inputs(SHAPE, seed=7)
    for impl in ("torch",) + (("cpp",) if warp_kernel.backends()["cpp"] else ()):
        warp_kernel.warp_ssim(img, flow, ref, impl=impl)
        warp_kernel.flow_warp(img, flow, impl=impl)
    assert not fresh and not warp_kernel._verdicts


def test_a_compiled_step_checks_at_trace_time_and_uses_the_reference(install, fresh):
    """torch.compile runs the check outside the graph, once, and the graph takes the verdict:
    the pure-PyTorch op in place of the wrong kernel."""
    install("flow_gradient_off", {"warp_ssim_forward": flow_gradient_off})
    img, flow, ref, _ = make_inputs(SHAPE, seed=8)
    torch._dynamo.reset()

    def step(f, impl):
        s, warped = warp_kernel.warp_ssim(img, f, ref, impl=impl)
        return s.sum() + warped.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    f = flow.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="warp_ssim in float32"):
        got = compiled(f, "auto")
    (got_grad,) = torch.autograd.grad(got, f)
    want = step(f, "torch")
    (want_grad,) = torch.autograd.grad(want, f)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert fresh == {("warp_ssim", torch.float32): 1}


def test_no_check_under_fake_tensors(install, fresh):
    """A trace with fake tensors (torch.export, make_fx) cannot run the check: it leaves it to
    the next eager call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    install("right")
    img, flow, ref, _ = make_inputs(SHAPE, seed=9)
    with FakeTensorMode() as mode:
        s, _ = warp_kernel.warp_ssim(*(mode.from_tensor(t) for t in (img, flow, ref)))
    assert s.shape == (2,) and not fresh
    warp_kernel.warp_ssim(img, flow, ref)
    assert fresh == {("warp_ssim", torch.float32): 1}
