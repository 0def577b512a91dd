"""Every kind of bad input the issue lists gets a manifest row with a specific reason, no crash.

One folder holds all of them; one extraction run over it (module fixture) is checked row by row.
"""
import dataclasses
import json
import shutil
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from avemo.audio import at_gain
from avemo.extraction import ClipExtractor
from avemo.features import ClipFeatures, ExtractionSettings
from extract import extract_folder
from mediagen import astronaut, random_encoder, tone, two_faces, write_audio, write_tracks, write_video

CREMAD = Path(__file__).resolve().parent.parent / "examples" / "cremad"
CONTAINERS = [("vp8_opus.webm", "libvpx", "libopus", 48000), ("mpeg4_mp3.avi", "mpeg4", "libmp3lame", 44100),
              ("h264_aac.mov", "libx264", "aac", 16000), ("h264_aac.m4v", "libx264", "aac", 22050),
              ("mpeg1_mp2.mpg", "mpeg1video", "mp2", 44100)]


def _truncate(src: Path, dst: Path, keep: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def _syllables(rng, seconds: float = 1.5, rate: int = 16000) -> np.ndarray:
    """Voiced bursts with pauses between them: a harmonic tone under a syllable-rate envelope, and hiss."""
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 2
    return (0.15 * envelope * voiced + 0.002 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("bad")
    clips = d / "clips"
    clips.mkdir()
    face = astronaut(128)
    ten = [face] * 10
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "text.mp4").write_text("this is not a video\n" * 50)
    (clips / "notes.txt").write_text("a file that is not media\n")
    good_mp4 = write_video(d / "good.mp4", ten, audio=tone(1.0, 16000))
    good_mkv = write_video(d / "good.mkv", [face] * 20, audio=tone(2.0, 16000))
    _truncate(good_mp4, clips / "truncated.mp4", 0.5)        # index (moov) is at the end: gone
    _truncate(good_mkv, clips / "truncated.mkv", 0.5)        # streamable: the first half plays
    rng = np.random.default_rng(0)
    data = bytearray(good_mkv.read_bytes())
    i = len(data) // 3
    data[i:i + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (clips / "corrupt_middle.mkv").write_bytes(bytes(data))
    data = bytearray(good_mkv.read_bytes())
    data[:512] = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    (clips / "corrupt_header.mkv").write_bytes(bytes(data))
    write_video(clips / "no_audio.mp4", ten)
    write_audio(clips / "audio_only.mp4", tone(1.0, 16000), 16000)
    noise = [rng.integers(0, 256, (128, 160, 3), dtype=np.uint8) for _ in range(10)]
    write_video(clips / "no_face.mp4", noise, audio=tone(1.0, 16000))
    write_video(clips / "two_faces.mp4", two_faces(8), audio=tone(1.0, 16000))
    write_video(clips / "one_frame.mp4", [face], audio=tone(0.5, 16000))
    write_audio(clips / "short.wav", tone(0.01, 16000), 16000)
    write_video(clips / "short_audio.mkv", ten, audio=tone(0.01, 16000), audio_codec="pcm_s16le")
    write_audio(clips / "silent.wav", np.zeros((1, 16000), np.float32), 16000)
    write_video(clips / "silent_audio.mkv", ten, audio=np.zeros((1, 16000), np.float32))
    write_audio(clips / "stereo_8k.wav", tone(1.0, 8000, channels=2), 8000)
    write_audio(clips / "stereo_48k.flac", tone(1.0, 48000, channels=2), 48000)
    # recordings a cheap or miswired microphone makes of the same sound as speech.wav
    speech = _syllables(rng)
    write_audio(clips / "speech.wav", speech[None], 16000)
    write_audio(clips / "phase_inverted.wav", np.stack([speech, -speech]), 16000)
    write_audio(clips / "half_inverted.flac", np.stack([speech, -0.5 * speech]), 16000)
    write_audio(clips / "dc_offset.wav", speech[None] + 0.3, 16000)
    silence = np.zeros((1, len(speech)), np.float32)
    write_tracks(clips / "third_track.mka", [silence, silence, speech[None]], 16000)   # a camera's empty inputs first
    write_video(clips / "one_fps.mp4", [face] * 3, fps=1)     # the last frame is on screen from 2 s to 3 s
    # portrait 128 x 256 as displayed (face in the lower half), stored landscape + rotation flag
    portrait = np.full((256, 128, 3), 60, np.uint8)
    portrait[128:] = face
    write_video(clips / "rotated.mp4", [np.ascontiguousarray(np.rot90(portrait, -1))] * 4, rotation=90)
    # a camcorder's anamorphic frames: stored 96 wide, shown 128 wide (pixels 4:3), the face squeezed in the file
    squeezed = cv2.resize(face, (96, 128), interpolation=cv2.INTER_AREA)
    write_video(clips / "anamorphic.mp4", [squeezed] * 4, codec="libx264", pixel_aspect=Fraction(4, 3))
    big = np.full((2160, 3840, 3), 120, np.uint8)
    big[600:1624, 1400:2424] = astronaut(1024)
    write_video(clips / "large_4k.mp4", [big] * 2, fps=2)
    for name, vcodec, acodec, rate in CONTAINERS:
        write_video(clips / name, ten, fps=25, codec=vcodec, audio=tone(1.0, rate), audio_rate=rate,
                    audio_codec=acodec)
    write_audio(clips / "opus.ogg", tone(1.0, 48000), 48000)
    # a camcorder's AVCHD file, a phone's voice note, a Mac's recording: once passed over as "not media"
    write_video(clips / "00001.MTS", ten, fps=25, codec="libx264", audio=tone(1.0, 48000), audio_rate=48000)
    write_audio(clips / "voice note.opus", tone(1.0, 48000), 48000)
    write_audio(clips / "memo.aiff", tone(1.0, 44100), 44100)
    write_audio(clips / "aac.m4a", tone(1.0, 16000), 16000)
    (clips / "sub dir ü").mkdir()
    shutil.copy(CREMAD / "1001_DFA_HAP_XX.flv", clips / "sub dir ü" / "vidéo avec espaces.flv")
    # a macOS copy's resource fork and a tool's hidden folder: skipped, not failed clips
    (clips / "._one_frame.mp4").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (clips / ".thumbnails").mkdir()
    (clips / ".thumbnails" / "x.mp4").write_bytes(b"not a video")
    enc = random_encoder(d / "enc.pt")
    out = d / "cache"
    manifest = extract_folder(clips, out, frames=4, face_encoder=str(enc), device="cpu", progress=False)
    return manifest.set_index("clip"), out


def row(run, clip):
    manifest, _ = run
    assert clip in manifest.index, f"{clip} has no manifest row"
    return manifest.loc[clip]


def features(run, clip) -> ClipFeatures:
    manifest, out = run
    return ClipFeatures.load(out / manifest.loc[clip, "feature_file"], with_crops=True)


def test_every_file_found_has_exactly_one_row(run):
    manifest, out = run
    clips = out.parent / "clips"
    files = [p for p in clips.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(clips).parts)]
    assert len(manifest) == len(files) and manifest.index.is_unique
    assert not any("._" in c or ".thumbnails" in c for c in manifest.index)
    assert set(manifest["status"]) <= {"ok", "partial", "failed"}
    failed = manifest[manifest.status == "failed"]
    assert failed["reason"].notna().all() and failed["feature_file"].isna().all()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("clip, reason", [
    ("empty.mp4", "empty file (0 bytes)"),
    ("text.mp4", "not a readable media file"),
    ("truncated.mp4", "not a readable media file"),
    ("corrupt_header.mkv", "not a readable media file"),
    ("notes.txt", "not a media file (extension '.txt'"),
    ("short.wav", "audio: shorter than one spectrogram window"),
    ("silent.wav", "audio: the audio track is silent"),
])
def test_unusable_files_fail_with_a_specific_reason(run, clip, reason):
    r = row(run, clip)
    assert r.status == "failed"
    assert reason in r.reason


@pytest.mark.parametrize("clip, reason, has_video, has_audio", [
    ("no_audio.mp4", "audio: no audio stream", True, False),
    ("audio_only.mp4", "video: no video stream (audio-only file)", False, True),
    ("no_face.mp4", "video: no face found in any of 4 sampled frame(s)", False, True),
    ("short_audio.mkv", "audio: shorter than one spectrogram window", True, False),
    ("silent_audio.mkv", "audio: the audio track is silent", True, False),
])
def test_a_missing_modality_is_partial_with_the_reason(run, clip, reason, has_video, has_audio):
    r = row(run, clip)
    assert r.status == "partial" and reason in r.reason
    assert (bool(r.has_video), bool(r.has_audio)) == (has_video, has_audio)
    c = features(run, clip)
    assert c.has_video == has_video and c.has_audio == has_audio


def test_no_face_keeps_the_frames_masked_so_time_stays_aligned(run):
    c = features(run, "no_face.mp4")
    assert c.frames_sampled == 4 and not c.arrays["face_mask"].any()
    assert np.all(np.diff(c.arrays["frame_times"]) > 0)
    assert np.isnan(c.arrays["boxes"]).all() and (c.arrays["video_features"] == 0).all()


def test_truncated_streamable_file_keeps_what_plays_and_says_so(run):
    r = row(run, "truncated.mkv")
    assert r.status in ("ok", "partial") and "truncated file?" in r.reason
    c = features(run, "truncated.mkv")
    assert c.arrays["frame_times"].max() < 1.1      # only the first half exists


def test_damaged_middle_is_reported(run):
    r = row(run, "corrupt_middle.mkv")
    assert r.status in ("ok", "partial")
    assert "damaged" in r.reason


@pytest.mark.parametrize("tracking", [True, False])
def test_several_faces_keep_one_person_not_the_largest_per_frame(run, tracking):
    # person B enters between keyframes: with tracking (the default) the full detector next runs
    # after this 4-frame clip ends, so only full detection sees both people and warns
    if tracking:
        assert row(run, "two_faces.mp4").status == "ok"
        c = features(run, "two_faces.mp4")
    else:
        cache = run[1]
        settings = ExtractionSettings.from_dict(json.loads((cache / "settings.json").read_text())["settings"])
        ex = ClipExtractor(dataclasses.replace(settings, track_faces=False), "cpu")
        c = ex.extract(cache.parent / "clips" / "two_faces.mp4")
        assert any("several faces" in w for w in c.warnings)
    boxes = c.arrays["boxes"][c.arrays["face_mask"]]
    assert len(boxes) == 4
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (centres < 320).all(), "switched to the other (larger, later) person"


def test_one_frame_video_gives_one_frame_not_copies(run):
    r = row(run, "one_frame.mp4")
    assert r.status == "ok" and r.frames_sampled == 1
    assert "only 1 distinct frame" in r.reason


@pytest.mark.parametrize("clip", ["stereo_8k.wav", "stereo_48k.flac"])
def test_stereo_at_any_rate_becomes_16k_mono_mel(run, clip):
    r = row(run, clip)
    assert r.status == "ok" and r.audio_seconds == pytest.approx(1.0, abs=0.03)
    mel = features(run, clip).arrays["mel"]
    assert mel.shape[0] == 64 and abs(mel.shape[1] - 101) <= 3       # 10 ms hop at 16 kHz
    assert np.isfinite(mel).all()


@pytest.mark.parametrize("clip", ["phase_inverted.wav", "half_inverted.flac"])
def test_a_stereo_pair_that_cancels_when_averaged_is_mixed_as_its_difference(run, clip):
    # averaged, [s, -s] is silence: the clip was lost as "silent" (and [s, -s/2] kept a quarter of s)
    r = row(run, clip)
    assert r.status == "ok" and "phase-inverted" in r.reason
    reference, mel = features(run, "speech.wav").arrays["mel"], features(run, clip).arrays["mel"]
    gain_db = 0.0 if clip == "phase_inverted.wav" else 20 * np.log10(0.75)    # (s + s/2) / 2
    _same_where_loud(mel, at_gain(torch.from_numpy(reference), gain_db).numpy())
    assert "phase-inverted" not in str(row(run, "stereo_48k.flac").reason)


def test_a_dc_offset_is_taken_out_before_trimming_and_the_spectrogram(run):
    # +0.3 on every sample would fill the lowest mel band, defeat silence trimming and read as loud
    r = row(run, "dc_offset.wav")
    assert r.status == "ok"
    reference, mel = features(run, "speech.wav").arrays["mel"], features(run, "dc_offset.wav").arrays["mel"]
    _same_where_loud(mel, reference)


def _same_where_loud(mel: np.ndarray, expected: np.ndarray) -> None:
    loud = expected > expected.max() - 8          # within 35 dB of the peak: the hiss's 16-bit rounding aside
    assert mel.shape == expected.shape and loud.mean() > 0.1
    np.testing.assert_allclose(mel[loud], expected[loud], atol=0.05)


def test_the_first_audio_track_that_is_not_silent_is_used(run):
    r = row(run, "third_track.mka")
    assert r.status == "ok" and "tracks 1-2 are silent: used track 3 of 3" in r.reason
    _same_where_loud(features(run, "third_track.mka").arrays["mel"], features(run, "speech.wav").arrays["mel"])


@pytest.mark.parametrize("clip, video", [("00001.MTS", True), ("voice note.opus", False), ("memo.aiff", False)])
def test_camcorder_phone_and_mac_containers_are_media(run, clip, video):
    r = row(run, clip)
    assert r.status == "ok" and r.has_audio and r.has_video == video
    assert r.audio_seconds == pytest.approx(1.0, abs=0.05)


def test_a_low_frame_rate_is_not_taken_for_a_truncated_file(run):
    r = row(run, "one_fps.mp4")
    assert r.face_coverage == 1.0 and "truncated" not in str(r.reason)


def test_rotation_metadata_is_applied(run):
    r = row(run, "rotated.mp4")
    assert r.face_coverage == 1.0
    boxes = features(run, "rotated.mp4").arrays["boxes"]
    # upright portrait: 128 wide, 256 tall, face in the lower half
    assert (boxes[:, 2] <= 130).all() and (boxes[:, 1] > 128).all()


def test_anamorphic_frames_are_seen_as_shown(run):
    # decoded as stored, the face was 25 % narrower than it is, and so was the crop the encoder saw
    reference, clip = features(run, "no_audio.mp4").arrays, features(run, "anamorphic.mp4").arrays
    assert row(run, "anamorphic.mp4").face_coverage == 1.0
    np.testing.assert_allclose(clip["boxes"][0], reference["boxes"][0], atol=6)    # shown pixels (128 wide), not stored (96)
    eyes = lambda a: a["landmarks"][0, 1, 0] - a["landmarks"][0, 0, 0]             # noqa: E731
    assert eyes(clip) == pytest.approx(eyes(reference), rel=0.1)


def test_very_large_frames_are_found_in_source_pixels(run):
    r = row(run, "large_4k.mp4")
    assert r.face_coverage == 1.0
    b = features(run, "large_4k.mp4").arrays["boxes"][0]
    # the face spans ~170 px of the 1024 px photo placed at x = 1400 of the 3840 px frame
    assert 1650 < b[0] < 1950 and b[2] - b[0] > 100


def test_spaces_and_non_ascii_paths(run):
    clip = "sub dir ü/vidéo avec espaces.flv"
    r = row(run, clip)
    assert r.status == "ok" and r.face_coverage == 1.0
    assert r.feature_file.isascii()
    assert features(run, clip).clip == clip


@pytest.mark.parametrize("clip", [c[0] for c in CONTAINERS])
def test_every_listed_video_container_extracts(run, clip):
    r = row(run, clip)
    assert r.status == "ok" and r.face_coverage == 1.0 and r.frames_sampled == 4
    assert r.audio_seconds == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("clip", ["opus.ogg", "aac.m4a"])
def test_every_listed_audio_container_extracts(run, clip):
    r = row(run, clip)
    assert r.status == "ok" and not r.has_video and r.audio_seconds == pytest.approx(1.0, abs=0.1)
