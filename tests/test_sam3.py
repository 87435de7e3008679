"""SAM 3 through its real package (sam3): an eval.py target and a uad surrogate, on the CPU.

The models are sam3's own build_tracker with its ViT shrunk (helpers.shrink_sam3: 112 x 112,
8 blocks of width 32) and random weights, loaded through unsegment.models like every family.
Skips when sam3 is not installed (pip install sam3 psutil scikit-image, or the variants extra).
"""

import importlib
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import uad
import unsegment.cli
import unsegment.images
import unsegment.models
import unsegment.sam3_compat
from helpers import TINY_SAM3_SIZE, noisy, save, shrink_sam3, small_photo, two_objects
from helpers import write_annotations

pytest.importorskip("sam3", reason="sam3 is not installed (pip install sam3 psutil scikit-image)")
pytest.importorskip("psutil", reason="psutil (imported by sam3) is not installed")


@pytest.fixture(scope="module")
def sam3_checkpoint(tmp_path_factory):
    """Path of a random-init tiny SAM 3 saved in the official layout (sam3.pt: the tracker under
    "tracker.", the image encoder under "detector.backbone.", plus a detector tensor the tracker
    does not have), with sam3's builder kept tiny for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        shrink_sam3(mp)
        torch.manual_seed(3)
        model = unsegment.models.build_model("sam3")
        with torch.no_grad():  # its positional table starts at zero
            model.backbone.vision_backbone.trunk.pos_embed.normal_(0, 0.02)
        state = {}
        for key, tensor in model.state_dict().items():
            backbone = key.startswith("backbone.")
            state[("detector." if backbone else "tracker.") + key] = tensor
        state["detector.transformer.decoder.query_embed.weight"] = torch.zeros(2, 4)
        path = tmp_path_factory.mktemp("sam3") / "sam3.pt"
        torch.save({"model": state}, path)
        yield path, model.state_dict()


@pytest.fixture(scope="module")
def sam3(sam3_checkpoint):
    return unsegment.models.load_model("sam3", sam3_checkpoint[0])


def test_the_official_layout_loads_the_tracker_and_its_encoder_strictly(sam3_checkpoint, sam3):
    path, saved = sam3_checkpoint
    assert type(sam3).__name__ == "Sam3TrackerPredictor" and not sam3.training
    assert sam3.image_size == TINY_SAM3_SIZE
    assert list(sam3.state_dict()) == list(saved)
    assert all(torch.equal(t, saved[k]) for k, t in sam3.state_dict().items())
    state = torch.load(path)["model"]
    del state["tracker.no_mem_embed"]
    broken = path.parent / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(uad.UADError, match="1 of sam3's tensor.s. missing .no_mem_embed"):
        unsegment.models.load_model("sam3", broken)


def test_without_a_checkpoint_or_cache_one_line_says_how_to_get_access(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(uad.UADError) as e:
        unsegment.models.load_model("sam3")
    line = str(e.value)
    assert "\n" not in line and "https://huggingface.co/facebook/sam3" in line
    assert "hf auth login" in line and "sam3=PATH" in line


def test_an_uncached_sam3_is_one_line_before_any_model_loads(
    tiny_checkpoints, tmp_path, monkeypatch, capsys, no_model
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    runs = {
        "uad.py": lambda: unsegment.cli.main(
            [str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--surrogate", "vit_b,sam3"]
        ),
        "eval.py": lambda: ev.main(
            ["--clean", str(tmp_path / "in.png"), "--adv", str(tmp_path / "in.png")]
            + ["--models", f"vit_b={tiny_checkpoints['vit_b']},sam3"]
        ),
    }
    for program, run in runs.items():
        code = run()
        out, err = capsys.readouterr()
        assert code != 0 and out == "" and "Traceback" not in err, program
        assert len(err.strip().splitlines()) == 1 and "huggingface.co/facebook/sam3" in err
    assert not (tmp_path / "o.png").exists()


def test_building_rewrites_cuda_only_while_the_package_needs_it_and_undoes_its_side_effects(
    monkeypatch,
):
    from sam3.model.position_encoding import PositionEmbeddingSine

    def encoding():
        return PositionEmbeddingSine(16, normalize=True, precompute_resolution=64)

    fails = unsegment.sam3_compat.hardcodes_cuda() and not torch.cuda.is_available()  # 0.1.4: True
    if fails:  # the package's own failure, outside the scope
        with pytest.raises((RuntimeError, AssertionError)):
            encoding()
    before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    shrink_sam3(monkeypatch)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = unsegment.models.build_model("sam3")
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    encodings = [m for m in model.modules() if isinstance(m, PositionEmbeddingSine)]
    assert encodings and all(not m.cache for m in encodings)  # recomputed on the model's device
    assert (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) == before
    if fails:
        with pytest.raises((RuntimeError, AssertionError)):  # the rewrite ended with the build
            encoding()
        monkeypatch.setattr(unsegment.sam3_compat, "hardcodes_cuda", lambda: False)
        with pytest.raises((RuntimeError, AssertionError)):  # turned off, the package fails
            unsegment.models.build_model("sam3")


def test_importing_sam3_as_on_a_gpu_leaves_tf32_as_it_was(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an Ampere GPU or later, as
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=9))
    for module in ("sam3", "sam3.model_builder"):  # imported afresh: it sets TF32 when imported
        monkeypatch.delitem(sys.modules, module)
    flags = unsegment.sam3_compat._tf32_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        unsegment.models.import_family("sam3")
        assert unsegment.sam3_compat._tf32_flags() == (False, False)
        importlib.reload(sys.modules["sam3.model_builder"])  # without the guard: turned on
        assert unsegment.sam3_compat._tf32_flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_preprocessing_equals_the_packages_own(sam3):
    from sam3.model.utils.sam1_utils import SAM2Transforms

    pixels = small_photo((96, 64))
    ours = uad.sam2_input(uad.to_tensor(pixels), sam3.image_size, (0.5,) * 3, (0.5,) * 3)
    theirs = SAM2Transforms(sam3.image_size, 0.0)(pixels)[None]
    assert ours.shape == theirs.shape == (1, 3, TINY_SAM3_SIZE, TINY_SAM3_SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_features_are_the_vits_own_block_outputs_and_later_blocks_never_run(sam3):
    vit = sam3.backbone.vision_backbone.trunk
    outputs, calls = {}, []
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o))
        for k, b in enumerate(vit.blocks)
    ]
    x = uad.to_tensor(small_photo((96, 64)))
    try:
        with torch.no_grad():
            vit(uad.sam2_input(x, sam3.image_size, (0.5,) * 3, (0.5,) * 3))  # the package's run
            theirs = [outputs[k] for k in (3, 4, 5, 6)]
            outputs.clear()
            surrogate = uad.Surrogate.of(sam3, "sam3")
            assert isinstance(surrogate, uad.SAM3Surrogate) and surrogate.depth == 8
            ours = surrogate.features(x, uad.UADConfig())  # layers 3..6
            calls = sorted(outputs)
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(7))  # block 7 never runs
    assert [f.shape for f in ours] == [(1, 8, 8, 32)] * 4
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    sum(f.square().sum() for f in surrogate.features(xg, uad.UADConfig())).backward()
    assert xg.grad.abs().sum() > 0


def test_predicted_masks_are_the_packages_at_the_original_resolution(sam3):
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor

    pixels = small_photo((96, 64))
    predictor = ev.segmenter_of("sam3", sam3, "cpu").new_predictor()
    predictor.set_image(pixels)
    theirs = SAM3InteractiveImagePredictor(sam3)
    theirs._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # 112 / 14 = 8, at strides 14, 7, 3.5
    theirs.set_image(pixels)
    for prompt in (ev.Prompt(0, "point", (40, 30)), ev.Prompt(0, "box", (10, 8, 70, 50))):
        mask = ev.predict_mask(predictor, prompt)
        point = prompt.kind == "point"
        masks, _, _ = theirs.predict(
            point_coords=np.asarray([prompt.coords], np.float32) if point else None,
            point_labels=np.ones(1) if point else None,
            box=None if point else np.asarray(prompt.coords, np.float32),
            multimask_output=False,
        )
        assert mask.shape == (64, 96) and mask.dtype == bool
        assert np.array_equal(mask, masks[0] > 0)


def test_sam_v1_scores_the_same_before_and_after_sam3_is_built(tiny_sam):
    pixels = small_photo((96, 64))

    def score():
        predictor = ev.segmenter_of("vit_b", tiny_sam, "cpu").new_predictor()
        predictor.set_image(pixels)
        return predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.ones(1))

    flags = unsegment.sam3_compat._tf32_flags()
    before = score()
    with pytest.MonkeyPatch.context() as mp:
        shrink_sam3(mp)
        unsegment.models.build_model("sam3")
    after = score()
    assert unsegment.sam3_compat._tf32_flags() == flags
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_eval_scores_sam3_in_annotation_mode(sam3_checkpoint, tmp_path, capsys):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "cat.png", cat), save(tmp_path / "adv.png", noisy(cat, 40))
    ann = write_annotations(tmp_path / "cat.json", list(two_objects()))
    out = tmp_path / "r.json"
    code = ev.main(
        [
            *("--clean", str(clean), "--adv", str(adv), "--annotations", str(ann)),
            *("--out", str(out), "--points", "1", "--boxes", "1", "--max-masks", "1"),
            *("--quiet", "--models", f"sam3={sam3_checkpoint[0]}"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())["images"]
    assert row["metrics"]["sam3"]["all"]["count"] == 2
    assert all(0 <= p["iou"]["sam3"] <= 100 for p in row["prompts"])


def test_an_ensemble_with_sam_v1_through_the_cli_is_within_eps_and_repeats(
    tiny_archs, tiny_checkpoints, sam3_checkpoint, tmp_path, capsys
):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    ensemble = f"vit_b={tiny_checkpoints['vit_b']},sam3={sam3_checkpoint[0]}"
    outputs = [tmp_path / "a.png", tmp_path / "b.png"]
    fast = ["--preset", "no-fidelity", "--steps", "3", "--deform-steps", "2", "--seed", "4"]
    for out in outputs:
        args = [str(tmp_path / "in.png"), str(out), "--surrogate", ensemble, *fast, "--quiet"]
        code = unsegment.cli.main(args)
        assert code == 0, capsys.readouterr().err
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    clean = uad.to_tensor(small_photo())
    saved = uad.to_tensor(unsegment.images.read_image(outputs[0]).pixels)
    assert 0 < (saved - clean).abs().max() * 255 <= 8 + 1e-4
