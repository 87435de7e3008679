"""Fused bilinear flow-warp + SSIM for PyTorch, with C++ (CPU), CUDA and pure-PyTorch backends.

    import warp_kernel
    warped = warp_kernel.flow_warp(img, flow)                 # (B, C, H, W)
    s = warp_kernel.ssim(x, y)                                # (B,)
    s, warped = warp_kernel.warp_ssim(img, flow, ref)         # one fused pass

Every op is differentiable. `impl` picks the backend:
  "auto"   cuda for CUDA tensors, cpp for CPU tensors, whichever extension loaded; else torch.
           The environment variable WARP_KERNEL_IMPL (auto|cuda|cpp|torch) changes what
           "auto" means, e.g. WARP_KERNEL_IMPL=torch never builds anything.
  "cuda"   the CUDA extension (float32/float64 CUDA tensors).
  "cpp"    the C++ extension (float32/float64 CPU tensors, OpenMP threads = torch.get_num_threads()).
  "torch"  pure PyTorch (grid_sample + separable Gaussian convolutions), see warp_kernel.reference.
float16 and bfloat16 inputs are computed in float32 on every backend and returned in their dtype.
The extensions are compiled on first use (see warp_kernel.build); importing never builds and
never fails. Asking for an unavailable backend by name raises RuntimeError with the reason;
"auto" falls back to torch with one warning.

The CUDA kernels check themselves (see warp_kernel.self_check): the first call of each op per
dtype and device in a process first compares the kernel with the pure-PyTorch op on a small
input, values and gradients. One that disagrees is replaced by the pure-PyTorch op for the rest
of the process with one RuntimeWarning (which says so where "cuda" was asked for by name). The
environment variable WARP_KERNEL_SELF_CHECK=0 turns the check off
(1, the default, keeps it); `python -m warp_kernel.check` runs with it off.

The extension ops take contiguous NCHW inputs; the functions below make inputs contiguous.

The SSIM is one number per image, so the gradient of a loss through it is grad_ssim[b] times
the SSIM's own gradient. The cpp and cuda backends compute that gradient during the forward
pass, in the same sweep over the moment maps and only for inputs that require grad; the
backward pass then scales it (plus, for warp_ssim, one warp backward if `warped` was used too).
Under torch.no_grad(), or with no input requiring grad, the forward computes the SSIM alone.
"""

import os
import threading
import warnings
from typing import Tuple

import torch

from . import reference

__all__ = ["backends", "flow_warp", "reference", "ssim", "warp_ssim"]

PADDINGS = {"border": 0, "reflection": 1}
IMPLS = ("auto", "cuda", "cpp", "torch")
IMPL_ENV = "WARP_KERNEL_IMPL"
SELF_CHECK_ENV = "WARP_KERNEL_SELF_CHECK"
# The CUDA extension's module name, and the prefix of its CPU emulation's (warp_kernel.testing):
# the modules whose ops check themselves.
CUDA_MODULE = "warp_kernel_cuda"
MIN_SSIM_SIZE = 2 * reference.RADIUS + 1
HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32, returned in their dtype
DTYPES = (torch.float32, torch.float64) + HALF_DTYPES


def _build():
    """warp_kernel.build, imported on first use, so that `python -m warp_kernel.build` runs it
    as a script without an imported copy beside it."""
    from . import build

    return build


def backends():
    """Which backends can run here: {"torch": True, "cpp": bool, "cuda": bool}.

    "cpp" is True when the C++ extension is loaded; "cuda" when the CUDA extension is loaded
    and a GPU is visible (without a GPU the CUDA extension is not even built). The first call
    builds, or loads from the build cache, the extensions it reports on.
    """
    cpp = _build().load("cpu") is not None
    cuda = torch.cuda.is_available() and _build().load("cuda") is not None
    return {"torch": True, "cpp": cpp, "cuda": cuda}


