"""Every model family eval.py accepts, through its real package (segment_anything_hq, mobile_sam,
sam2, ultralytics' FastSAM): random-init models from the package's own builders, saved as
checkpoints the way the official ones are and loaded through unsegment.models.load_model, then scored end to
end by eval.py in both modes.

Sizes are kept small where the builder allows it: SAM-HQ's ViTs take unsegment.models.SAM_ARCHS's shapes
(patched tiny here, as the other tests do), SAM 2's configs take hydra overrides (a four-stage
Hiera of width 16), FastSAM is ultralytics' yolov8n-seg; MobileSAM's and HQ-tiny's TinyViT have
fixed shapes, so they are the slow ones (a few seconds per image encoding). A test skips with
the reason where its package is absent; CI installs them all (setup.py's `variants` extra).
"""

import copy
import dataclasses
import importlib
import json
import sys

import numpy as np
import pytest
import torch

import eval as ev
import uad
import unsegment.models
from helpers import (
    TINY_ARCHS,
    noisy,
    parse_table,
    save,
    shrink_sam3,
    small_photo,
    two_objects,
    write_annotations,
)

# SAM-HQ's decoder reads the encoder's output after its first global-attention block, so its tiny
# ViTs need one (SAM's tiny shapes in helpers.py have none)
TINY_HQ_ARCHS = {t: {**a, "global_attn_indexes": (a["depth"] - 1,)} for t, a in TINY_ARCHS.items()}
# A Hiera of four stages (1, 1, 2, 1 blocks, widths 16 to 128) for every SAM 2 config; block 3 is
# the one global-attention block that is not the first of a stage, which Hiera requires
TINY_HIERA = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
)
# the modules each family imports, for the skip reasons (SAM-HQ and MobileSAM need timm)
MODULES = {
    "sam_hq": ("segment_anything_hq", "timm"),
    "mobile_sam": ("mobile_sam", "timm"),
    "sam2": ("sam2",),
    "fastsam": ("ultralytics",),
    "sam3": ("sam3", "psutil"),
}
# one model of each family scores in both modes; the others are built, saved and loaded
SCORED = ("hq_vit_b", "hq_vit_tiny", "mobile_sam", "sam2_t", "sam2.1_t", "fastsam")
# one object, one point and one box: each image costs an encoding and two decodings per model
FEW = ["--points", "1", "--boxes", "1", "--max-masks", "1", "--quiet"]


def require(name: str) -> None:
    """Skips the test, saying why, unless model `name`'s package and its imports are installed."""
    for module in MODULES[unsegment.models.MODELS[name].family]:
        why = f"{module} is not installed ({unsegment.models.MODELS[name].info.install})"
        pytest.importorskip(module, reason=why)
    unsegment.models.import_family(
        name
    )  # as eval.py imports it: for ultralytics, with its patches undone


@pytest.fixture(scope="module", autouse=True)
def tiny_variants():
    """unsegment.models.SAM_ARCHS at tiny shapes with a global block, and every SAM 2 config with the tiny
    Hiera trunk, for the whole module (the builders read both)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unsegment.models, "SAM_ARCHS", TINY_HQ_ARCHS)
        for name, spec in unsegment.models.MODELS.items():
            if spec.family == "sam2":
                mp.setitem(
                    unsegment.models.MODELS, name, dataclasses.replace(spec, overrides=TINY_HIERA)
                )
        if installed("sam3"):
            shrink_sam3(mp)
        yield


def random_fastsam(seed: int):
    """ultralytics' yolov8n-seg with one class, random weights, and the class logits' bias
    raised so that everything mode finds masks at conf 0.4 (its own initial bias finds none)."""
    from ultralytics.nn.tasks import SegmentationModel, yaml_model_load

    torch.manual_seed(seed)
    model = SegmentationModel({**yaml_model_load("yolov8n-seg.yaml"), "nc": 1}, verbose=False)
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(2.0)
    return model.eval()


def save_checkpoint(name: str, path, seed: int) -> dict:
    """Saves a random-init `name` as its official checkpoints are laid out; returns the state
    dict that loading it must give back."""
    require(name)
    if name == "fastsam":  # as ultralytics saves a trained model: the whole model, half precision
        model = copy.deepcopy(random_fastsam(seed)).half()
        torch.save({"model": model, "train_args": {"task": "segment"}}, path)
        return model.float().state_dict()
    torch.manual_seed(seed)
    state = unsegment.models.build_model(name).state_dict()
    nested = unsegment.models.MODELS[name].info.state_key  # SAM 2 nests its weights under "model"
    torch.save({nested: state} if nested else state, path)
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(name) -> path of a random-init checkpoint of `name`, saved once per module."""
    folder = tmp_path_factory.mktemp("variants")
    paths, states = {}, {}

    def get(name: str):
        if name not in paths:
            suffix = (
                ".pt" if unsegment.models.MODELS[name].family in ("sam2", "fastsam") else ".pth"
            )
            paths[name] = folder / f"random_{name}{suffix}"
            # a seed of its own, whatever the order the tests ask for checkpoints in
            states[name] = save_checkpoint(
                name, paths[name], seed=list(unsegment.models.MODELS).index(name)
            )
        return paths[name]

    get.states = states
    return get


