"""The attack on a model that has learnt to segment (docs/trained.md): a tiny SAM v1 trained in the
test on composites of two example photos (benchmarks/train_sam.py, benchmarks/composites.py),
scored with eval.py's protocol on composites of the two others. `no-fidelity` must lower its
mIoU by a clear margin more than uniform noise of the same budget does: a random-init surrogate
cannot tell a working attack from a broken one (no push away from the image's features, a
perturbation the encoder never sees), a trained one can.
"""

import numpy as np
import pytest
import torch

import eval as ev
import uad
import unsegment.models
from helpers import load_script

composites = load_script("benchmarks/composites.py")
train_sam = load_script("benchmarks/train_sam.py")
reproduce = load_script("benchmarks/reproduce.py")

# 64 x 64 input at patch 8: an 8 x 8 token grid; depth 7 for the default feature blocks 3..6
TINY = dict(
    img_size=64,
    patch_size=8,
    embed_dim=48,
    depth=7,
    num_heads=2,
    mlp_ratio=2.0,
    global_attn_indexes=(3, 6),
    window_size=4,
    prompt_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=64,
    iou_head_dim=32,
)
STEPS = 300
EPS = 8 / 255
HELDOUT = 6  # composites scored
MARGIN = 15  # mIoU points by which no-fidelity must beat noise


def photos(names):
    return [composites.load_photos("heldout")[composites.HELDOUT_PHOTOS.index(n)] for n in names]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model, trained on astronaut and rocket and saved, then loaded as any checkpoint."""
    config = train_sam.TrainConfig(TINY, seed=0, steps=STEPS, batch=8, warmup=30)
    sam = train_sam.train(config, photos(["astronaut.png", "rocket.jpg"]))
    path = tmp_path_factory.mktemp("trained") / "tiny.pth"
    torch.save(sam.state_dict(), path)
    return unsegment.models.load_model("sam_vit", path)


@pytest.fixture(scope="module")
def heldout():
    """Composites of chelsea and coffee, which training never saw: [(image, objects)]."""
    source, out = photos(["chelsea.png", "coffee.png"]), []
    for n in range(HELDOUT):
        image, masks = composites.composite(composites.composite_rng(7, n), source, 64)
        out.append((image, [ev.RefObject(m, ev.mask_bbox(m)) for m in masks]))
    return out


def miou(sam, images, heldout) -> float:
    """eval.py's annotation-mode mIoU (3 points and 2 boxes per object) of `sam` on `images`,
    the held-out composites or protected copies of them."""
    predictor, ious = ev.segmenter_of("sam_vit", sam, torch.device("cpu")).new_predictor(), []
    for n, (pixels, (_, objects)) in enumerate(zip(images, heldout)):
        prompts = ev.sample_prompts(objects, f"h{n}", 0, 3, 2)
        ious += reproduce.score_image(predictor, pixels, prompts, objects)
    return float(np.mean(ious))


def protect(sam, heldout, preset: str) -> list:
    x = torch.stack([uad.to_tensor(image)[0] for image, _ in heldout])
    config = uad.preset_config(preset, eps=EPS)
    adv = uad.quantize(uad.attack(x, sam, config).adv, x, EPS)
    return [uad.to_pixels(a[None]) for a in adv]


def test_no_fidelity_breaks_masks_of_a_trained_model_far_more_than_noise(trained, heldout):
    clean = miou(trained, [image for image, _ in heldout], heldout)
    assert clean > 60, f"the tiny model did not learn to segment: clean mIoU {clean:.1f}"
    noise = miou(trained, protect(trained, heldout, "noise"), heldout)
    attacked = miou(trained, protect(trained, heldout, "no-fidelity"), heldout)
    print(f"clean {clean:.2f}, noise {noise:.2f}, no-fidelity {attacked:.2f}")
    assert clean - attacked > (clean - noise) + MARGIN, (clean, noise, attacked)


def test_training_is_deterministic():
    config = train_sam.TrainConfig(TINY, steps=3)
    pictures = photos(["astronaut.png", "rocket.jpg"])
    first, second = (train_sam.train(config, pictures).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