def _requested(impl):
    """(the backend `impl` names once WARP_KERNEL_IMPL has said what "auto" means, and where
    that name came from, for messages)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    source = f"impl={impl!r}"
    if impl == "auto" and os.environ.get(IMPL_ENV, "").strip():
        impl = os.environ[IMPL_ENV].strip()
        source = f"{IMPL_ENV}={impl!r}"
        if impl not in IMPLS:
            raise ValueError(f"{source} is not one of {IMPLS}")
    return impl, source


def _resolve(impl, device):
    """The extension module to run on `device`, or None for the pure-PyTorch backend."""
    impl, source = _requested(impl)
    if impl == "torch":
        return None
    if impl == "auto":
        if device.type == "cuda":
            return _build().load("cuda")
        if device.type == "cpu":
            return _build().load("cpu")
        return None
    wanted = "cpu" if impl == "cpp" else "cuda"
    if device.type != wanted:
        raise ValueError(f"{source} runs on {wanted.upper()} tensors, got tensors on {device}")
    module = _build().load(wanted, warn=False)
    if module is None:
        raise RuntimeError(f"{source} is unavailable: {_build().failure(wanted)}")
    return module


def _check_image(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _check_like(t, name, ref, ref_name):
    _check_image(t, name)
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} is {t.dtype} but {ref_name} is {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_flow(img, flow):
    _check_image(img, "img")
    _check_like(flow, "flow", img, "img")
    b, _, h, w = img.shape
    if tuple(flow.shape) != (b, 2, h, w):
        raise ValueError(f"flow must be (B, 2, H, W) = {(b, 2, h, w)}, got {tuple(flow.shape)}")


def _check_ssim_inputs(x, x_name, y, y_name, data_range):
    _check_like(y, y_name, x, x_name)
    if x.shape != y.shape:
        raise ValueError(f"{x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)} differ in shape")
    if min(x.shape[-2:]) < MIN_SSIM_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {MIN_SSIM_SIZE}x{MIN_SSIM_SIZE} pixels (one 11-tap "
            f"Gaussian window), got H={x.shape[-2]}, W={x.shape[-1]}"
        )
    if not float(data_range) > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")


def _check_padding(padding):
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {tuple(PADDINGS)}, got {padding!r}")


def flow_warp(img, flow, padding="border", impl="auto"):
    """Warp an image by a dense flow with bilinear sampling.

    out[b, c, y, x] = img sampled at (x + flow[b, 0, y, x], y + flow[b, 1, y, x]), exactly
    F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=True) with
    the matching normalised grid.

    Args:
        img: (B, C, H, W) float image (float16 and bfloat16 are computed in float32).
        flow: (B, 2, H, W) same dtype and device, displacement in pixels (channel 0 = x).
        padding: "border" (clamp to the edge pixels) or "reflection" (mirror about them).
        impl: "auto", "cuda", "cpp" or "torch" (see the module docstring).

    Returns:
        (B, C, H, W) warped image, differentiable with respect to img and flow.
    """
    _check_flow(img, flow)
    _check_padding(padding)
    if img.dtype in HALF_DTYPES:
        return flow_warp(img.float(), flow.float(), padding, impl).to(img.dtype)
    ext = _checked(_extension(impl, img.device.type), "flow_warp", impl, img.dtype, img.device)
    return _flow_warp(img, flow, padding, ext)


def ssim(x, y, data_range=1.0, impl="auto"):
    """Per-image mean SSIM (Wang et al. 2004).

    11-tap Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the
    'valid' windows (no padding) and over channels: scikit-image's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L.

    Args:
        x, y: (B, C, H, W) float images (float16 and bfloat16 are computed in float32), H and W
            at least 11.
        data_range: L, the dynamic range of the images (1.0 for images in [0, 1]).
        impl: "auto", "cuda", "cpp" or "torch".

    Returns:
        (B,) SSIM of every image pair, differentiable with respect to x and y.
    """
    _check_image(x, "x")
    _check_ssim_inputs(x, "x", y, "y", data_range)
    if x.dtype in HALF_DTYPES:
        return ssim(x.float(), y.float(), data_range, impl).to(x.dtype)
    ext = _checked(_extension(impl, x.device.type), "ssim", impl, x.dtype, x.device)
    return _ssim(x, y, float(data_range), ext)


def warp_ssim(img, flow, ref, padding="border", data_range=1.0, impl="auto"):
    """SSIM of the warped image against a reference, and the warped image, in one fused pass.

    Equals (ssim(flow_warp(img, flow, padding), ref, data_range), flow_warp(img, flow, padding)).
    The backward accepts gradients for both outputs and computes only the input gradients that
    are needed (typically the flow's alone).

    Args:
        img: (B, C, H, W) float image to warp (float16 and bfloat16 are computed in float32),
            H and W at least 11.
        flow: (B, 2, H, W) displacement in pixels (channel 0 = x, channel 1 = y).
        ref: (B, C, H, W) reference image.
        padding: "border" or "reflection".
        data_range: L, the dynamic range of the images.
        impl: "auto", "cuda", "cpp" or "torch".

    Returns:
        ssim (B,), warped (B, C, H, W).
    """
    _check_flow(img, flow)
    _check_ssim_inputs(img, "img", ref, "ref", data_range)
    _check_padding(padding)
    if img.dtype in HALF_DTYPES:
        s, warped = warp_ssim(img.float(), flow.float(), ref.float(), padding, data_range, impl)
        return s.to(img.dtype), warped.to(img.dtype)
    ext = _checked(_extension(impl, img.device.type), "warp_ssim", impl, img.dtype, img.device)
    return _warp_ssim(img, flow, ref, padding, float(data_range), ext)


# The ops behind the checks of the arguments: `ext` names the extension that runs them, "" the
# pure-PyTorch backend. The self-check calls these too, with the extension and with "".


def _flow_warp(img, flow, padding, ext):
    if not ext:
        return reference.flow_warp(img, flow, padding)
    code = PADDINGS[padding]
    return torch.ops.warp_kernel.flow_warp(img.contiguous(), flow.contiguous(), code, ext)


def _ssim(x, y, data_range, ext):
    if not ext:
        return reference.ssim(x, y, data_range)
    wants = _wants_grad(x, y)
    return torch.ops.warp_kernel.ssim(x.contiguous(), y.contiguous(), data_range, *wants, ext)[0]


def _warp_ssim(img, flow, ref, padding, data_range, ext):
    if not ext:
        return reference.warp_ssim(img, flow, ref, padding, data_range)
    wants = _wants_grad(img, flow, ref)
    ssim_, warped = torch.ops.warp_kernel.warp_ssim(
        img.contiguous(),
        flow.contiguous(),
        ref.contiguous(),
        PADDINGS[padding],
        data_range,
        *wants,
        ext,
    )[:2]
    return ssim_, warped


def _wants_grad(*tensors):
    """Which inputs a graph will ask gradients for (known before the forward runs)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t.requires_grad for t in tensors)


