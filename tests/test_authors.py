"""benchmarks/authors.py: the authors' target (spline warps, merge, control loss) and the attack."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import uad
from unsegment import authors
import unsegment.images
import warp_kernel
from helpers import small_photo

ROOT = Path(__file__).resolve().parent.parent


def test_the_spline_warp_is_the_identity_at_zero_displacement():
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(2, 36, 2, generator=gen) * 1023  # (x, y) at the 1024 scale
    image = torch.rand(2, 3, 64, 96, generator=gen)
    flow = authors.spline_flow(points, points, 64, 96, 1024 / 96)
    assert flow.shape == (2, 2, 64, 96) and flow.abs().max() < 1e-6
    assert torch.allclose(warp_kernel.flow_warp(image, flow, "reflection"), image, atol=1e-6)
    # four warps that do not move, merged through any filter, leave the image as it is
    keep_max = torch.rand(2, 1, 64, 96, generator=gen)
    source = points.view(2, 1, 36, 2).repeat(1, 4, 1, 1)
    merged = authors.warp_target(
        image, source, source, keep_max, authors.authors_config(), 1024 / 96
    )
    assert torch.allclose(merged, image, atol=1e-6)


def test_the_spline_warp_moves_each_source_point_to_its_destination():
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([8.0, 20.0, 31.0])
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    dest = torch.stack([xs.flatten(), ys.flatten()], -1)[None]  # (1, 9, 2) whole pixels
    offsets = torch.randint(-4, 5, dest.shape, generator=gen).float()
    assert (offsets[..., 0] != offsets[..., 1]).any()  # x and y move differently
    source = dest + offsets
    flow = authors.spline_flow(source, dest, 40, 40, 1.0)  # at scale 1, points are pixels
    image = torch.rand(1, 3, 40, 40, generator=gen)
    warped = warp_kernel.flow_warp(image, flow, "reflection")
    for (dx, dy), (sx, sy) in zip(dest[0].long().tolist(), source[0].long().tolist()):
        assert torch.allclose(
            flow[0, :, dy, dx], torch.tensor([sx - dx, sy - dy]).float(), atol=1e-3
        )
        assert torch.allclose(warped[0, :, dy, dx], image[0, :, sy, sx], atol=1e-3)


def test_a_translation_of_every_point_is_a_translation_of_the_image():
    # the spline's linear term reproduces affine maps exactly, everywhere, not just at the points
    gen = torch.Generator().manual_seed(2)
    dest = torch.rand(3, 36, 2, generator=gen) * 1023
    shift = torch.tensor([17.0, -5.0])
    flow = authors.spline_flow(dest + shift, dest, 48, 64, 1024 / 64)
    expected = (shift / (1024 / 64)).view(1, 2, 1, 1).expand(3, -1, 48, 64)
    assert torch.allclose(flow, expected, atol=1e-3)


def test_the_radial_term_has_the_gradient_of_its_formula():
    gen = torch.Generator().manual_seed(5)
    query = torch.rand(300, 2, generator=gen, dtype=torch.float64) * 50
    centres = torch.rand(6, 2, generator=gen, dtype=torch.float64) * 50
    centres[2] = query[7]  # a query point on a centre, where |q - c| has its kink
    w = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    centres.requires_grad_(True)
    w.requires_grad_(True)
    radial = authors.RadialTerm.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(authors.RadialTerm, "ROWS", 64)  # several blocks of rows
        out = radial(query, centres, w)
        autograd = torch.cdist(query, centres) @ w  # cdist takes the gradient at r = 0 as 0 too
        assert torch.allclose(out, autograd)
        ours = torch.autograd.grad(out.pow(2).sum(), (centres, w))
        theirs = torch.autograd.grad(autograd.pow(2).sum(), (centres, w))
        assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))
        # away from the kink, against finite differences too
        away = torch.rand(40, 2, generator=gen, dtype=torch.float64) * 50
        assert torch.autograd.gradcheck(radial, (away, centres, w))


def test_coinciding_destinations_still_give_a_spline():
    dest = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [500.0, 20.0], [30.0, 700.0], [900.0, 900.0]]])
    source = dest + torch.tensor([3.0, -2.0])
    flow = authors.spline_flow(source, dest, 16, 16, 64.0)
    assert torch.isfinite(flow).all()
    assert torch.allclose(flow, torch.tensor([3.0, -2.0]).view(1, 2, 1, 1) / 64.0, atol=1e-4)


def test_a_large_image_takes_the_flow_of_the_1024_grid_resized_to_its_pixels():
    # an affine displacement: the spline and bilinear resizing both reproduce it exactly, so
    # the flow must be the affine map at each pixel's position at the 1024 scale
    gen = torch.Generator().manual_seed(3)
    h, w = 24, 2100  # longest side over 1024: the spline is evaluated on a 1024 x 12 grid
    scale = 1024 / w
    dest = torch.rand(1, 36, 2, generator=gen) * torch.tensor([1023.0, 12.0])
    a = torch.tensor([[0.05, -0.02], [0.03, 0.04]])
    t = torch.tensor([6.0, -3.0])
    flow = authors.spline_flow(dest + dest @ a.T + t, dest, h, w, scale)
    at = authors.pixel_centres(h, w, scale, scale, "cpu")  # (H * W, 2) at the 1024 scale
    expected = ((at @ a.T + t) / scale).T.reshape(2, h, w)
    # inside: bilinear resizing only repeats the edge values in the last half grid cell
    assert torch.allclose(flow[0, :, 2:-2, 3:-3], expected[:, 2:-2, 3:-3], atol=2e-3)


def test_merge_takes_per_channel_max_where_the_filter_is_one_and_min_where_zero():
    # (B, K, C, H, W) = (1, 2 warps, 2 channels, 1, 2 pixels)
    warped = torch.tensor([[[[[0.2, 0.9]], [[0.5, 0.5]]], [[[0.6, 0.1]], [[0.3, 0.7]]]]])
    keep_max = torch.tensor([[[[1.0, 0.25]]]])
    merged = authors.merge(warped, keep_max)
    # pixel 0: the max of each channel, from different warps (0.6 from warp 1, 0.5 from warp 0)
    # pixel 1: 0.25 max + 0.75 min: 0.25 * 0.9 + 0.75 * 0.1 and 0.25 * 0.7 + 0.75 * 0.5
    assert torch.allclose(merged, torch.tensor([[[[0.6, 0.3]], [[0.5, 0.55]]]]))


def test_the_merge_filter_is_their_checkerboard():
    board = authors.checkerboard(128, 128, authors.authors_config(), "cpu")[0, 0]
    cell = 38  # 300 px at the 1024 scale, in a 128 px image
    assert board.shape == (128, 128)
    # their filter: 0 on rows of even cells, then flipped on columns of odd cells
    for y, x, value in [(0, 0, 0), (0, cell - 1, 0), (0, cell, 1), (cell, 0, 1), (cell, cell, 0)]:
        assert board[y, x] == value, (y, x)


def test_the_control_loss_on_a_hand_made_case():
    source = torch.zeros(1, 2, 2, 2)  # 1 image, 2 warps of 2 points
    dest = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]])
    # within: std of x over warp 0's points is sqrt(2), every other std 0 -> sqrt(2) / 4
    # across: std over the warps of point 1's x is sqrt(2), the others 0 -> sqrt(2) / 4
    expected = math.sqrt(2) / 4 - 0.5 * math.sqrt(2) / 4
    assert torch.allclose(authors.control_loss(source, dest), torch.tensor([expected]))


def test_the_target_is_the_warp_before_the_last_step_and_moves_away_from_the_image(tiny_sam):
    image = uad.to_tensor(small_photo())
    config = authors.authors_config(seed=4)

    def deform(steps):
        gen = torch.Generator().manual_seed(config.seed)
        return authors.deform(
            image, tiny_sam, uad.UADConfig(**{**vars(config), "deform_steps": steps}), gen
        )

    one, six = deform(1), deform(6)
    # one step: the points are where they started (their step after the target's features)
    block = 1024 // 6
    centres = torch.tensor([int((i + 0.5) * block) for i in range(6)]).float()
    assert torch.equal(one.source[0, 0, :6, 0], centres) and torch.equal(
        one.source[0, 0, ::6, 1], centres
    )
    assert not torch.equal(six.source, one.source)
    l1 = (
        lambda t: (uad.sam_input(t, tiny_sam) - uad.sam_input(image, tiny_sam)).abs().mean()
    )  # noqa: E731
    assert l1(six.target) > l1(one.target) > 0
    assert 0 < six.ssim.item() < 1 and six.target.min() >= 0 and six.target.max() <= 1


def test_the_attack_is_within_eps_on_the_saved_file_and_seeded(tiny_sam, tmp_path):
    clean = small_photo()
    x = uad.to_tensor(clean)
    files = []
    for seed in (1, 1, 2):
        config = authors.authors_config(steps=2, deform_steps=2, layers=(0,), seed=seed)
        result = authors.attack(x, tiny_sam, config)
        assert (result.stats.forwards, result.stats.backwards) == authors.encoder_passes(config)
        path = tmp_path / f"{len(files)}.png"
        unsegment.images.write_image(
            path, unsegment.images.Picture(uad.to_pixels(uad.quantize(result.adv, x, config.eps)))
        )
        saved = unsegment.images.read_image(path).pixels.astype(int)
        assert 0 < np.abs(saved - clean.astype(int)).max() <= 8
        files.append(path.read_bytes())
    assert files[0] == files[1] and files[0] != files[2]


def test_each_image_of_a_batch_gets_what_it_gets_alone(tiny_sam):
    a = uad.to_tensor(small_photo())
    b = a.flip(-1)  # another image of the same size
    config = authors.authors_config(steps=2, deform_steps=2, layers=(0,))
    batch = authors.attack(torch.cat([a, b]), tiny_sam, config)
    for i, x in enumerate((a, b)):
        alone = authors.attack(x, tiny_sam, config)
        assert torch.allclose(batch.target[i : i + 1], alone.target, atol=1e-5)
        assert torch.allclose(batch.adv[i : i + 1], alone.adv, atol=1e-5)


def test_layers_beyond_the_surrogate_are_an_error(tiny_sam):
    with pytest.raises(uad.UADError, match="layers"):
        authors.attack(uad.to_tensor(small_photo()), tiny_sam, authors.authors_config(layers=(9,)))
