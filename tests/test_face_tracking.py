"""Faces followed between keyframes (FaceDetector.detect with a FaceTrack) are the faces the
full detector finds, in the same frames, with landmarks a few pixels from its landmarks."""
from pathlib import Path

import numpy as np
import pytest
import torch

from avemo import extraction
from avemo.extraction import ClipError, ClipExtractor
from avemo.faces import Detections, FaceDetector, FaceTrack
from avemo.features import ExtractionSettings
from extract.cli import build_parser
from mediagen import moving_face, random_encoder, sampled_frames, tone, two_faces, write_video

torch.set_num_threads(1)
CLIPS = sorted((Path(__file__).resolve().parent.parent / "examples" / "cremad").glob("1001_DFA_*_XX.flv"))
H, W = 360, 480
PHOTO = 360          # side of the astronaut photo: its face is some 60 pixels wide
# the landmarks of a followed face vs the full detector's: MTCNN's own jitter, a pixel or two
# (the full detector's landmarks move that much between consecutive frames of a still face)
LANDMARK_PX = 4.0


@pytest.fixture(scope="module")
def detector():
    return FaceDetector("cpu", min_face_size=20, min_prob=0.9, min_face_frac=0.08)


def followed(detector, frames, batch=5) -> tuple[list[Detections], FaceTrack]:
    """Detections with tracking, the frames given in batches as extraction gives them."""
    track = FaceTrack()
    out = [d for i in range(0, len(frames), batch) for d in detector.detect(frames[i:i + batch], track)]
    return out, track


