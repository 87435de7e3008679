"""warp_kernel's extension calls as torch.library custom ops: torch.compile traces an attack's
warp + SSIM in one graph, with the eager results and gradients."""

import pytest
import torch
from torch.library import opcheck

import warp_kernel


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img, ref = (torch.rand(2, 3, 24, 20, generator=g, dtype=dtype) for _ in range(2))
    flow = 2 * torch.randn(2, 2, 24, 20, generator=g, dtype=dtype)
    return img, flow, ref


def step(img, flow, ref, impl):
    """Every op, with both outputs of warp_ssim used, as one scalar."""
    s, warped = warp_kernel.warp_ssim(img, flow, ref, impl=impl)
    loss = s.sum() + (warped * ref).mean() + warp_kernel.ssim(warped, ref, impl=impl).sum()
    return loss + warp_kernel.flow_warp(img, flow, impl=impl).square().mean()


def value_and_grads(fn, tensors):
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return [out.detach()] + [t.grad for t in tensors]


def compiled_backends():
    return ["torch"] + (["cpp"] if warp_kernel.backends()["cpp"] else [])


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_a_compiled_step_is_one_graph_with_the_eager_results(impl):
    if impl not in compiled_backends():
        pytest.skip("the C++ extension is unavailable here")
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: step(*t, impl), fullgraph=True, backend="aot_eager")
    got = value_and_grads(fn, inputs())
    want = value_and_grads(lambda *t: step(*t, impl), inputs())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_only_the_flow_gradient_compiles_as_uad_asks_it():
    if "cpp" not in compiled_backends():
        pytest.skip("the C++ extension is unavailable here")
    torch._dynamo.reset()
    img, flow, ref = inputs(1, torch.float32)
    fn = torch.compile(
        lambda f: warp_kernel.warp_ssim(img, f, img, impl="cpp")[0].sum(),
        fullgraph=True,
        backend="aot_eager",
    )
    flow = flow.requires_grad_(True)
    (got,) = torch.autograd.grad(fn(flow), flow)
    (want,) = torch.autograd.grad(warp_kernel.warp_ssim(img, flow, img, impl="cpp")[0].sum(), flow)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_ops_declare_their_shapes_and_gradients_correctly():
    """torch.library.opcheck: the schema, the fake (shape-only) implementations against the
    real ones, the autograd registration and the AOT dispatch, for every op and grad request."""
    if "cpp" not in compiled_backends():
        pytest.skip("the C++ extension is unavailable here")
    ext = warp_kernel._extension("cpp", "cpu")
    img, flow, ref = inputs(2)
    for want in [(False, True, False), (True, True, True)]:
        args = [t.clone().requires_grad_(w) for t, w in zip((img, flow, ref), want)]
        opcheck(torch.ops.warp_kernel.warp_ssim.default, (*args, 0, 1.0, *want, ext))
        opcheck(torch.ops.warp_kernel.flow_warp.default, (*args[:2], 1, ext))
        opcheck(torch.ops.warp_kernel.ssim.default, (args[0], args[2], 1.0, want[0], want[2], ext))
    grad = torch.rand_like(img)
    opcheck(
        torch.ops.warp_kernel.flow_warp_backward.default, (grad, img, flow, 0, True, False, ext)
    )
