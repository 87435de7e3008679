"""Checkpoints (unsegment.models): unreadable files; the download, its SHA-256 check, the cache."""

import hashlib

import pytest

import uad
import unsegment.models


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