def assert_same_faces(full: list[Detections], tracked: list[Detections]) -> None:
    assert [len(d.probs) for d in tracked] == [len(d.probs) for d in full]
    for i, (a, b) in enumerate(zip(full, tracked)):
        for box, marks in zip(a.boxes, a.landmarks):
            # faces are ordered by probability, which may swap two near-certain ones: match by place
            centres = (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
            j = np.argmin(np.linalg.norm(centres - (box[:2] + box[2:]) / 2, axis=1))
            assert np.abs(b.landmarks[j] - marks).max() < LANDMARK_PX, f"frame {i}"
            assert b.probs[j] >= 0.9


SCENES = {
    # (frames, full detections expected with tracking at most)
    "moving": (moving_face(16, (-60, -40, PHOTO), (30, -10, PHOTO), H, W), 2),
    "growing": (moving_face(16, (0, -20, 240), (0, -20, 500), H, W), 2),
    "appearing": (moving_face(16, (-60, -40, PHOTO), (-20, -30, PHOTO), H, W, shown=range(5, 16)), 7),
    "leaving": (moving_face(16, (-60, -40, PHOTO), (-20, -30, PHOTO), H, W, shown=range(11)), 7),
    "second face": (two_faces(16, 240), 2),
    # half a face a frame: too fast to follow, so every frame falls back on the full detector
    "fast": (moving_face(12, (-60, -40, PHOTO), (400, -30, PHOTO), H, W), 12),
}


@pytest.mark.parametrize("scene", SCENES)
def test_followed_faces_are_the_full_detectors(detector, scene):
    frames, most_full = SCENES[scene]
    frames = np.stack(frames)
    full = detector.detect(frames)
    tracked, track = followed(detector, frames)
    assert_same_faces(full, tracked)
    assert track.frames == len(frames) and track.full <= most_full
    assert sum(len(d.probs) > 0 for d in full) >= len(frames) // 2


@pytest.mark.parametrize("clip", CLIPS[:3], ids=lambda p: p.stem)
def test_bundled_clips_followed(detector, clip):
    frames = sampled_frames(clip, 16)
    tracked, track = followed(detector, frames, batch=16)
    assert_same_faces(detector.detect(frames), tracked)
    assert track.full == 2                        # the keyframes, 0 and 8


def test_a_face_entering_is_found_by_the_next_keyframe(detector):
    # person A throughout; B comes in at frame 5 and is missed until the keyframe at 8
    frames = np.stack(two_faces(10, 240)[:1] * 5 + two_faces(10, 240)[-1:] * 5)
    tracked, _ = followed(detector, frames)
    assert [len(d.probs) for d in tracked] == [1] * 8 + [2] * 2
    assert [len(d.probs) for d in detector.detect(frames)] == [1] * 5 + [2] * 5


def test_a_new_frame_size_starts_afresh(detector):
    track = FaceTrack()
    big = np.stack(moving_face(3, (-60, -40, PHOTO), (-60, -40, PHOTO), H, W))
    small = np.ascontiguousarray(big[:, ::2, ::2])
    detector.detect(big, track)
    assert track.full == 1
    (d,) = detector.detect(small[:1], track)      # faces from the big frames would be misplaced
    assert track.full == 2 and len(d.probs) == 1


def test_extraction_with_and_without_tracking(tmp_path):
    enc = random_encoder(tmp_path / "enc.pt")
    clip = CLIPS[0]
    out = {}
    for track in (False, True):
        ex = ClipExtractor(ExtractionSettings(frames=12, encoder=str(enc), track_faces=track), "cpu")
        out[track] = ex.extract(clip).arrays
    np.testing.assert_array_equal(out[True]["face_mask"], out[False]["face_mask"])
    assert out[True]["face_mask"].all()
    assert np.abs(out[True]["landmarks"] - out[False]["landmarks"]).max() < LANDMARK_PX


def test_extract_command_can_turn_tracking_off():
    assert build_parser().parse_args(["in", "--out", "c"]).track_faces is None
    assert build_parser().parse_args(["in", "--out", "c", "--no-face-tracking"]).track_faces is False


def _wide_shot(tmp_path, side: int, name: str, n: int = 5, height: int = 1080, width: int = 1920,
               sound: bool = False) -> Path:
    """An HD video of a grey room with the astronaut photo ``side`` px wide (its face about a fifth of
    that) in it, or no one (side 0); silent, or with a tone."""
    frames = moving_face(n, (width // 2, height // 3, side), (width // 2 + 30, height // 3, side), height, width,
                         shown=range(n) if side else range(0))
    return write_video(tmp_path / name, frames, fps=5, audio=tone(n / 5, 16000) if sound else None)


def test_a_small_face_in_a_wide_shot_is_found_on_a_second_look(tmp_path, monkeypatch):
    monkeypatch.setattr(extraction, "SECOND_LOOK_PROBE", 2)     # 2 frames tried first, then all 5
    clip = _wide_shot(tmp_path, 170, "wide.mp4", sound=True)
    enc = random_encoder(tmp_path / "enc.pt")
    usual = ClipExtractor(ExtractionSettings(frames=5, encoder=str(enc), small_face_side=0), "cpu").extract(clip)
    assert not usual.arrays["face_mask"].any()
    assert usual.warnings == ["video: no face found in any of 5 sampled frame(s)"]
    f = ClipExtractor(ExtractionSettings(frames=5, encoder=str(enc)), "cpu").extract(clip)
    assert f.arrays["face_mask"].all()
    assert any("small faces found on a second look at 1920x1080 (down to 28 px)" in w for w in f.warnings)
    heights = f.arrays["boxes"][:, 3] - f.arrays["boxes"][:, 1]
    assert ((heights > 28) & (heights < 50)).all()             # in the video's pixels, not the look's
    centre_x = (f.arrays["boxes"][:, 0] + f.arrays["boxes"][:, 2]) / 2
    assert (np.abs(centre_x - (960 + 85 + np.linspace(0, 30, 5))) < 20).all()
    assert np.abs(f.arrays["video_features"]).sum(1).min() > 0


def test_a_faceless_video_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(extraction, "SECOND_LOOK_PROBE", 2)     # no face in the 2 tried: the rest are not
    ex = ClipExtractor(ExtractionSettings(frames=5, encoder=str(random_encoder(tmp_path / "enc.pt"))), "cpu")
    looked = []
    real = ex._faces_at
    monkeypatch.setattr(ex, "_faces_at", lambda c, s, times, *a: looked.append(len(times)) or real(c, s, times, *a))
    with pytest.raises(ClipError, match=r"no face found in any of 5 sampled frame\(s\), nor in 2 of them looked at "
                                        r"again at 1920x1080 for faces down to 28 px; audio: no audio stream"):
        ex.extract(_wide_shot(tmp_path, 0, "empty.mp4"))
    assert looked == [5, 2]
    # a small video was already searched down to faces this small: no second look
    looked.clear()
    with pytest.raises(ClipError, match=r"^video: no face found in any of 5 sampled frame\(s\); audio"):
        ex.extract(_wide_shot(tmp_path, 0, "small.mp4", height=360, width=480))
    assert looked == [5]


def test_windows_of_a_faceless_video_look_again_once_in_a_while(tmp_path, monkeypatch):
    ex = ClipExtractor(ExtractionSettings(frames=2, encoder=str(random_encoder(tmp_path / "enc.pt"))), "cpu")
    clip = _wide_shot(tmp_path, 0, "empty.mp4", n=10, sound=True)          # 2 s
    looked = []
    real = ex._faces_at
    monkeypatch.setattr(ex, "_faces_at", lambda c, s, times, *a: looked.append(len(times)) or real(c, s, times, *a))
    first = ex.extract(clip, start=0.0, end=0.5)
    assert looked == [2, 2] and "nor in 2 of them looked at again" in first.warnings[-1]
    later = ex.extract(clip, start=0.5, end=1.0)
    assert looked == [2, 2, 2]
    assert "not looked at again for small faces: that look found none at 0.0 s of this file" in later.warnings[-1]
    monkeypatch.setattr(extraction, "SECOND_LOOK_EVERY_S", 1.0)
    ex.extract(clip, start=1.0, end=1.5)                                   # 1 s on: time to look again
    ex.extract(clip, start=0.0, end=0.5)                                   # going back: a window of its own
    assert looked == [2, 2, 2, 2, 2, 2, 2]


def test_extract_command_sets_the_second_look():
    assert build_parser().parse_args(["in", "--out", "c"]).small_face_side is None
    assert build_parser().parse_args(["in", "--out", "c", "--small-face-side", "0"]).small_face_side == 0
    with pytest.raises(ValueError, match="small_face_side must be >= 0"):
        ExtractionSettings(small_face_side=-1)
