"""Shared fixtures: tiny random-init SAM checkpoints (see helpers.py), the command line run on
them, a guard against loading any model, a copy of a photo, and the CUDA kernels emulated on CPU
threads."""

import shutil

import pytest
import torch

torch.set_num_threads(1)  # two cores: oversubscription makes the suite many times slower

import unsegment.cli  # noqa: E402
import unsegment.models  # noqa: E402
from helpers import EXAMPLES, TINY_ARCHS, build_tiny_sam  # noqa: E402
from warp_kernel.testing import load_cuda_emulation  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{model_type: path} of tiny random-init checkpoints saved once per test session."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for i, model_type in enumerate(TINY_ARCHS):
        paths[model_type] = folder / f"tiny_{model_type}.pth"
        torch.save(build_tiny_sam(model_type, seed=i).state_dict(), paths[model_type])
    return paths


@pytest.fixture
def tiny_archs(monkeypatch):
    """Points unsegment.models.SAM_ARCHS at the tiny shapes for the duration of a test."""
    monkeypatch.setattr(unsegment.models, "SAM_ARCHS", TINY_ARCHS)
    return TINY_ARCHS


@pytest.fixture
def tiny_sam(tiny_archs, tiny_checkpoints):
    """The tiny vit_b, loaded through unsegment.models.load_sam."""
    return unsegment.models.load_sam("vit_b", tiny_checkpoints["vit_b"], "cpu")


@pytest.fixture
def cli(tiny_archs, tiny_checkpoints, capsys):
    """Runs `uad.py ARGS` in-process on the tiny vit_b; returns (exit code, stdout, stderr)."""

    def run(*args, checkpoint="vit_b"):
        extra = ["--checkpoint", str(tiny_checkpoints[checkpoint])] if checkpoint else []
        code = unsegment.cli.main([str(a) for a in args] + extra)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(unsegment.models, "load_sam", refuse)
    monkeypatch.setattr(unsegment.models, "load_model", refuse)


@pytest.fixture
def example_image(tmp_path):
    """A copy of a real example photo (coffee, 600 x 400) that a test may modify freely."""
    dst = tmp_path / "coffee.png"
    shutil.copy(EXAMPLES / "coffee.png", dst)
    return dst


@pytest.fixture(scope="module")
def emu():
    """The CUDA extension built to run on CPU threads (warp_kernel/csrc/cuda_emulation.h), loaded
    once per module with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_cuda_emulation()
    torch.set_num_threads(threads)
