"""The encoder at the pace of the hardware: fused attention, bfloat16, batched passes and folder
batches compute what the plain float32 path computes."""

import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Block

import uad
import unsegment.cli
import unsegment.models
from helpers import small_photo

FUSED = [a for a in uad.ATTENTIONS if a != "sam"]


def random_block(window_size: int, input_size: tuple, seed: int = 0) -> Block:
    """A segment_anything ViT block with random weights and random relative-position tables."""
    torch.manual_seed(seed)
    block = Block(32, 2, use_rel_pos=True, window_size=window_size, input_size=input_size)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(0, 0.5)
        block.attn.rel_pos_w.normal_(0, 0.5)
    return block


def output_and_input_grad(fn, x: torch.Tensor, weights: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


# window 4 on a 9 x 7 grid: padded to 12 x 8, six windows; global on 6 x 8 (H != W, the tables'
# own sizes) and on 5 x 7 (tables interpolated by segment_anything's get_rel_pos)
BLOCKS = [
    ("windowed", 4, (4, 4), (3, 9, 7, 32)),
    ("global", 0, (6, 8), (2, 6, 8, 32)),
    ("global-interpolated", 0, (6, 8), (2, 5, 7, 32)),
]


@pytest.mark.parametrize("attention", FUSED)
@pytest.mark.parametrize("name, window, input_size, shape", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_fused_attention_block_equals_segment_anythings(attention, name, window, input_size, shape):
    block = random_block(window, input_size)
    torch.manual_seed(1)
    x, weights = torch.randn(shape), torch.randn(shape)
    want = output_and_input_grad(block, x, weights)
    got = output_and_input_grad(lambda t: uad.run_block(block, t, attention), x, weights)
    assert want[1].abs().max() > 0.5  # the input gradient is not trivially small
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_attention_runs_torchs_flash_kernel_on_the_cpu():
    """Carried as channels, the relative positions leave the fused kernel usable, forward and
    backward, where a mask that needs a gradient would send torch to its unfused attention."""
    block = random_block(0, (6, 8))
    x = torch.randn(2, 6, 8, 32, requires_grad=True)
    with torch.profiler.profile() as prof:
        uad.run_block(block, x, "sdpa").sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names


@pytest.fixture(scope="module")
def sam_with_global_blocks():
    """A tiny random-init SAM whose encoder takes 256 x 256 inputs (a 16 x 16 token grid, padded
    to 2 x 2 windows of 14) and whose block 1 attends globally."""
    torch.manual_seed(0)
    sam = unsegment.models.build_sam(
        "vit_b", dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=())
    )
    sam.image_encoder = ImageEncoderViT(
        img_size=256,
        embed_dim=32,
        depth=3,
        num_heads=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=14,
        out_chans=32,
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.5 if "rel_pos" in name else 0.02)
    return sam.eval().requires_grad_(False)


def test_features_and_image_gradients_match_for_a_batch_of_non_square_images(
    sam_with_global_blocks,
):
    sam = sam_with_global_blocks
    photo = uad.to_tensor(small_photo((96, 64)))  # resized to 256 x 171, padded to a square
    images = torch.cat([photo, photo.flip(-1)])
    weights = [
        torch.randn(2, 16, 16, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]

    def run(attention):
        x = images.clone().requires_grad_(True)
        feats = uad.encoder_features(sam, x, (0, 1, 2), attention=attention)
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()
        return [f.detach() for f in feats], x.grad

    want_feats, want_grad = run("sam")
    assert want_grad.abs().max() > 0
    for attention in FUSED:
        feats, grad = run(attention)
        for f, w in zip(feats, want_feats):
            torch.testing.assert_close(f, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-3 * want_grad.abs().max())


@pytest.mark.parametrize("attention", uad.ATTENTIONS)
def test_bfloat16_features_follow_float32_with_every_attention(sam_with_global_blocks, attention):
    sam = sam_with_global_blocks
    x = uad.to_tensor(small_photo((96, 64)))
    with torch.no_grad():
        want = uad.encoder_features(sam, x, (0, 1, 2), "float32", "sam")
        got = uad.encoder_features(sam, x, (0, 1, 2), "bfloat16", attention)
    assert all(f.dtype == torch.float32 for f in got)
    # bfloat16 keeps 8 bits of mantissa: features agree to about 1%, far from unrelated ones
    distance = uad.feature_distance(got, want).item()
    assert distance < 1e-3
    assert uad.feature_distance(got, [f.roll(1, 1) for f in want]).item() > 100 * distance


def test_attention_is_a_cli_flag_with_its_choices(tiny_archs, capsys):
    assert unsegment.cli.main(["a.png", "b.png", "--attention", "flash"]) == 2
    err = capsys.readouterr().err
    assert "--attention" in err and "sdpa" in err and len(err.strip().splitlines()) == 1
    assert unsegment.cli.config_from_args(
        unsegment.cli.build_parser().parse_args(["a", "b", "--attention", "sdpa"])
    )


def test_joined_target_and_proxy_passes_give_the_same_bits(sam_with_global_blocks):
    """The paper preset's deformation step as one encoder call on [target; proxy]: the CPU's
    kernels compute each image of a batch as they compute it alone (on one thread, the same
    operations in the same order), so the attack's results are equal bit for bit."""
    photo = uad.to_tensor(small_photo())
    images = torch.cat([photo, photo.flip(-1)])
    results = {}
    for join in ("no", "yes"):
        config = uad.preset_config(
            "paper", deform_steps=2, proxy_steps=2, steps=1, encoder_noise=2 / 255, join_passes=join,
            layers=(0, 1, 2)
        )  # fmt: skip
        results[join] = uad.attack(images, sam_with_global_blocks, config)
        assert (results[join].stats.forwards, results[join].stats.backwards) == (
            uad.encoder_passes(config)
        )
    assert torch.equal(results["yes"].target, results["no"].target)
    assert torch.equal(results["yes"].adv, results["no"].adv)
    assert not torch.equal(results["no"].target, images)


def test_passes_are_joined_on_cuda_by_default_and_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uad.joins_passes(uad.UADConfig(), cuda) and not uad.joins_passes(uad.UADConfig(), cpu)
    assert uad.joins_passes(uad.UADConfig(join_passes="yes"), cpu)
    assert not uad.joins_passes(uad.UADConfig(join_passes="no"), cuda)


def test_split_batch_splits_every_feature_map():
    feats = [torch.arange(10.0).view(5, 2), torch.arange(15.0).view(5, 3)]
    first, rest = uad.split_batch(feats, 2)
    assert [f.shape for f in first] == [(2, 2), (2, 3)] and [f.shape for f in rest] == [
        (3, 2),
        (3, 3),
    ]
    assert torch.equal(torch.cat([first[1], rest[1]]), feats[1])


def write_folder(folder, sizes: dict):
    """Photos of the given (w, h) sizes, each shifted differently so that no two are alike."""
    folder.mkdir()
    for i, (name, size) in enumerate(sizes.items()):
        Image.fromarray(np.roll(small_photo(size), 7 * i, axis=1)).save(folder / name)


def test_batch_gives_the_files_one_at_a_time_gives_in_the_same_order(
    cli, tmp_path, monkeypatch, sam_with_global_blocks
):
    """--batch 3 attacks a.png, c.png and d.png together and b.png (another size) alone; every
    random draw (flow init, random start, encoder noise, --robust) comes from the image's own
    generator, so each file is byte for byte what --batch 1 writes, and the lines keep the
    folder's order. (The surrogate is the 256-pixel one, for speed.)"""
    monkeypatch.setattr(
        unsegment.models, "load_sam", lambda *args, **kwargs: sam_with_global_blocks
    )
    sizes = {"a.png": (48, 32), "b.png": (40, 40), "c.png": (48, 32), "d.png": (48, 32)}
    write_folder(tmp_path / "in", sizes)
    attack = [
        "--deform-steps",
        2,
        "--proxy-steps",
        2,
        "--steps",
        2,
        "--random-start",
        "--layers",
        "0,1,2",
    ]
    attack += ["--encoder-noise", 2, "--robust", "jpeg:50-90,resize:0.5-1,none", "--quiet"]
    files = {}
    for n in (1, 3):
        code, out, err = cli(tmp_path / "in", tmp_path / f"out{n}", "--batch", n, *attack)
        assert code == 0, err
        lines = out.strip().splitlines()
        assert [Path(line.split(":")[0]).name for line in lines[:-1]] == list(sizes)
        assert lines[-1] == "4 protected, 0 failed"
        assert ("for a batch of 3" in out) == (n == 3)
        files[n] = {name: (tmp_path / f"out{n}" / name).read_bytes() for name in sizes}
    assert files[3] == files[1]
    clean = np.asarray(Image.open(tmp_path / "in" / "a.png"), np.int16)
    diff = np.abs(np.asarray(Image.open(tmp_path / "out3" / "a.png"), np.int16) - clean)
    assert 0 < diff.max() <= 8


def test_batch_must_be_a_positive_count(cli, tmp_path):
    for bad in ("0", "two"):
        code, _, err = cli(tmp_path, tmp_path / "out", "--batch", bad)
        assert code == 2 and "--batch" in err and len(err.strip().splitlines()) == 1


def test_compiled_encoder_gives_the_eager_attack(sam_with_global_blocks, monkeypatch):
    """config.compile runs the features through torch.compile as one graph (aot_eager here:
    the same kernels as eager, without the minutes of code generation)."""
    monkeypatch.setattr(uad, "COMPILE_BACKEND", "aot_eager")
    uad.compiled_encoder_features.cache_clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    image = uad.to_tensor(small_photo())
    results = {}
    for compile in (False, True):
        config = uad.preset_config(
            "no-fidelity",
            deform_steps=1,
            steps=2,
            attention="sdpa",
            layers=(0, 1, 2),
            compile=compile,
        )
        results[compile] = uad.attack(image, sam_with_global_blocks, config).adv
    uad.compiled_encoder_features.cache_clear()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(results[True], results[False])


def test_gpu_script_says_in_one_line_that_there_is_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu.sh")], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.strip()
        == "benchmarks/gpu.sh: no CUDA GPU is visible here; nothing was measured"
    )


def test_authors_timing_needs_a_checkout_of_their_code(tmp_path):
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "authors_step.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert (
        done.stdout.strip()
        == f"{tmp_path}: not a checkout of the authors' code (no attack/attacker.py)"
    )
