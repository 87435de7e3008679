"""The encoder at the pace of the hardware: fused attention, bfloat16, batched passes and folder
batches compute what the plain float32 path computes."""

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Block

import uad
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
    sam = uad.build_sam("vit_b", dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=()))
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
    assert uad.main(["a.png", "b.png", "--attention", "flash"]) == 2
    err = capsys.readouterr().err
    assert "--attention" in err and "sdpa" in err and len(err.strip().splitlines()) == 1
    assert uad.config_from_args(uad.build_parser().parse_args(["a", "b", "--attention", "sdpa"]))
