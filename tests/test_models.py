"""Checkpoints (unsegment.models): unreadable files; the download, its SHA-256 check, the cache."""

import hashlib
import os

import pytest
import torch

import uad
import unsegment.cli
import unsegment.models
from uad import UADError


def test_corrupt_checkpoints_are_one_short_line(tiny_archs, tiny_checkpoints, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoints["vit_b"].read_bytes()[:5000])
    for path, reason in [(text, "not a PyTorch file"), (truncated, "truncated or corrupt")]:
        with pytest.raises(uad.UADError) as e:
            unsegment.models.load_sam("vit_b", path)
        message = str(e.value)
        assert message == f"{path}: not a readable PyTorch checkpoint ({reason})"


def test_a_checkpoint_that_is_no_regular_file_says_so(tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)  # reading it would wait for a writer
    for path, problem in [
        ("/dev/null", "not a regular file but a character device"),
        (fifo, "not a regular file but a FIFO"),
        (tmp_path, "is a folder"),
        (tmp_path / "none.pth", "no such checkpoint file"),
    ]:
        with pytest.raises(uad.UADError) as e:
            unsegment.models.check_checkpoint_file(path)
        assert str(e.value) == f"{path}: {problem}"


def fake_checkpoint(path, names, nest=False):
    state = {name: torch.zeros(1) for name in names}
    torch.save({"model": state} if nest else state, path)
    return path


TINYVIT = ["image_encoder.patch_embed.seq.0.c.weight", "image_encoder.layers.0.blocks.0.x"]


@pytest.mark.parametrize(
    "names, nest, says",
    [
        (
            TINYVIT,
            False,
            "a MobileSAM (TinyViT encoder) checkpoint, not vit_b; load it as "
            "mobile_sam (uad.py --surrogate mobile_sam=PATH, eval.py --models mobile_sam=PATH)",
        ),
        (
            TINYVIT + ["mask_decoder.hf_token.weight"],
            False,
            "a Light HQ-SAM (TinyViT encoder) "
            "checkpoint, not vit_b; load it as hq_vit_tiny (eval.py --models hq_vit_tiny=PATH)",
        ),
        (
            [f"image_encoder.trunk.blocks.{i}.norm1.weight" for i in range(12)]
            + ["no_obj_embed_spatial"],
            True,
            "a SAM 2.1 (Hiera encoder, 12 blocks) checkpoint, "
            "not vit_b; load it as sam2.1_t (uad.py --surrogate sam2.1_t=PATH",
        ),
        (
            [f"image_encoder.trunk.blocks.{i}.norm1.weight" for i in range(48)],
            True,
            "a SAM 2 (Hiera encoder, 48 blocks) checkpoint, not vit_b; load it as sam2_l",
        ),
        (["something.else"], False, "not a SAM checkpoint (no image encoder)"),
    ],
)
def test_a_checkpoint_of_another_family_names_it(tiny_archs, tmp_path, names, nest, says):
    path = fake_checkpoint(tmp_path / "other.pt", names, nest)
    with pytest.raises(uad.UADError) as e:
        unsegment.models.load_sam("vit_b", path)
    assert str(e.value).startswith(f"{path}: {says}") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------
# The official download path, with a local file:// URL standing in for Meta's


def test_missing_checkpoint_is_downloaded_verified_and_cached(
    tiny_archs, tiny_checkpoints, tmp_path, monkeypatch
):
    source = tiny_checkpoints["vit_b"]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(unsegment.models.CHECKPOINT_URLS, "vit_b", (source.as_uri(), digest))
    sam = unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert sam.image_encoder.pos_embed.shape[-1] == 64
    cached = tmp_path / "cache" / source.name
    assert cached.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == [source.name]


def test_corrupt_download_is_rejected_and_not_kept(
    tiny_archs, tiny_checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        unsegment.models.CHECKPOINT_URLS, "vit_b", (tiny_checkpoints["vit_b"].as_uri(), "0" * 64)
    )
    with pytest.raises(uad.UADError, match="SHA-256 mismatch"):
        unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_download_names_the_url_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/sam_vit_b_01ec64.pth"  # the discard port: nothing listens
    monkeypatch.setitem(unsegment.models.CHECKPOINT_URLS, "vit_b", (url, "0" * 64))
    with pytest.raises(uad.UADError) as e:
        unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert url in str(e.value) and "--checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert f"download it by hand to {tmp_path / 'cache' / 'sam_vit_b_01ec64.pth'}" in str(e.value)


SMALL_VIT = dict(
    img_size=64,
    patch_size=8,
    embed_dim=32,
    depth=5,
    num_heads=2,
    mlp_ratio=2.0,
    global_attn_indexes=(1, 4),
    window_size=4,
    prompt_dim=32,
    decoder_depth=1,
    decoder_mlp_dim=48,
    iou_head_dim=24,
)


def test_sam_vit_loads_any_vit_shape_from_its_checkpoint(tmp_path, no_model, example_image, capsys):
    torch.manual_seed(0)
    state = unsegment.models.build_sam_vit(SMALL_VIT).state_dict()
    path = tmp_path / "small.pth"
    torch.save(state, path)
    assert unsegment.models.vit_arch(state, path) == SMALL_VIT  # every knob read back
    # before anything loads: the depth, from the checkpoint, against --layers; a path is needed
    code = unsegment.cli.main(
        [str(example_image), str(tmp_path / "out.png"), "--surrogate", f"sam_vit={path}"]
    )
    assert code != 0 and "--layers 3,4,5,6: sam_vit has blocks 0..4" in capsys.readouterr().err
    code = unsegment.cli.main(
        [str(example_image), str(tmp_path / "out.png"), "--surrogate", "sam_vit"]
    )
    assert code != 0 and "no official checkpoint for model 'sam_vit'" in capsys.readouterr().err


def test_sam_vit_is_a_vit_surrogate_of_its_own_input_size(tmp_path):
    torch.manual_seed(0)
    state = unsegment.models.build_sam_vit(SMALL_VIT).state_dict()
    torch.save(state, tmp_path / "small.pth")
    model = unsegment.models.load_model("sam_vit", tmp_path / "small.pth")
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    surrogate = uad.Surrogate.of(model)
    assert isinstance(surrogate, uad.ViTSurrogate) and surrogate.input_size == 64
    feats = surrogate.features(torch.rand(1, 3, 40, 48), uad.UADConfig(layers=(1, 4)))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 8, 32)] * 2
    with pytest.raises(UADError, match="unknown architecture .* load it as sam_vit"):
        unsegment.models.load_model("vit_b", tmp_path / "small.pth")
    with pytest.raises(UADError, match="not a SAM v1 checkpoint with a windowed ViT"):
        unsegment.models.vit_arch({k: v for k, v in state.items() if "rel_pos" not in k}, "x")
