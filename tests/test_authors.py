"""benchmarks/authors.py: the authors' target (spline warps, merge, control loss) and the attack."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import uad
from unsegment import authors
import unsegment.images
import unsegment.models
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


def test_centres_on_one_point_give_the_least_squares_spline_where_lu_misses_it():
    # clamped into one corner of a 128-pixel canvas, two centres make a singular system that
    # LU does not flag (no pivot comes out exactly zero): solving it gave weights of 1e30
    gen = torch.Generator().manual_seed(0)
    grid = torch.arange(6).float() * 21 + 10
    dest = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(1, 36, 2)
    dest = (dest + torch.randn(1, 36, 2, generator=gen) * 8).clamp(0, 127)
    dest[0, 30] = dest[0, 31] = torch.tensor([0.0, 127.0])
    values = torch.randn(1, 36, 2, generator=gen) * 20
    w, v = authors.fit_spline(dest, values)
    assert w.abs().max() < 100
    at = authors.eval_spline(dest, dest, w, v)  # the spline at its centres
    others = [i for i in range(36) if i not in (30, 31)]
    assert torch.allclose(at[0, others], values[0, others], atol=1e-3)
    # at the shared point, the mean of its two values: the least-squares compromise
    assert torch.allclose(at[0, 30], values[0, 30:32].mean(0), atol=1e-3)


def test_the_points_live_at_the_1024_scale_whatever_the_surrogates_input_size():
    # their lr (10 px) and noise (a tenth of a 170 px block) are at SAM's 1024 input: on a
    # 64-input surrogate they must not become 16 times larger relative to the image
    small = unsegment.models.load_model("sam_vit", ROOT / "tests" / "data" / "sam_tiny.pth")
    assert small.image_encoder.img_size == 64
    config = authors.authors_config(deform_steps=1)  # no step: the points as they start
    result = authors.deform(
        uad.to_tensor(small_photo((32, 24))), small, config, torch.Generator().manual_seed(3)
    )
    assert torch.equal(result.source[0], block_centres().expand(4, 36, 2))
    noise = torch.randn((1, 4, 36, 2), generator=torch.Generator().manual_seed(3))[0]
    assert torch.allclose(result.dest[0], (block_centres() + 17 * noise).clamp(0, 1023), atol=1e-4)


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


# -----------------------------------------------------------------------------------------------
# Stage 1's settings as their UAD sets them (attack/attacker.py): the initial points, the
# filter's points, the clamp after each step, the learning rate; and a golden target


def block_centres(points: int = 6) -> torch.Tensor:
    """(points^2, 2) the centres (x, y) of a points x points grid of int(1024 / points) px
    blocks, x varying fastest, as whole pixels."""
    block = 1024 // points
    centres = torch.tensor([int((i + 0.5) * block) for i in range(points)]).float()
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys], -1).view(-1, 2)


class RecordedAdam(torch.optim.Adam):
    """Adam that records, before each step, its lr, its parameters and their gradients; and
    after it adds `push` (a function of the parameters) to them, before deform clamps them."""

    steps: list = []
    push = None

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        RecordedAdam.steps.append(
            (
                self.param_groups[0]["lr"],
                [p.detach().clone() for p in params],
                [p.grad.detach().clone() for p in params],
            )
        )
        out = super().step(closure)
        if RecordedAdam.push:
            with torch.no_grad():
                RecordedAdam.push(*params)
        return out


@pytest.fixture
def recorded_adam(monkeypatch):
    monkeypatch.setattr(RecordedAdam, "steps", [])
    monkeypatch.setattr(RecordedAdam, "push", None)
    monkeypatch.setattr(torch.optim, "Adam", RecordedAdam)
    return RecordedAdam


def test_the_destinations_start_at_the_block_centres_plus_noise_of_a_tenth_block(tiny_sam):
    # their dst_rand_range = 0.1 of a block of int(1024 / 6) = 170 px: std 17 px per coordinate,
    # each image drawing from its own generator (the one it is given)
    image = uad.to_tensor(small_photo((32, 24)))
    images = torch.cat([image, image.flip(-1)])
    config = authors.authors_config(deform_steps=1)  # no step: the points as they start
    seeds = (3, 4)
    result = authors.deform(
        images, tiny_sam, config, [torch.Generator().manual_seed(s) for s in seeds]
    )
    grid = block_centres()
    assert result.source.shape == result.dest.shape == (2, 4, 36, 2)
    assert torch.equal(result.source, grid.expand(2, 4, 36, 2))
    for b, seed in enumerate(seeds):
        noise = torch.randn((1, 4, 36, 2), generator=torch.Generator().manual_seed(seed))[0]
        expected = (grid + 0.1 * 170 * noise).clamp(0, 1023)
        assert torch.allclose(result.dest[b], expected, atol=1e-4), b
    move = result.dest - result.source
    assert not torch.equal(move[0], move[1])  # two generators, two draws
    assert 16 < move.std().item() < 18 and move.mean().abs().item() < 1.5


def test_the_merge_filter_is_the_checkerboard_warped_by_the_first_warps_initial_points(
    tiny_sam, monkeypatch
):
    calls = []
    warp_target = authors.warp_target

    def recording(image, source, dest, keep_max, config, scale):
        calls.append((source.detach().clone(), dest.detach().clone(), keep_max.clone()))
        return warp_target(image, source, dest, keep_max, config, scale)

    monkeypatch.setattr(authors, "warp_target", recording)
    image = uad.to_tensor(small_photo())  # 96 x 64
    config = authors.authors_config(deform_steps=3)
    result = authors.deform(image, tiny_sam, config, torch.Generator().manual_seed(6))
    assert len(calls) == 3  # two steps, then the target
    source, dest, _ = calls[0]  # the initial points
    assert torch.equal(source[0, 0], block_centres())
    board = authors.checkerboard(64, 96, config, "cpu")

    def warped_board(s, d):
        flow = authors.spline_flow(s, d, 64, 96, 1024 / 96)
        return warp_kernel.flow_warp(board, flow, "reflection")

    expected = warped_board(source[:, 0], dest[:, 0])
    for step, (*_, keep_max) in enumerate(calls):
        assert torch.allclose(keep_max, expected, atol=1e-5), step
    # and it is none of the other candidates: the board unwarped, another warp's initial
    # points, the first warp's points after a step or at the end
    for other in (
        board,
        warped_board(source[:, 1], dest[:, 1]),
        warped_board(calls[1][0][:, 0], calls[1][1][:, 0]),
        warped_board(result.source[:, 0], result.dest[:, 0]),
    ):
        assert (other - expected).abs().max() > 0.1


def test_the_points_are_clamped_to_the_1024_square_after_each_step(tiny_sam, recorded_adam):
    def push(source, dest):  # after the update, four points thrown out of the square
        source[:, :, 0] += 5000  # to the far corner
        source[:, :, 1] -= 5000  # to the origin
        dest[:, :, 2, 0] += 5000
        dest[:, :, 3, 1] -= 5000

    recorded_adam.push = push
    image = uad.to_tensor(small_photo())
    for steps in (2, 3):  # after the first step, and after the second
        recorded_adam.steps.clear()
        config = authors.authors_config(deform_steps=steps)
        result = authors.deform(image, tiny_sam, config, torch.Generator().manual_seed(7))
        assert len(recorded_adam.steps) == steps - 1
        source, dest = result.source, result.dest
        for points in (source, dest):
            assert points.min() >= 0 and points.max() <= 1023
        assert (source[:, :, 0] == 1023).all() and (source[:, :, 1] == 0).all()
        assert (dest[:, :, 2, 0] == 1023).all() and (dest[:, :, 3, 1] == 0).all()
        # the step before saw its points clamped too
        before_source, before_dest = recorded_adam.steps[-1][1]
        for points in (before_source, before_dest):
            assert points.min() >= 0 and points.max() <= 1023
        if steps == 2:  # the other points are where Adam's first step put them, <= lr away
            assert (source[:, :, 4:] - before_source[:, :, 4:]).abs().max() <= 10 + 1e-3


def test_one_adam_step_moves_each_point_by_the_learning_rate_of_10_pixels(tiny_sam, recorded_adam):
    config = authors.authors_config(deform_steps=2)  # one step
    assert config.deform_lr == 10
    image = uad.to_tensor(small_photo())
    result = authors.deform(image, tiny_sam, config, torch.Generator().manual_seed(8))
    [(lr, before, grads)] = recorded_adam.steps
    assert lr == 10
    for start, grad, after in zip(before, grads, (result.source, result.dest)):
        assert grad.abs().max() > 0
        # Adam's first step: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected to g and g^2:
        # lr g / (|g| + eps), lr in the direction against the gradient, in pixels at 1024
        expected = (start - 10 * grad / (grad.abs() + 1e-8)).clamp(0, 1023)
        assert torch.allclose(after, expected, atol=1e-3)
        moved = (after - start).abs()
        assert ((moved - 10).abs() < 0.05).float().mean() > 0.9


# an independent implementation of their target, in float64 numpy, from the formulas


def spline_at(source: np.ndarray, dest: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The order-1 polyharmonic spline through (dest_i, source_i - dest_i) with its affine
    part, sum_i w_i |q - dest_i| + a x + b y + c, the w summing to 0 and orthogonal to the
    points' x and y; at points `at` (m, 2): (m, 2)."""
    n = len(dest)
    radial = np.linalg.norm(dest[:, None] - dest[None], axis=-1)
    affine = np.hstack([dest, np.ones((n, 1))])
    lhs = np.block([[radial, affine], [affine.T, np.zeros((3, 3))]])
    rhs = np.vstack([source - dest, np.zeros((3, 2))])
    coef = np.linalg.solve(lhs, rhs)
    r = np.linalg.norm(at[:, None] - dest[None], axis=-1)
    return r @ coef[:n] + np.hstack([at, np.ones((len(at), 1))]) @ coef[n:]