# The extension calls are torch.library custom ops, so that torch.compile sees each as one
# opaque node with known output shapes (register_fake) and a gradient (register_autograd)
# instead of breaking the graph at an autograd.Function holding a module. An op takes the name
# of the extension module that runs it (registered by `_extension`), and returns an empty
# tensor for an output that the extension leaves undefined (a gradient nobody asked for).
_EXTENSIONS = {}  # name -> loaded extension module


@torch.compiler.assume_constant_result
def _extension(impl, device_type):
    """The name of the extension `_resolve` picks for `impl` on `device_type`, "" for the
    pure-PyTorch backend. A constant to torch.compile, which therefore never traces the build."""
    ext = _resolve(impl, torch.device(device_type))
    if ext is None:
        return ""
    _EXTENSIONS[ext.__name__] = ext
    return ext.__name__


_checks_lock = threading.Lock()
_verdicts = {}  # (extension, op, dtype, device) -> None if its self-check passed, else why not
_warned = set()  # the keys of _verdicts whose failure has been reported


def _self_check_enabled():
    value = os.environ.get(SELF_CHECK_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SELF_CHECK_ENV}={value!r} is not 0 (off) or 1 (on, the default)")
    return value != "0"


@torch.compiler.assume_constant_result
def _checked(ext, op, impl, dtype, device):
    """`ext`, or "" (the pure-PyTorch backend) where `op` of the CUDA extension `ext` failed its
    self-check in `dtype` on `device` (see warp_kernel.self_check), which runs on the first call.

    A failed check warns once and falls back, whether "cuda" was asked for by name (impl or
    WARP_KERNEL_IMPL) or chosen by "auto": the caller asked for a result, and the reference gives
    the right one, where raising would end an attack (or the command line that runs it) in a
    traceback. The warning says where the kernel was asked for by name, so that a timing or a
    comparison of "cuda" is not mistaken for one of the kernels.

    A constant to torch.compile, which calls it at trace time on real tensors, so the check is
    never part of a graph. Where the check cannot run (a trace with fake tensors, a CUDA graph
    capture) the kernel is used unchecked and the next eager call checks it.
    """
    if not ext.startswith(CUDA_MODULE) or not _self_check_enabled():
        return ext  # the cpp backend pays one string comparison
    key = (ext, op, dtype, str(device))
    if key not in _verdicts:
        with _checks_lock:
            if key not in _verdicts:
                from . import self_check  # imports warp_kernel.build: not at import time

                if not self_check.can_run(device):
                    return ext
                _verdicts[key] = self_check.run(op, ext, dtype, device)
    why = _verdicts[key]
    if why is None:
        return ext
    named, source = _requested(impl)
    dtype_name = str(dtype).replace("torch.", "")
    message = (
        f"the CUDA kernel of warp_kernel.{op} in {dtype_name} on {device} disagrees with the "
        f"pure-PyTorch op in its self-check: {why}"
    )
    if key not in _warned:
        _warned.add(key)
        asked = f" although {source} asks for the kernel" if named == "cuda" else ""
        warnings.warn(
            f"warp_kernel: {message}; {op} runs the pure-PyTorch op (impl='torch') in {dtype_name} "
            f"for the rest of this process{asked}. {SELF_CHECK_ENV}=0 turns the check off.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ""


def _defined(t, like):
    return like.new_empty(0) if t is None else t


def _like_if(wanted, like):
    return torch.empty_like(like) if wanted else like.new_empty(0)


@torch.library.custom_op("warp_kernel::flow_warp", mutates_args=())
def _flow_warp_op(img: torch.Tensor, flow: torch.Tensor, padding: int, ext: str) -> torch.Tensor:
    return _EXTENSIONS[ext].flow_warp_forward(img, flow, padding)


@_flow_warp_op.register_fake
def _(img, flow, padding, ext):
    return torch.empty_like(img)


@torch.library.custom_op("warp_kernel::flow_warp_backward", mutates_args=())
def _flow_warp_backward_op(
    grad_out: torch.Tensor,
    img: torch.Tensor,
    flow: torch.Tensor,
    padding: int,
    need_img: bool,
    need_flow: bool,
    ext: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_img, grad_flow = _EXTENSIONS[ext].flow_warp_backward(
        grad_out, img, flow, padding, need_img, need_flow
    )
    return _defined(grad_img, img), _defined(grad_flow, flow)


@_flow_warp_backward_op.register_fake
def _(grad_out, img, flow, padding, need_img, need_flow, ext):
    return _like_if(need_img, img), _like_if(need_flow, flow)


def _save_flow_warp(ctx, inputs, output):
    img, flow, ctx.padding, ctx.ext = inputs
    ctx.save_for_backward(img, flow)


def _flow_warp_grad(ctx, grad_out):
    img, flow = ctx.saved_tensors
    need_img, need_flow = ctx.needs_input_grad[:2]
    grad_img, grad_flow = _flow_warp_backward_op(
        grad_out.contiguous(), img, flow, ctx.padding, need_img, need_flow, ctx.ext
    )
    return grad_img if need_img else None, grad_flow if need_flow else None, None, None


_flow_warp_op.register_autograd(_flow_warp_grad, setup_context=_save_flow_warp)


# The SSIM is one number per image, so the gradient of any loss through it is grad_ssim[b]
# times the SSIM's own gradient. The extensions compute that "unit" gradient in the forward
# pass, in the same sweep over the moment maps (recomputing them would cost a second
# forward), for exactly the inputs that require grad; the backward only scales it.


def _scaled(unit, grad_ssim):
    """unit * grad_ssim[b] for every image b: a new tensor, so the saved one stays intact for
    a graph kept with retain_graph=True."""
    return unit * grad_ssim.view(-1, 1, 1, 1)  # (B, 1, 1, 1) scale


@torch.library.custom_op("warp_kernel::ssim", mutates_args=())
def _ssim_op(
    x: torch.Tensor, y: torch.Tensor, data_range: float, want_x: bool, want_y: bool, ext: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ssim (B,), and the unit gradients of x and y (empty unless wanted)."""
    ssim_, unit_x, unit_y = _EXTENSIONS[ext].ssim_forward(x, y, data_range, want_x, want_y)
    return ssim_, _defined(unit_x, x), _defined(unit_y, y)


@_ssim_op.register_fake
def _(x, y, data_range, want_x, want_y, ext):
    return x.new_empty(x.shape[0]), _like_if(want_x, x), _like_if(want_y, y)


def _save_ssim(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _ssim_grad(ctx, grad_ssim, _grad_unit_x, _grad_unit_y):
    unit_x, unit_y = ctx.saved_tensors
    grad_x = _scaled(unit_x, grad_ssim) if ctx.needs_input_grad[0] else None
    grad_y = _scaled(unit_y, grad_ssim) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None, None, None, None


_ssim_op.register_autograd(_ssim_grad, setup_context=_save_ssim)


@torch.library.custom_op("warp_kernel::warp_ssim", mutates_args=())
def _warp_ssim_op(
    img: torch.Tensor,
    flow: torch.Tensor,
    ref: torch.Tensor,
    padding: int,
    data_range: float,
    want_img: bool,
    want_flow: bool,
    want_ref: bool,
    ext: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ssim (B,), warped, and the unit gradients of warped, flow and ref (empty unless
    wanted)."""
    ssim_, warped, unit_warped, unit_flow, unit_ref = _EXTENSIONS[ext].warp_ssim_forward(
        img, flow, ref, padding, data_range, want_img, want_flow, want_ref
    )
    units = _defined(unit_warped, img), _defined(unit_flow, flow), _defined(unit_ref, ref)
    return (ssim_, warped, *units)


@_warp_ssim_op.register_fake
def _(img, flow, ref, padding, data_range, want_img, want_flow, want_ref, ext):
    units = _like_if(want_img, img), _like_if(want_flow, flow), _like_if(want_ref, ref)
    return (img.new_empty(img.shape[0]), torch.empty_like(img), *units)


def _save_warp_ssim(ctx, inputs, output):
    img, flow, _, ctx.padding, _, _, _, _, ctx.ext = inputs
    ctx.save_for_backward(img, flow, *output[2:])
    ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros


def _warp_ssim_grad(ctx, grad_ssim, grad_warped, *_grad_units):
    img, flow, unit_warped, unit_flow, unit_ref = ctx.saved_tensors
    need_img, need_flow, need_ref = ctx.needs_input_grad[:3]
    if grad_warped is not None:
        grad_warped = grad_warped.contiguous()
    grad_img = grad_flow = grad_ref = None
    if need_flow:
        if grad_ssim is not None:
            grad_flow = _scaled(unit_flow, grad_ssim)
        if grad_warped is not None:  # the warped image was used too: one more warp backward
            _, g = _flow_warp_backward_op(grad_warped, img, flow, ctx.padding, False, True, ctx.ext)
            grad_flow = g if grad_flow is None else g + grad_flow
    if need_img:
        # Total gradient of the warped image, scattered back through the warp.
        g = grad_warped
        if grad_ssim is not None:
            scaled = _scaled(unit_warped, grad_ssim)
            g = scaled if g is None else g + scaled
        if g is not None:
            grad_img, _ = _flow_warp_backward_op(g, img, flow, ctx.padding, True, False, ctx.ext)
    if need_ref and grad_ssim is not None:
        grad_ref = _scaled(unit_ref, grad_ssim)
    return grad_img, grad_flow, grad_ref, None, None, None, None, None, None


_warp_ssim_op.register_autograd(_warp_ssim_grad, setup_context=_save_warp_ssim)
