"""The shared contracts: cached clips, settings identity, safe checkpoints, atomic writes."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from avemo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from avemo.features import ClipFeatures, ExtractionSettings, feature_filename
from avemo.io import atomic_path


def test_clip_features_roundtrip_keeps_arrays_and_metadata(tmp_path):
    s = ExtractionSettings(encoder_sha256="abc", feature_dim=8)
    arrays = {
        "video_features": np.random.rand(5, 8).astype(np.float32),
        "face_mask": np.array([1, 0, 1, 1, 0], bool),
        "frame_times": np.linspace(0, 1, 5),
        "mel": np.random.rand(64, 30).astype(np.float32),
    }
    c = ClipFeatures(clip="a b/é.mp4", settings=s.to_dict(), duration=1.2, audio_seconds=0.9,
                     label="hap", speaker="1001", warnings=["w"], arrays=arrays)
    path = tmp_path / feature_filename(c.clip)
    c.save(path)
    d = ClipFeatures.load(path)
    assert d.clip == c.clip and d.label == "hap" and d.speaker == "1001" and d.warnings == ["w"]
    assert set(d.arrays) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(d.arrays[k], arrays[k])
    assert d.has_video and d.has_audio and d.face_coverage == pytest.approx(0.6)
    assert ExtractionSettings.from_dict(d.settings) == s
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_modality_is_data():
    c = ClipFeatures(clip="x.wav", settings={}, arrays={"mel": np.zeros((64, 3), np.float32)})
    assert c.has_audio and not c.has_video and c.frames_sampled == 0


def test_settings_digest_changes_with_numbers_not_with_keep_crops():
    a = ExtractionSettings()
    assert a.digest() == ExtractionSettings(keep_crops=True).digest()
    assert a.digest() != ExtractionSettings(n_mels=80).digest()
    with pytest.raises(ValueError):
        ExtractionSettings(frames=None, fps=None)
    with pytest.raises(ValueError, match="unknown"):
        ExtractionSettings.from_dict({"nonsense": 1})


def test_settings_stored_before_face_tracking_keep_their_meaning_and_identity():
    stored = ExtractionSettings().to_dict()
    # a cache or checkpoint from before the fields
    del stored["track_faces"], stored["feature_maps"], stored["small_face_side"]
    hashed = {k: v for k, v in stored.items() if k != "keep_crops"}
    digest_then = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    s = ExtractionSettings.from_dict(stored)
    assert s.track_faces is False and s.small_face_side == 0 and s.digest() == digest_then
    assert ExtractionSettings().track_faces and ExtractionSettings().digest() != digest_then
    assert ExtractionSettings(track_faces=False, small_face_side=0).digest() == digest_then


def test_feature_maps_add_an_array_and_keep_the_cache_identity(tmp_path):
    s = ExtractionSettings(feature_maps=True, feature_dim=8)
    assert s.digest() == ExtractionSettings(feature_dim=8).digest()      # they add data, change none
    before = {k: v for k, v in s.to_dict().items() if k != "feature_maps"}     # a cache from before the field
    assert ExtractionSettings.from_dict(before).feature_maps is False
    maps = np.random.rand(5, 3, 3, 8).astype(np.float16)
    c = ClipFeatures(clip="a.mp4", settings=s.to_dict(), arrays={
        "video_features": maps.astype(np.float32).mean((1, 2)), "face_mask": np.ones(5, bool), "feature_maps": maps})
    c.save(tmp_path / "a.npz")
    np.testing.assert_array_equal(ClipFeatures.load(tmp_path / "a.npz").arrays["feature_maps"], maps)
    assert "feature_maps" not in ClipFeatures.load(tmp_path / "a.npz", with_maps=False).arrays
    c.arrays["feature_maps"] = np.full((5, 3, 3, 8), np.inf, np.float16)   # beyond float16's range
    assert c.nonfinite() == ["feature_maps"]


def test_feature_filenames_do_not_collide():
    assert feature_filename("a/x.mp4") != feature_filename("b/x.mp4")
    assert feature_filename("sp ace/ü.mp4").isascii()


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_checkpoint_roundtrip_and_version_check(tmp_path):
    p = tmp_path / "m.pt"
    save_checkpoint(p, {"weights": {"w": torch.ones(2)}, "classes": ["a", "b"]}, kind="thing", version=1)
    d = load_checkpoint(p, kind="thing", supported_versions=(1,))
    assert d["classes"] == ["a", "b"] and torch.equal(d["weights"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="version 1 is not supported"):
        load_checkpoint(p, kind="thing", supported_versions=(2,))
    with pytest.raises(CheckpointError, match="expected 'other'"):
        load_checkpoint(p, kind="other", supported_versions=(1,))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "thing", "format_version": 1, "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(p, kind="thing", supported_versions=(1,))


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(p, kind="thing", supported_versions=(1,))