@pytest.fixture
def cli(capsys):
    """Runs `eval.py ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args):
        code = ev.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def models(checkpoints, *names) -> str:
    return ",".join(f"{n}={checkpoints(n)}" for n in names)


# -----------------------------------------------------------------------------------------------
# Loading: every model name, through its package's builder and unsegment.models.load_weights


@pytest.mark.parametrize(
    "name",
    [n for n, s in unsegment.models.MODELS.items() if s.family != "sam" and s.family != "sam2"],
)
def test_every_model_loads_the_weights_it_was_saved_with(checkpoints, name):
    path = checkpoints(name)
    model = unsegment.models.load_model(name, path)
    module = unsegment.models.MODELS[name].info.module
    assert type(model).__module__.split(".")[0] == module
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    saved = checkpoints.states[name]
    assert list(model.state_dict()) == list(saved)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key


def test_sam2_models_load_from_their_own_configs(checkpoints):
    require("sam2_t")
    from hydra import compose

    for name in ("sam2_t", "sam2.1_t"):  # the two scored below; the others by their configs
        model = unsegment.models.load_model(name, checkpoints(name))
        assert type(model).__name__ == "SAM2Base" and not model.training
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, checkpoints.states[name][key]), key
    for name, spec in unsegment.models.MODELS.items():
        if spec.family == "sam2":  # every name is a config the installed package has
            trunk = compose(config_name=spec.arch).model.image_encoder.trunk
            assert trunk._target_ == "sam2.modeling.backbones.hieradet.Hiera", name


def test_loading_from_the_cache_downloads_the_official_file_name(
    checkpoints, tmp_path, monkeypatch
):
    path = checkpoints("sam2.1_t")
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    url, _ = unsegment.models.CHECKPOINT_URLS["sam2.1_t"]
    assert url.endswith("/092824/sam2.1_hiera_tiny.pt")
    monkeypatch.setitem(unsegment.models.CHECKPOINT_URLS, "sam2.1_t", (path.as_uri(), None))
    unsegment.models.load_model("sam2.1_t", None, quiet=True)
    assert (tmp_path / "cache" / path.name).read_bytes() == path.read_bytes()


# -----------------------------------------------------------------------------------------------
# Checkpoints of another model, and the missing-module line


def test_a_checkpoint_of_another_family_is_refused_naming_what_is_extra(cli, checkpoints, tmp_path):
    cat = save(tmp_path / "cat.png", small_photo((96, 64)))
    hq_tiny, sam21 = checkpoints("hq_vit_tiny"), checkpoints("sam2.1_t")
    require("mobile_sam")
    for model, path, first in [
        ("mobile_sam", hq_tiny, "mask_decoder.hf_token.weight"),  # SAM-HQ's extra decoder
        ("sam2_t", sam21, "no_obj_embed_spatial"),  # SAM 2.1's additions to SAM 2
    ]:
        code, stdout, stderr = cli("--clean", cat, "--adv", cat, "--models", f"{model}={path}")
        assert code == 1 and stdout == "" and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: {path}: not a {model} checkpoint: ")
        assert f"tensor(s) that {model} does not have ({first}" in stderr, stderr
    checkpoints("mobile_sam")
    extra = set(checkpoints.states["hq_vit_tiny"]) - set(checkpoints.states["mobile_sam"])
    assert len(extra) == 25  # SAM-HQ's decoder: the HQ token, its MLPs and feature fusion
    assert f"checkpoint: {len(extra)} tensor(s)" in uad_error(
        lambda: unsegment.models.load_model("mobile_sam", hq_tiny)
    )
    # the other way round: SAM 2's checkpoint lacks SAM 2.1's tensors
    message = uad_error(lambda: unsegment.models.load_model("sam2.1_t", checkpoints("sam2_t")))
    assert "of sam2.1_t's tensor(s) missing (" in message


def uad_error(call) -> str:
    with pytest.raises(uad.UADError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(checkpoints, tmp_path):
    state = dict(torch.load(checkpoints("sam2_t"), weights_only=True)["model"])
    state["obj_ptr_proj.layers.0.weight"] = torch.zeros(256, 128)
    torch.save({"model": state}, tmp_path / "bad.pt")
    assert uad_error(lambda: unsegment.models.load_model("sam2_t", tmp_path / "bad.pt")) == (
        f"{tmp_path / 'bad.pt'}: weights do not fit sam2_t: obj_ptr_proj.layers.0.weight is "
        "(256, 128) in the checkpoint, (256, 256) in the model"
    )


def test_a_shape_mismatch_in_a_sam_checkpoint_names_the_tensor_in_uad_too(tmp_path):
    torch.manual_seed(0)
    state = unsegment.models.build_sam("vit_b").state_dict()  # tiny (this module's SAM_ARCHS)
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    torch.save(state, tmp_path / "bad.pth")
    assert uad_error(lambda: unsegment.models.load_sam("vit_b", tmp_path / "bad.pth")) == (
        f"{tmp_path / 'bad.pth'}: weights do not fit vit_b: mask_decoder.iou_token.weight is "
        "(2, 256) in the checkpoint, (1, 256) in the model"
    )


@pytest.mark.parametrize("name", ["mobile_sam", "hq_vit_tiny"])
def test_a_missing_timm_is_named_with_the_install_line(cli, tmp_path, monkeypatch, name):
    require(name)
    package = unsegment.models.MODELS[name].info.module
    for module in [m for m in sys.modules if m.split(".")[0] in ("timm", package)]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "timm", None)  # the package is there, timm is not
    cat = save(tmp_path / "cat.png", small_photo((96, 64)))
    code, _, stderr = cli("--clean", cat, "--adv", cat, "--models", f"{name}=x.pt")
    install = unsegment.models.MODELS[name].info.install
    assert code == 1 and stderr == (
        f"error: model {name} needs the timm package (imported by {package}), which is not "
        f"installed: {install}\n"
    )
    assert install.endswith(" timm")


# -----------------------------------------------------------------------------------------------
# FastSAM: everything mode as ultralytics reads images, the authors' prompt rules


@pytest.fixture(scope="module")
def fastsam(checkpoints):
    return unsegment.models.load_model("fastsam", checkpoints("fastsam"))


def test_fastsam_is_fed_the_colour_order_ultralytics_reads_files_in(fastsam, tmp_path):
    from ultralytics.models.fastsam import FastSAMPredictor

    pixels = small_photo((96, 64))
    pixels[:, :32, 0] = 255  # a red band: in the other order, a blue one
    path = save(tmp_path / "cat.png", pixels)
    masks = ev.everything_masks(fastsam, pixels, "cpu")
    assert len(masks) > 0 and masks.shape[1:] == pixels.shape[:2]
    settings = dict(ev.FASTSAM_SETTINGS, imgsz=96, device="cpu", save=False, verbose=False)
    predictor = FastSAMPredictor(overrides=settings)
    predictor.setup_model(model=fastsam, verbose=False)
    from_file = predictor(source=str(path))[0].masks.data.numpy() > 0.5  # ultralytics reads it
    assert np.array_equal(masks, from_file)
    swapped = ev.everything_masks(fastsam, np.ascontiguousarray(pixels[..., ::-1]), "cpu")
    assert not np.array_equal(masks, swapped)  # the order matters to this model, so it is tested


def test_fastsam_prompts_select_masks_as_fastsam_prompt_does(fastsam):
    from ultralytics.models.fastsam import FastSAMPredictor

    pixels = small_photo((96, 64))
    masks = ev.everything_masks(fastsam, pixels, "cpu")
    settings = dict(ev.FASTSAM_SETTINGS, imgsz=96, device="cpu", save=False, verbose=False)
    predictor = FastSAMPredictor(overrides=settings)
    predictor.setup_model(model=fastsam, verbose=False)
    (everything,) = predictor(source=np.ascontiguousarray(pixels[..., ::-1]))
    covered = np.argwhere(masks.any(0))
    assert len(covered) > 0
    for y, x in covered[:: max(1, len(covered) // 5)][:5]:
        # ultralytics' FastSAMPredictor.prompt returns every mask containing the point
        (hits,) = predictor.prompt(everything, points=[[int(x), int(y)]])
        union = (hits.masks.data.numpy() > 0.5).any(0)
        assert np.array_equal(ev.select_fastsam_mask(masks, point=(int(x), int(y))), union)
        assert union[y, x]
    for box in ([10, 5, 60, 40], [0, 0, 95, 63], [50, 30, 52, 33]):
        # its box rule is FastSAMPrompt's: the one mask of highest IoU with the box
        (best,) = predictor.prompt(everything, bboxes=[box])
        chosen = best.masks.data.numpy() > 0.5
        assert chosen.shape[0] == 1
        assert np.array_equal(ev.select_fastsam_mask(masks, box=box), chosen[0])
    empty = np.zeros((0, 64, 96), bool)
    assert ev.select_fastsam_mask(empty, point=(3, 3)) is None
    assert ev.select_fastsam_mask(empty, box=(0, 0, 9, 9)) is None
    uncovered = np.argwhere(~masks.any(0))
    if len(uncovered):
        y, x = uncovered[0]
        assert ev.select_fastsam_mask(masks, point=(int(x), int(y))) is None


def test_importing_fastsam_leaves_pil_and_torch_as_they_were(tmp_path):
    require("fastsam")
    from PIL import Image

    import ultralytics.utils.patches

    importlib.reload(ultralytics.utils.patches)  # patches Image.open and torch.save again
    assert Image.open.__module__ != "PIL.Image"
    unsegment.models.import_family("fastsam")
    assert Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(Image.UnidentifiedImageError):  # not an attempt to pip-install pi-heif
        Image.open(tmp_path / "bad.png")


def test_a_prompt_fastsam_gives_no_mask_scores_0():
    ref = np.ones((4, 4), bool)
    assert ev.mask_iou(None, ref) == 0 and ev.mask_iou(ref, None) == 0
    assert ev.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 100


# -----------------------------------------------------------------------------------------------
# End to end, every family, both modes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small photo, a noisy copy, and an SA-1B-style JSON of two objects on it."""
    folder = tmp_path_factory.mktemp("pair")
    cat = small_photo((96, 64))
    clean, adv = save(folder / "cat.png", cat), save(folder / "adv.png", noisy(cat, 40))
    return clean, adv, write_annotations(folder / "cat.json", list(two_objects()))