def reflect(c: np.ndarray, size: int) -> np.ndarray:
    """Coordinates mirrored about the first and last pixel centres into [0, size - 1]."""
    period = 2 * (size - 1)
    c = np.mod(c, period)
    return np.where(c > size - 1, period - c, c)


def sample(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of image (C, H, W) at (x, y) (H, W), reflected inside: (C, H, W)."""
    _, h, w = image.shape
    x, y = reflect(x, w), reflect(y, h)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return (
        image[:, y0, x0] * (1 - fx) * (1 - fy)
        + image[:, y0, x1] * fx * (1 - fy)
        + image[:, y1, x0] * (1 - fx) * fy
        + image[:, y1, x1] * fx * fy
    )


def test_the_target_matches_an_independent_implementation_of_their_formulas(tiny_sam, monkeypatch):
    # 2 warps of 3 x 3 points, the destination noise fixed, no step: the target is the merge
    # of the warps of the initial points through the checkerboard warped by warp 0's
    noise = torch.randn((1, 2, 9, 2), generator=torch.Generator().manual_seed(9)) * 1.5

    def draws(gen, shape, sample_):
        assert tuple(shape) == (1, 2, 9, 2)
        return noise

    monkeypatch.setattr(uad, "draws", draws)
    h, w = 20, 28
    pixels = small_photo((w, h))
    config = authors.authors_config(deform_steps=1, control_points=3, num_flows=2)
    result = authors.deform(uad.to_tensor(pixels), tiny_sam, config, None)

    source = block_centres(3).double().numpy()  # centres 170, 511, 852 of 341 px blocks
    dests = [source + 0.1 * 341 * noise[0, k].double().numpy() for k in range(2)]
    assert all(((d > 0) & (d < 1023)).all() for d in dests)  # nothing clamped
    scale = 1024 / max(h, w)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    at = np.stack([xs, ys], -1).reshape(-1, 2)
    at_1024 = (at + 0.5) * scale - 0.5  # the pixel centres at the 1024 scale

    def warp(image, dest):
        move = spline_at(source, dest, at_1024) / scale  # image pixels
        x, y = xs + move[:, 0].reshape(h, w), ys + move[:, 1].reshape(h, w)
        return sample(image, x, y), (x, y)

    image = pixels.transpose(2, 0, 1) / 255.0
    cell = round(300 / scale)  # 8 px: 300 px at the 1024 scale
    board = ((ys // cell + xs // cell) % 2).astype(float)[None]
    keep_max, (x, y) = warp(board, dests[0])
    warped = np.stack([warp(image, d)[0] for d in dests])
    expected = warped.max(0) * keep_max + warped.min(0) * (1 - keep_max)

    # the case exercises reflection, a filter between 0 and 1, and warps that differ
    assert x.min() < 0 or y.min() < 0 or x.max() > w - 1 or y.max() > h - 1
    assert ((keep_max > 0.01) & (keep_max < 0.99)).any()
    assert np.abs(warped[0] - warped[1]).max() > 0.1
    assert torch.allclose(result.dest[0].double(), torch.tensor(np.stack(dests)), atol=1e-4)
    assert np.abs(result.target[0].double().numpy() - expected).max() < 1e-4


# -----------------------------------------------------------------------------------------------
# For reproduction: their release (PGD on SAM's padded, normalised input, truncation at 1024,
# bilinear resize back) and their AA's L2 distance


def normalised(sam, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, 1024, 1024): 0..255 values (1, 3, h, w) normalised as SAM does and padded."""
    z = (pixels - sam.pixel_mean) / sam.pixel_std
    return torch.nn.functional.pad(z, (0, 1024 - z.shape[-1], 0, 1024 - z.shape[-2]))


def test_their_release_truncates_at_1024_and_keeps_nothing_of_the_padding(tiny_sam):
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 255, (1, 3, 683, 1024), generator=gen).float()
    z = normalised(tiny_sam, levels + 0.9)  # 0.9 of a level above each: truncated, not rounded
    z[..., 683:, :] = 5.0  # the padding, perturbed: thrown away
    released = authors.release(z, tiny_sam, (683, 1024))  # a 3:2 image already at 1024
    assert released.dtype == np.uint8 and released.shape == (683, 1024, 3)
    assert np.array_equal(released, levels[0].permute(1, 2, 0).numpy().astype(np.uint8))


