"""Building SAM 3 (the `sam3` package) on any device, and nothing else changed by it.

What sam3 0.1.4 does that this module contains:
- two constructors create tensors with an explicit device="cuda" (PositionEmbeddingSine, in
  every builder, and TransformerDecoder, in the full image builder), which fails on a machine
  without CUDA whatever device is asked for; `building` rewrites that device to the CPU, only
  while a model is constructed, and only while the package still does it (upstream PRs #588 and
  #592 remove it; with such a release the rewrite turns itself off);
- Sam3TrackerPredictor's constructor enters torch.autocast("cuda", bfloat16) for the thread and
  never leaves it; `building` leaves it, so other models in the process stay float32;
- importing sam3.model_builder turns TF32 on for CUDA matmuls and cuDNN; `keep_backend_flags`
  puts the flags back as they were.
"""

import contextlib
import inspect

import torch
from torch.overrides import TorchFunctionMode


def _tf32_flags() -> tuple:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def keep_backend_flags():
    """Restores the TF32 flags on leaving, whatever the code inside set them to."""
    flags = _tf32_flags()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def hardcodes_cuda() -> bool:
    """Whether this sam3 still creates tensors with device="cuda" in its constructors."""
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    sources = (inspect.getsource(c.__init__) for c in (PositionEmbeddingSine, TransformerDecoder))
    return any('device="cuda"' in s for s in sources)


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.split(":")[0] == "cuda") or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CPUForCUDA(TorchFunctionMode):
    """Creates on the CPU what a torch function is asked to create with device="cuda"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def building():
    """Scope for constructing sam3 models on the CPU (move them after): device="cuda" in its
    constructors becomes the CPU while it is needed, and on leaving, the autocast its tracker
    entered is left, positional encodings cached on the CPU are dropped (they are recomputed on
    the model's device) and the TF32 flags are as before. Yields a list; append each model
    built, so that its side effects can be undone."""
    built = []
    mode = _CPUForCUDA() if hardcodes_cuda() else contextlib.nullcontext()
    with keep_backend_flags():
        with mode:
            yield built
        from sam3.model.position_encoding import PositionEmbeddingSine

        for model in reversed(built):  # autocast contexts are left in the reverse order
            for module in reversed(list(model.modules())):
                context = getattr(module, "bf16_context", None)
                if isinstance(context, torch.autocast):
                    context.__exit__(None, None, None)
                if isinstance(module, PositionEmbeddingSine):
                    module.cache.clear()
