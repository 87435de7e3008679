"""The attack on a model that has learnt to segment (docs/trained.md): a tiny SAM v1 trained on
composites of the training photos by benchmarks/train_sam.py (committed: tests/data/, 240 kB),
scored with eval.py's protocol on composites of the example photos. `no-fidelity` must lower its
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
from helpers import ROOT, load_script

composites = load_script("benchmarks/composites.py")
train_sam = load_script("benchmarks/train_sam.py")
reproduce = load_script("benchmarks/reproduce.py")

# benchmarks/train_sam.py's model `tiny`, trained by the command in its docstring (float16)
CHECKPOINT = ROOT / "tests" / "data" / "sam_tiny.pth"
# At 8/255 the tiny model's features barely move (cosine distance about 0.05 after stage 2, where
# two different images are 0.6 to 0.9 apart): its 64 x 64 input and 8 x 8 tokens make it far
# smoother than SAM. At 32/255, with PGD steps of 8/255 (the paper's eps / 4), they move enough.
EPS, ALPHA = 32 / 255, 8 / 255
HELDOUT = 8  # composites scored
MARGIN = 5  # mIoU points by which no-fidelity must beat noise


@pytest.fixture(scope="module")
def trained():
    return unsegment.models.load_model("sam_vit", CHECKPOINT)


@pytest.fixture(scope="module")
def heldout():
    """Composites of the example photos, which the model never saw: [(image, objects)]."""
    source, out = composites.load_photos("heldout"), []
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
    config = uad.preset_config(preset, eps=EPS, alpha=ALPHA)
    adv = uad.quantize(uad.attack(x, sam, config).adv, x, EPS)
    return [uad.to_pixels(a[None]) for a in adv]


def test_no_fidelity_breaks_masks_of_a_trained_model_far_more_than_noise(trained, heldout):
    clean = miou(trained, [image for image, _ in heldout], heldout)
    grey = miou(trained, [np.full_like(image, 128) for image, _ in heldout], heldout)
    assert clean > 2 * grey, f"the model does not segment from the image: {clean:.1f}, {grey:.1f}"
    noise = miou(trained, protect(trained, heldout, "noise"), heldout)
    attacked = miou(trained, protect(trained, heldout, "no-fidelity"), heldout)
    print(
        f"clean {clean:.2f}, uniform grey {grey:.2f}, noise {noise:.2f}, no-fidelity {attacked:.2f}"
    )
    assert clean - attacked > (clean - noise) + MARGIN, (clean, noise, attacked)


def test_the_checkpoint_is_the_tiny_model_and_training_is_deterministic():
    state = unsegment.models.read_checkpoint(CHECKPOINT)
    assert unsegment.models.vit_arch(state, CHECKPOINT) == train_sam.MODELS["tiny"]
    config = train_sam.TrainConfig(train_sam.MODELS["tiny"], steps=2, batch=2)
    pictures = composites.load_photos("heldout")  # the photos do not matter here
    first, second = (train_sam.train(config, pictures).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_box_itself_scores_what_a_mask_filling_the_prompt_box_scores():
    """benchmarks/trained.py's reference row: a rectangle is scored near 100 by its jittered
    boxes, a disc near pi/4 of that, and every pixel of the box, its corners' included, counts."""
    trained_py = load_script("benchmarks/trained.py")
    y, x = np.mgrid[0:100, 0:100]
    rectangle = (x >= 20) & (x < 80) & (y >= 30) & (y < 70)
    disc = np.hypot(x - 49.5, y - 49.5) < 30
    objects = [ev.RefObject(m, ev.mask_bbox(m)) for m in (rectangle, disc)]
    prompts = ev.sample_prompts(objects, "shapes", 0, 0, 20)  # 20 jittered boxes each
    scores = [
        trained_py.box_itself([(objects, [p for p in prompts if p.object == i])])["box"]
        for i in (0, 1)
    ]
    assert 85 < scores[0].miou <= 100 and scores[0].asr50 == 0
    assert abs(scores[1].miou - 100 * np.pi / 4) < 6
    exact = ev.Prompt(0, "box", (20, 30, 79, 69))  # the rectangle's own corners, inclusive
    assert trained_py.box_itself([(objects, [exact])])["box"].miou == 100