def test_their_release_resizes_back_bilinearly_to_the_original_size(tiny_sam):
    # a horizontal ramp at 1024 x 683 (whole levels), released at 96 x 64: each pixel takes the
    # linear interpolation at its centre's position, (i + 0.5) * 1024 / 96 - 0.5
    ramp = torch.arange(1024).float() * 250 / 1023
    levels = ramp.floor().expand(1, 3, 683, 1024)
    released = authors.release(normalised(tiny_sam, levels + 0.5), tiny_sam, (64, 96))
    assert released.shape == (64, 96, 3)
    x = (np.arange(96) + 0.5) * 1024 / 96 - 0.5
    expected = np.interp(x, np.arange(1024), levels[0, 0, 0].numpy())
    assert np.abs(released[32, :, 1].astype(float) - expected).max() <= 1
    assert (released == released[:1]).all()  # every row alike


def test_their_pgd_keeps_eps_per_channel_in_the_normalised_space_padding_included(tiny_sam):
    image = uad.to_tensor(small_photo())  # 96 x 64: 1024 x 683 at SAM's scale
    # 3 steps of 2/255 within 4/255: most values end on the budget's edge
    config = authors.authors_config(steps=3, eps=4 / 255, deform_steps=2, layers=(0,), seed=1)
    result = authors.reproduction_attack(image, tiny_sam, config, padded=True)
    z, start = result.adv, uad.sam_input(image, tiny_sam)
    assert z.shape == (1, 3, 1024, 1024)
    budget = config.eps * 255 / tiny_sam.pixel_std  # (3, 1, 1)
    assert ((z - start).abs() <= budget + 1e-5).all()
    assert ((z - start).abs() >= budget - 1e-5).float().mean() > 0.5  # signed steps hit it
    low, high = (
        -tiny_sam.pixel_mean / tiny_sam.pixel_std,
        (255 - tiny_sam.pixel_mean) / tiny_sam.pixel_std,
    )
    assert (z >= low - 1e-6).all() and (z <= high + 1e-6).all()
    assert (z[..., 683:, :] != 0).any()  # the padding is perturbed, as theirs
    assert result.stats.forwards == 2 + config.steps and result.stats.backwards == config.steps
    released = authors.release(z, tiny_sam, (64, 96))
    assert released.shape == (64, 96, 3) and (released != small_photo()).any()