def test_every_family_scores_in_annotation_mode(cli, checkpoints, pair, tmp_path):
    available = [
        n for n in SCORED if all(map(installed, MODULES[unsegment.models.MODELS[n].family]))
    ]
    if len(available) < len(SCORED):
        missing = sorted(set(SCORED) - set(available))
        pytest.skip(f"packages of {', '.join(missing)} are not installed")
    clean, adv, ann = pair
    out = tmp_path / "r.json"
    flags = ["--clean", clean, "--adv", adv, "--annotations", ann, "--out", out, *FEW]
    code, stdout, stderr = cli(*flags, "--models", models(checkpoints, *SCORED))
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["mode"] == "annotations"
    (row,) = result["images"]
    assert row["objects"] == 1 and [p["kind"] for p in row["prompts"]] == ["point", "box"]
    for name in SCORED:
        assert row["metrics"][name]["all"]["count"] == 2, name
        assert row["metrics"][name]["all"]["clean_miou"] is not None, name
        for p in row["prompts"]:
            assert 0 <= p["iou"][name] <= 100 and 0 <= p["clean_iou"][name] <= 100
        assert row["seconds"][name] > 0
    assert {model for model, _ in parse_table(stdout)} == set(SCORED)


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize(
    "first, second",
    [
        ("hq_vit_b", None),
        ("mobile_sam", None),
        ("sam2_t", "sam2.1_t"),
        ("fastsam", None),
        ("sam3", None),
    ],
)
def test_every_family_finds_its_own_objects_in_clean_reference_mode(
    cli, checkpoints, pair, tmp_path, first, second
):
    names = [n for n in (first, second) if n]
    for name in names:
        require(name)
    clean = pair[0]
    out = tmp_path / "r.json"
    generator = [
        "--points-per-side",
        "2",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0",
    ]
    code, stdout, stderr = cli(
        "--clean", clean, "--adv", clean, "--out", out, *FEW, *generator,
        "--models", models(checkpoints, *names),
    )  # fmt: skip
    assert code == 0, stderr
    assert f"objects from {first}'s automatic masks" in stdout
    (row,) = json.loads(out.read_text())["images"]
    assert row["reference"] == "automatic" and row["objects"] == 1
    assert "mask_generator" in row["seconds"]
    for name in names:  # the clean image scored against itself, by each model's own masks
        metrics = row["metrics"][name]["all"]
        assert metrics["count"] == len(row["prompts"]) > 0
        assert metrics["miou"] == 100 and metrics["asr50"] == 0, (name, metrics)


