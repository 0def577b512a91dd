"""avemo-extract on the bundled CREMA-D clips: cache contents, resume, refusal, shards, kill + resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avemo.extraction import ClipError, ClipExtractor, _Look
from avemo.faces import Detections, similarity_transform, track_primary_face
from avemo.features import ClipFeatures, ExtractionSettings
from avemo.media import list_folder
from avemo.video import VideoFrames, sample_times
from extract import SettingsMismatch, UsageError, extract_folder, read_manifest
from extract.cli import main
from extract.labels import Labeller, LabelError
from extract.run import in_shard, parse_shard
from mediagen import random_encoder, unlistable

REPO = Path(__file__).resolve().parent.parent
CREMAD = REPO / "examples" / "cremad"
# audio clips sort first, so a run killed after three rows is half way through the slow ones
PICK = ["audio/1002_DFA_FEA_XX.mp3", "audio/1002_DFA_NEU_XX.mp3", "video/1001_DFA_ANG_XX.flv",
        "video/1001_DFA_HAP_XX.flv"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("extract")
    clips = d / "clips"
    clips.mkdir()
    for name in PICK:
        (clips / name).parent.mkdir(exist_ok=True)
        shutil.copy(CREMAD / Path(name).name, clips / name)
    enc = random_encoder(d / "enc.pt")
    kw = dict(frames=4, label_from="cremad", face_encoder=str(enc), device="cpu", progress=False)
    manifest = extract_folder(clips, d / "cache", **kw)
    return d, clips, kw, manifest


def _same_cache(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    pd.testing.assert_frame_equal(ma, mb)
    for f in ma["feature_file"].dropna():
        ca, cb = ClipFeatures.load(a / f), ClipFeatures.load(b / f)
        assert ca.meta() == cb.meta() and set(ca.arrays) == set(cb.arrays)
        for k in ca.arrays:
            np.testing.assert_allclose(ca.arrays[k], cb.arrays[k], rtol=1e-4, atol=1e-5, err_msg=f"{f} {k}")
    assert not list(b.rglob("*.tmp"))


def test_cache_holds_one_row_and_file_per_clip(setup):
    d, _, _, manifest = setup
    assert list(manifest["clip"]) == sorted(PICK)
    assert (manifest["status"] == "ok").all()
    m = manifest.set_index("clip")
    assert m.loc["video/1001_DFA_HAP_XX.flv", "label"] == "happy" and m.loc["video/1001_DFA_HAP_XX.flv", "speaker"] == "1001"
    assert m.loc["audio/1002_DFA_FEA_XX.mp3", "label"] == "fear" and m.loc["audio/1002_DFA_FEA_XX.mp3", "speaker"] == "1002"
    for col in ("clip", "status", "reason", "label", "speaker", "feature_file", "duration", "frames_sampled",
                "face_coverage", "audio_seconds", "settings_hash"):
        assert col in manifest.columns
    # the CSV on disk reads back the same (speakers stay text, not numbers)
    disk = read_manifest(d / "cache")
    assert list(disk["speaker"]) == list(manifest["speaker"])
    video = ClipFeatures.load(d / "cache" / m.loc["video/1001_DFA_ANG_XX.flv", "feature_file"])
    s = ExtractionSettings.from_dict(video.settings)
    assert s.frames == 4 and len(s.encoder_sha256) == 64 and s.feature_dim > 0
    assert m.loc["video/1001_DFA_ANG_XX.flv", "settings_hash"] == s.digest()
    a = video.arrays
    assert a["video_features"].shape == (4, s.feature_dim) and a["face_mask"].all()
    assert np.all(np.diff(a["frame_times"]) > 0) and 0 <= a["frame_times"][0] and a["frame_times"][-1] < video.duration
    assert a["boxes"].shape == (4, 4) and (a["scores"] > 0.9).all() and a["landmarks"].shape == (4, 5, 2)
    assert a["mel"].shape[0] == s.n_mels and a["mel"].shape[1] > 150    # ~2 s at a 10 ms hop
    audio = ClipFeatures.load(d / "cache" / m.loc["audio/1002_DFA_NEU_XX.mp3", "feature_file"])
    assert audio.has_audio and not audio.has_video and "video_features" not in audio.arrays


def test_rerun_skips_finished_clips(setup, capsys):
    d, clips, kw, manifest = setup
    npz = sorted((d / "cache" / "features").glob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in npz]
    again = extract_folder(clips, d / "cache", **kw)
    pd.testing.assert_frame_equal(again, manifest)
    assert [p.stat().st_mtime_ns for p in npz] == stamps
    assert "4 already done, 0 to extract" in capsys.readouterr().err


def test_other_settings_are_refused_not_mixed(setup):
    d, clips, kw, _ = setup
    with pytest.raises(SettingsMismatch, match=r"frames: 4 in the cache, 6 now"):
        extract_folder(clips, d / "cache", **{**kw, "frames": 6})
    assert main([str(clips), "--out", str(d / "cache"), "--frames", "6", "--face-encoder", kw["face_encoder"],
                 "--quiet"]) == 2


def test_a_cache_begun_by_an_earlier_release_goes_on_as_begun(setup, tmp_path, capsys):
    """A cache from before the second look for small faces (its settings lack the field) resumes as it
    was made; asking for the second look on it is refused, not mixed."""
    d, clips, kw, _ = setup
    before = extract_folder(clips, tmp_path / "cache", **kw, small_face_side=0)
    record = tmp_path / "cache" / "settings.json"
    saved = json.loads(record.read_text())
    del saved["settings"]["small_face_side"]        # as written before the field (same digest: legacy value)
    record.write_text(json.dumps(saved))
    capsys.readouterr()
    pd.testing.assert_frame_equal(extract_folder(clips, tmp_path / "cache", **kw), before)
    err = capsys.readouterr().err
    assert "begun by an earlier avemo; going on as it was begun (small_face_side=0)" in err
    assert "4 already done, 0 to extract" in err
    with pytest.raises(SettingsMismatch, match=r"small_face_side: 0 in the cache, 1920 now"):
        extract_folder(clips, tmp_path / "cache", **kw, small_face_side=1920)


def test_keep_crops_later_adds_crops_to_video_clips(setup, tmp_path):
    d, clips, kw, manifest = setup
    shutil.copytree(d / "cache", tmp_path / "cache")
    m = extract_folder(clips, tmp_path / "cache", **{**kw, "keep_crops": True}).set_index("clip")
    c = ClipFeatures.load(tmp_path / "cache" / m.loc["video/1001_DFA_HAP_XX.flv", "feature_file"], with_crops=True)
    assert c.arrays["crops"].shape == (4, 112, 112, 3) and c.arrays["crops"].dtype == np.uint8
    assert c.arrays["crops"].mean() > 20            # real pixels, not an empty array
    assert m["crops"].sum() == 2


def test_feature_maps_are_written_only_when_asked_and_added_to_a_cache_later(setup, tmp_path):
    d, clips, kw, manifest = setup
    m = manifest.set_index("clip")
    plain = ClipFeatures.load(d / "cache" / m.loc["video/1001_DFA_HAP_XX.flv", "feature_file"])
    assert "feature_maps" not in plain.arrays and not manifest["feature_maps"].any()
    shutil.copytree(d / "cache", tmp_path / "cache")
    m = extract_folder(clips, tmp_path / "cache", **{**kw, "feature_maps": True}).set_index("clip")
    assert m["feature_maps"].sum() == 2                         # the two video clips, redone; audio clips kept
    c = ClipFeatures.load(tmp_path / "cache" / m.loc["video/1001_DFA_HAP_XX.flv", "feature_file"])
    maps, feats = c.arrays["feature_maps"], c.arrays["video_features"]
    # the random EfficientFace at 112 px (stem stride 2 and max-pool, as in the paper) ends on 4 x 4 cells
    assert maps.shape == (4, 4, 4, feats.shape[1]) and maps.dtype == np.float16
    # the pooled feature is the mean of its map's cells (float16 storage aside)
    np.testing.assert_allclose(maps.astype(np.float32).mean((1, 2)), feats, rtol=1e-2, atol=1e-3)
    assert ExtractionSettings.from_dict(c.settings).digest() == ExtractionSettings.from_dict(plain.settings).digest()
    audio = ClipFeatures.load(tmp_path / "cache" / m.loc["audio/1002_DFA_NEU_XX.mp3", "feature_file"])
    assert "feature_maps" not in audio.arrays


def test_frames_without_a_face_have_zero_maps():
    ex = ClipExtractor(ExtractionSettings(frames=4, feature_maps=True), "cpu")
    look = _Look(VideoFrames(), [0.0, 0.1], [Detections.empty(), Detections.empty()], [None, None], [None, None],
                 [None, None])
    out = ex._primary_face_arrays(look, [])
    assert out["feature_maps"].shape == (2, *ex.encoder.map_grid, ex.settings.feature_dim)
    assert not out["feature_maps"].any() and not out["face_mask"].any()


def test_shards_fill_one_cache_like_a_single_run(setup, tmp_path):
    d, clips, kw, _ = setup
    first = extract_folder(clips, tmp_path / "cache", shard="1/2", **kw)
    n_first = len(first)
    last = extract_folder(clips, tmp_path / "cache", shard="2/2", **kw)
    assert 0 < n_first < 4 and len(last) == 4
    _same_cache(d / "cache", tmp_path / "cache")


def test_shard_split_is_a_partition():
    clips = [f"dir/{i}.mp4" for i in range(200)]
    parts = [[c for c in clips if in_shard(c, (i, 4))] for i in range(1, 5)]
    assert sorted(sum(parts, [])) == sorted(clips) and all(20 < len(p) < 80 for p in parts)
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_killed_run_resumes_to_the_same_cache(setup, tmp_path):
    d, clips, kw, _ = setup
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "extract.cli", str(clips), "--out", str(out), "--frames", "4",
           "--label-from", "cremad", "--face-encoder", kw["face_encoder"], "--device", "cpu", "--quiet",
           "--workers", "1"]   # one clip at a time, so that the kill lands between two
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "rows").glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "rows").glob("*.json")))
    assert done == 3, f"the kill did not land half way ({done} of 4 done)"
    assert not (out / "manifest.csv").exists()
    extract_folder(clips, out, **kw)
    _same_cache(d / "cache", out)


def test_cli_exit_codes(setup, tmp_path, capsys):
    _, _, kw, _ = setup
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "no such folder" in capsys.readouterr().err
    one = tmp_path / "one.wav"
    one.write_bytes(b"RIFF")
    assert main([str(one), "--out", str(tmp_path / "c")]) == 2
    assert "is a file; avemo-extract reads a folder of clips" in capsys.readouterr().err
    assert main(["https://example.org/clips", "--out", str(tmp_path / "c")]) == 2
    assert "reads local folders only" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    (junk / "fake.mp4").write_text("hello")
    assert main([str(junk), "--out", str(tmp_path / "c1"), "--face-encoder", kw["face_encoder"], "--quiet"]) == 1
    assert "no clip could be extracted" in capsys.readouterr().err
    assert main([str(junk), "--out", str(tmp_path / "c2"), "--face-encoder", str(tmp_path / "nope.pt")]) == 2
    assert "face encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(junk), "--out", str(tmp_path / "c3"), "--frames", "4", "--fps", "2"])
    if not torch.cuda.is_available():      # the workers report it; the command says it and stops
        assert main([str(junk), "--out", str(tmp_path / "c4"), "--face-encoder", kw["face_encoder"],
                     "--device", "cuda", "--quiet"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_cache_inside_the_input_folder_is_not_walked(setup, tmp_path):
    _, _, kw, _ = setup
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(CREMAD / "1002_DFA_SAD_XX.mp3", clips / "a.mp3")
    extract_folder(clips, clips / "cache", **kw)
    m = extract_folder(clips, clips / "cache", **kw)
    assert list(m["clip"]) == ["a.mp3"]


def test_linked_folders_are_walked_once_and_link_loops_end(tmp_path):
    clips, outside = tmp_path / "clips", tmp_path / "outside"
    (clips / "sub").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    for f in (clips / "a.mp3", outside / "b.mp3", outside / "deep" / "c.mp3"):
        f.write_bytes(b"x")
    (clips / "again").symlink_to(outside)             # a dataset linked in: walked
    (clips / "ext").symlink_to(outside)               # a second way to it: not walked again
    (clips / "side").symlink_to(clips / "sub")        # into the folder itself: not followed
    (clips / "sub" / "up").symlink_to(clips)          # a loop
    (outside / "deep" / "back").symlink_to(clips)     # a loop through the linked folder
    (clips / "zdeep").symlink_to(outside / "deep")    # part of the linked folder, by another way
    listing = list_folder(clips)
    names = [p.relative_to(clips).as_posix() for p in listing.files]
    assert names[0] == "a.mp3" and names[1] == "again/b.mp3" and len(names) == 3
    assert names[2] in ("again/deep/c.mp3", "zdeep/c.mp3")    # each file once, by one of its paths
    assert not listing.unlisted and listing.hidden == 0


def test_a_replaced_file_is_extracted_again(setup, tmp_path):
    _, _, kw, _ = setup
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "b.mp3").write_text("not yet the real file")
    assert extract_folder(clips, tmp_path / "cache", **kw).loc[0, "status"] == "failed"
    assert extract_folder(clips, tmp_path / "cache", **kw).loc[0, "status"] == "failed"
    shutil.copy(CREMAD / "1002_DFA_HAP_XX.mp3", clips / "b.mp3")
    m = extract_folder(clips, tmp_path / "cache", **kw)
    assert m.loc[0, "status"] == "ok" and m.loc[0, "audio_seconds"] > 1.5


def test_a_folder_that_cannot_be_listed_is_a_row_with_its_reason(setup, tmp_path, monkeypatch):
    _, _, kw, _ = setup
    clips = tmp_path / "clips"
    (clips / "locked").mkdir(parents=True)
    shutil.copy(CREMAD / "1002_DFA_SAD_XX.mp3", clips / "a.mp3")
    shutil.copy(CREMAD / "1002_DFA_HAP_XX.mp3", clips / "locked" / "b.mp3")
    unlistable(monkeypatch, clips / "locked")
    for _ in range(2):       # a re-run looks again, and still says so
        m = extract_folder(clips, tmp_path / "cache", **kw).set_index("clip")
        assert list(m.index) == ["a.mp3", "locked"] and m.loc["a.mp3", "status"] == "ok"
        assert m.loc["locked", "status"] == "failed"
        assert m.loc["locked", "reason"] == "cannot list this folder (Permission denied); the files in it were not read"
    monkeypatch.undo()       # readable again: its clips are extracted and the folder's row is gone
    m = extract_folder(clips, tmp_path / "cache", **kw).set_index("clip")
    assert list(m.index) == ["a.mp3", "locked/b.mp3"] and set(m["status"]) == {"ok"}
    unlistable(monkeypatch, clips)
    with pytest.raises(UsageError, match="cannot list this folder .Permission denied.$"):
        extract_folder(clips, tmp_path / "cache", **kw)


@pytest.mark.slow
def test_workers_give_the_same_cache(setup, tmp_path):
    d, clips, kw, _ = setup
    extract_folder(clips, tmp_path / "cache", workers=2, **kw)
    _same_cache(d / "cache", tmp_path / "cache")


def test_time_window_of_a_clip(setup):
    d, _, kw, _ = setup
    ex = ClipExtractor(ExtractionSettings(frames=4, encoder=kw["face_encoder"]), "cpu")
    c = ex.extract(CREMAD / "1001_DFA_ANG_XX.flv", start=0.5, end=1.5)
    t = c.arrays["frame_times"]
    assert len(t) == 4 and 0.45 <= t.min() and t.max() < 1.5
    assert c.arrays["mel"].shape[1] <= 102
    with pytest.raises(ClipError, match="empty file"):
        (d / "zero.mp4").write_bytes(b"")
        ex.extract(d / "zero.mp4")
    with pytest.raises(ValueError, match="sha256"):
        ClipExtractor(ExtractionSettings(encoder=kw["face_encoder"], encoder_sha256="0" * 64), "cpu")


# ---- pieces ----

def test_labels_from_file_names_folders_and_csv(tmp_path):
    assert Labeller("cremad")("x/1001_DFA_ANG_XX.flv") == ("angry", "1001", None)
    assert Labeller("ravdess")("Actor_12/02-01-06-01-02-01-12.mp4") == ("fear", "12", None)
    assert Labeller("emodb")("03a01Fa.wav") == ("happy", "03", None)
    assert Labeller("folder")("sad/clip 1.mp4") == ("sad", None, None)
    label, speaker, note = Labeller("cremad")("holiday.mp4")
    assert label is None and "CREMA-D" in note
    csv = tmp_path / "labels.csv"
    csv.write_text("clip,label,speaker\na/b.mp4,happy,s1\nc.wav,sad,\n")
    lab = Labeller(csv=csv)
    assert lab("a/b.mp4") == ("happy", "s1", None) and lab("c.wav") == ("sad", None, None)
    assert lab("other.mp4")[2] == "not listed in the labels CSV"
    (tmp_path / "bad.csv").write_text("file,emotion\nx,y\n")
    with pytest.raises(LabelError, match="the header must name the columns clip, label"):
        Labeller(csv=tmp_path / "bad.csv")
    with pytest.raises(LabelError, match="unknown label scheme"):
        Labeller("affectnet")


def test_labels_csv_ambiguity_and_malformed_rows_are_errors_that_name_the_row(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("clip,label,speaker\nsame.mp3,happy,s1\nunique.wav,sad,s2\n")
    lab = Labeller(csv=csv)
    lab.bind(["x/unique.wav", "a/other.mp3"])
    assert lab("x/unique.wav") == ("sad", "s2", None)            # a bare name that fits one file
    with pytest.raises(LabelError, match=r"line 2: 'same.mp3' names no folder and matches 2 files \(a/same.mp3, b/same.mp3\)"):
        lab.bind(["a/same.mp3", "b/same.mp3"])
    csv.write_text("clip,label\nsame.mp3,happy\na/same.mp3,sad\n")
    with pytest.raises(LabelError, match="lines 2 and 3 both label 'a/same.mp3'"):
        Labeller(csv=csv).bind(["a/same.mp3"])
    csv.write_text("clip,label,speaker\nok.mp4,happy,s1\nmy,clip.mp4,sad,s2\nlater.mp4,angry,s3\n")
    with pytest.raises(LabelError, match="line 3: 4 fields where the header has 3"):
        Labeller(csv=csv)
    csv.write_text('clip,label,speaker\n"my,clip.mp4",sad,s2\n')    # quoted, it is one field
    assert Labeller(csv=csv)("my,clip.mp4") == ("sad", "s2", None)
    csv.write_text("clip,label\na.mp4,happy\na.mp4,sad\n")
    with pytest.raises(LabelError, match="line 3: 'a.mp4' is listed again \\(first on line 2\\)"):
        Labeller(csv=csv)


def test_sampling_is_uniform_in_time():
    t = sample_times(0.0, 2.0, frames=4)
    np.testing.assert_allclose(t, [0.25, 0.75, 1.25, 1.75])
    assert len(sample_times(0.0, 10.0, fps=2.5)) == 25
    assert len(sample_times(0.0, 3600.0, fps=30, max_frames=4096)) == 4096


def _det(*boxes):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.99, np.float32), np.zeros((len(b), 5, 2), np.float32))


def test_tracker_follows_one_person_through_a_bigger_visitor():
    a = [10, 10, 60, 60]               # present throughout, moving slowly
    b = [200, 10, 300, 110]            # larger, only in two frames
    dets = [_det(a), _det(b, a), _det(b, [14, 12, 64, 62]), _det([18, 12, 68, 62]), _det()]
    chosen = track_primary_face(dets)
    assert list(chosen) == [0, 1, 1, 0, -1]


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    ang, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    r = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    m = similarity_transform(src, src @ r.T + shift)
    np.testing.assert_allclose(m, np.hstack([r, shift[:, None]]), atol=1e-9)


def test_sparse_sampling_of_a_long_file_seeks_to_the_right_frames(tmp_path):
    from avemo.video import VideoFrames, iter_frames_at, media_duration, open_media, video_stream
    from mediagen import write_video
    # frame i is a flat grey of level i, so a pixel tells which frame came back
    write_video(tmp_path / "long.mp4", [np.full((64, 64, 3), i, np.uint8) for i in range(250)], fps=5)
    with open_media(tmp_path / "long.mp4") as c:
        s = video_stream(c)
        times = sample_times(0.0, media_duration(c, s), fps=0.04)     # 25 s apart: crossed by seeking
        got = list(iter_frames_at(c, s, times, 640, VideoFrames()))
    np.testing.assert_allclose([t for t, _ in got], [12.4, 37.4], atol=0.21)
    np.testing.assert_allclose([f.mean() for _, f in got], [62, 187], atol=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(setup):
    d, _, kw, _ = setup
    clip = CREMAD / "1001_DFA_NEU_XX.flv"
    settings = ExtractionSettings(frames=4, encoder=kw["face_encoder"])
    cpu, gpu = ClipExtractor(settings, "cpu").extract(clip), ClipExtractor(settings, "cuda").extract(clip)
    np.testing.assert_array_equal(cpu.arrays["face_mask"], gpu.arrays["face_mask"])
    # cuDNN runs MTCNN's convolutions in TF32 on recent GPUs: boxes agree to a few % of the face size
    side = cpu.arrays["boxes"][:, 3] - cpu.arrays["boxes"][:, 1]
    assert np.abs(cpu.arrays["boxes"] - gpu.arrays["boxes"]).max() < 0.04 * side.min()
    np.testing.assert_allclose(cpu.arrays["mel"], gpu.arrays["mel"], atol=1e-4)


def _finishes(fn, seconds: float = 120.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    import threading
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"still running after {seconds:.0f} s (a decode loop that never ends?)"
    return box["out"]


def test_sparse_sampling_of_a_long_gop_file_never_seeks_in_a_loop(tmp_path):
    # x264's default GOP of 250 frames at 10 fps puts keyframes 25 s apart: a seek to any
    # target lands up to 25 s behind it, more than SEEK_GAP_S, which once meant seeking again
    # to the same place for ever (issue 9)
    from avemo.video import VideoFrames, iter_frames_at, media_duration, open_media, video_stream
    from mediagen import write_video
    frames = [np.full((48, 64, 3), 16 + i // 10, np.uint8) for i in range(1800)]     # level = second + 16
    write_video(tmp_path / "long_gop.mp4", frames, fps=10, codec="libx264", gop=250)

    def sample():
        with open_media(tmp_path / "long_gop.mp4") as c:
            s = video_stream(c)
            times = np.linspace(0, media_duration(c, s), 16, endpoint=False) + 5.0   # 11 s apart
            return times, list(iter_frames_at(c, s, times, 640, VideoFrames()))
    times, got = _finishes(sample)
    assert len(got) == 16
    np.testing.assert_allclose([t for t, _ in got], times, atol=0.11)
    np.testing.assert_allclose([f.mean() for _, f in got], 16 + np.floor(times - 0.05), atol=1.5)


def test_a_cache_begun_with_a_replaced_default_encoder_goes_on_with_it(tmp_path, capsys):
    # a cache made before `default` was replaced: its settings name `default` with the old file's hash
    from avemo.encoders import WEIGHTS_DIR, file_sha256
    old = file_sha256(WEIGHTS_DIR / "default-v1.pt")
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(CREMAD / "1001_DFA_ANG_XX.flv", clips)
    kw = dict(frames=4, label_from="cremad", device="cpu", progress=False)
    extract_folder(clips, tmp_path / "cache", face_encoder="default", **kw)
    record = json.loads((tmp_path / "cache" / "settings.json").read_text())
    record["settings"]["encoder_sha256"] = old
    record["digest"] = ExtractionSettings.from_dict(record["settings"]).digest()
    (tmp_path / "cache" / "settings.json").write_text(json.dumps(record))
    for f in (tmp_path / "cache" / "features").glob("*.npz"):
        f.unlink()                                # its clip is extracted again, with the old encoder
    m = extract_folder(clips, tmp_path / "cache", face_encoder="default", **kw)
    assert "begun with an earlier 'default' face encoder" in capsys.readouterr().err
    direct = extract_folder(clips, tmp_path / "direct", face_encoder="default-v1", **kw)
    ours = ClipFeatures.load(tmp_path / "cache" / m.loc[0, "feature_file"])
    theirs = ClipFeatures.load(tmp_path / "direct" / direct.loc[0, "feature_file"])
    np.testing.assert_array_equal(ours.arrays["video_features"], theirs.arrays["video_features"])
    assert json.loads((tmp_path / "cache" / "settings.json").read_text())["settings"]["encoder_sha256"] == old


def test_a_copied_folder_keeps_its_clips_and_an_edited_file_is_redone(setup, tmp_path, capsys):
    # cp -r gives every file a new time: the same bytes are not extracted again; other bytes of the same
    # size (an edit in place) are
    _, _, kw, _ = setup
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("1002_DFA_SAD_XX.mp3", "1002_DFA_HAP_XX.mp3"):
        shutil.copy(CREMAD / name, clips / name)
    first = extract_folder(clips, tmp_path / "cache", **kw)
    capsys.readouterr()
    for p in clips.iterdir():
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    edited = clips / "1002_DFA_HAP_XX.mp3"
    data = bytearray(edited.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edited.write_bytes(bytes(data))
    again = extract_folder(clips, tmp_path / "cache", **kw)
    assert "1 already done, 1 to extract" in capsys.readouterr().err
    assert list(again["clip"]) == list(first["clip"]) and list(again["status"]) == ["ok", "ok"]
    extract_folder(clips, tmp_path / "cache", **kw)
    assert "2 already done, 0 to extract" in capsys.readouterr().err