def test_their_aa_distance_is_the_l2_norm_over_all_blocks():
    a = [torch.ones(2, 4, 4, 3), torch.zeros(2, 4, 4, 3)]
    b = [torch.zeros(2, 4, 4, 3), torch.full((2, 4, 4, 3), 2.0)]
    # 48 differences of 1 and 48 of 2 per image: sqrt(48 + 4 * 48)
    assert torch.allclose(authors.l2_distance(a, b), torch.full((2,), math.sqrt(240.0)))
    assert torch.allclose(authors.l2_distance([a, a], [b, a]), torch.full((2,), math.sqrt(60.0)))


def test_the_aa_baseline_with_their_distance_is_within_eps_and_pulls_towards_the_target(tiny_sam):
    image, other = uad.to_tensor(small_photo()), uad.to_tensor(small_photo()).flip(-1)
    config = uad.preset_config("aa", steps=3, layers=(0,))
    f = lambda x: [uad.encoder_features(tiny_sam, x, (0,))]  # noqa: E731
    result = authors.reproduction_attack(image, tiny_sam, config, other, distance="l2")
    assert (result.adv - image).abs().max() <= config.eps + 1e-6
    assert authors.l2_distance(f(result.adv), f(other)) < authors.l2_distance(f(image), f(other))
    cosine = authors.reproduction_attack(image, tiny_sam, config, other)
    assert not torch.equal(cosine.adv, result.adv)