def test_bench_times_models_of_other_families_with_their_generators(cli):
    require("sam2_t")
    require("fastsam")
    few = ["--max-masks", "1", "--points", "1", "--boxes", "1", "--points-per-side", "2"]
    code, stdout, stderr = cli("--bench", "64x48", "--models", "sam2_t,fastsam", *few)
    assert code == 0, stderr
    lines = stdout.splitlines()
    for name, grid in [("sam2_t", "2x2 points"), ("fastsam", "everything mode")]:
        assert any(line.startswith(f"{name}: ") and "s per image" in line for line in lines)
        (generator,) = [line for line in lines if line.startswith(f"{name} automatic")]
        assert f"s per run ({grid}, thresholds 0, " in generator, generator


def test_fastsam_checkpoint_problems_are_one_line(cli, tmp_path, monkeypatch):
    require("fastsam")
    cat = save(tmp_path / "cat.png", small_photo((96, 64)))
    (tmp_path / "x.pth").write_bytes(b"")
    load = ev.load_segmenter
    monkeypatch.setattr(ev, "load_segmenter", lambda *a: pytest.fail("a model was loaded"))
    code, _, stderr = cli("--clean", cat, "--adv", cat, "--models", f"fastsam={tmp_path / 'x.pth'}")
    assert code == 1 and stderr == (
        f"error: {tmp_path / 'x.pth'}: a FastSAM checkpoint is an ultralytics .pt file\n"
    )
    monkeypatch.setattr(ev, "load_segmenter", load)
    (tmp_path / "text.pt").write_text("these are not weights\n")
    torch.save({"model.0.conv.weight": torch.zeros(1)}, tmp_path / "state.pt")
    for path, message in [
        (tmp_path / "text.pt", "not a readable ultralytics checkpoint ("),
        (tmp_path / "state.pt", "not a FastSAM checkpoint (no model, not a segmentation model)"),
    ]:
        code, _, stderr = cli("--clean", cat, "--adv", cat, "--models", f"fastsam={path}")
        assert code == 1 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: {path}: {message}"), stderr
