"""Issue 9: no file, flag or checkpoint can hang, abort or poison a run.

One hostile folder (hangs, broken links, loops, odd names, formula names, a FIFO) is
extracted once through the command line; the rest are checkpoints, caches and flags
tampered with one at a time.
"""
import errno
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _synthetic_cache import make_cache
from avemo.checkpoint import CheckpointError, save_checkpoint
from avemo.encoders import ENCODER_FORMAT, ENCODER_FORMAT_VERSION, load_encoder
from avemo.features import ClipFeatures
from avemo.io import write_text_atomic
from avemo.model import MODEL_KIND, MODEL_VERSION, ModelConfig, build_model, load_model, save_model
from avemo.predict_cli import main as predict_main
from extract.cache import Cache, CacheBusy
from extract.cli import main as extract_main
from mediagen import astronaut, random_encoder, tone, write_audio, write_video
from train.cli import SplitOptions, cli as train_cli, run_training
from train.data import load_training_data
from train.loop import TrainConfig, TrainError

torch.set_num_threads(2)
CREMAD = Path(__file__).resolve().parents[1] / "examples" / "cremad"
BAD_NAME = os.fsdecode(b"bad\xff.wav")
FORMULA_NAME = "=cmd|' -C calc'!A0.wav"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    clips = d / "clips"
    clips.mkdir()
    face = astronaut(96)
    write_video(clips / "good.mp4", [face] * 8, audio=tone(1.0, 16000))
    write_audio(clips / "good.wav", tone(1.0, 16000), 16000)
    # long GOP, long file, sparse sampling: the old seek loop hung here
    frames = [np.full((48, 64, 3), 16 + i // 10, np.uint8) for i in range(1800)]
    write_video(clips / "long_gop.mp4", frames, fps=10, codec="libx264", gop=250)
    # a few hundred bytes overwritten in the middle of a real FLV
    data = bytearray((CREMAD / "1001_DFA_ANG_XX.flv").read_bytes())
    rng = np.random.default_rng(9)
    for at in (len(data) // 3, len(data) // 2):
        data[at:at + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    (clips / "corrupt_middle.flv").write_bytes(bytes(data))
    os.symlink(clips / "nowhere.mp4", clips / "dangling.mp4")
    os.symlink(clips / "loop_b.mp4", clips / "loop_a.mp4")
    os.symlink(clips / "loop_a.mp4", clips / "loop_b.mp4")
    os.mkfifo(clips / "pipe.wav")
    write_audio(clips / BAD_NAME, tone(1.0, 16000), 16000)
    write_audio(clips / FORMULA_NAME, tone(1.0, 16000), 16000)
    enc = random_encoder(d / "enc.pt")
    cache = d / "cache"
    argv = [str(clips), "--out", str(cache), "--frames", "4", "--face-encoder", str(enc), "--device", "cpu", "--quiet"]
    rc = extract_main(argv)
    return {"dir": d, "clips": clips, "cache": cache, "argv": argv, "rc": rc, "enc": enc}


def test_hostile_folder_exits_0_with_one_row_and_a_specific_reason_per_file(hostile):
    assert hostile["rc"] == 0
    m = pd.read_csv(hostile["cache"] / "manifest.csv", dtype=str, keep_default_na=False).set_index("clip")
    assert len(m) == 10
    assert m.loc["good.mp4", "status"] == "ok" and m.loc["good.wav", "status"] == "ok"
    # finished (no hang): grey frames without a face and no sound leave it nothing usable
    assert "no face found in any of 4 sampled frame(s)" in m.loc["long_gop.mp4", "reason"]
    assert m.loc["corrupt_middle.flv", "status"] in ("ok", "partial")
    assert m.loc["dangling.mp4", "reason"].startswith("broken symbolic link")
    assert m.loc["loop_a.mp4", "reason"].startswith("symbolic link loop")
    assert m.loc["loop_b.mp4", "reason"].startswith("symbolic link loop")
    assert m.loc["pipe.wav", "reason"].startswith("not a regular file")
    # a name that is not UTF-8 is extracted, shown with escapes, and says so
    assert m.loc["bad\\xff.wav", "status"] == "ok"
    assert "not valid UTF-8" in m.loc["bad\\xff.wav", "reason"]
    # a formula is written as text
    assert "'" + FORMULA_NAME in m.index and m.loc["'" + FORMULA_NAME, "status"] == "ok"
    raw = (hostile["cache"] / "manifest.csv").read_text(encoding="utf-8")
    assert not any(line.startswith("=") for line in raw.splitlines())


def test_hostile_folder_rerun_redoes_nothing(hostile, capsys):
    rows = {p.name: p.stat().st_mtime_ns for p in (hostile["cache"] / "rows").iterdir()}
    assert extract_main(hostile["argv"]) == 0
    assert "10 already done, 0 to extract" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (hostile["cache"] / "rows").iterdir()} == rows


def test_a_clip_over_its_time_limit_is_stopped_and_the_run_goes_on(hostile, tmp_path, monkeypatch):
    import _hanging_worker
    from extract import extract_folder, workers
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("hang.wav", "next.wav"):
        write_audio(clips / name, tone(0.5, 16000), 16000)
    # one worker: it hangs on the first clip for good, is killed at the limit, and a new one
    # takes the next clip (a real hang: a limit shorter than the extraction raced the result)
    with monkeypatch.context() as patch:
        patch.setattr(workers, "_child", _hanging_worker.child)
        m = extract_folder(clips, tmp_path / "cache", face_encoder=str(hostile["enc"]), device="cpu",
                           workers=1, clip_timeout=2, progress=False).set_index("clip")
    assert m.loc["hang.wav", "status"] == "failed"
    assert m.loc["hang.wav", "reason"].startswith("timed out: extraction took longer than 2 s")
    assert m.loc["next.wav", "status"] == "ok"
    # a timeout is a recorded failure: the next run leaves it unless asked to retry
    m = extract_folder(clips, tmp_path / "cache", face_encoder=str(hostile["enc"]), device="cpu",
                       progress=False).set_index("clip")
    assert m.loc["hang.wav", "status"] == "failed"
    m = extract_folder(clips, tmp_path / "cache", face_encoder=str(hostile["enc"]), device="cpu",
                       retry_failed=True, progress=False).set_index("clip")
    assert list(m["status"]) == ["ok", "ok"]


def test_truncated_and_empty_feature_files_are_skipped_by_train_and_redone_by_extract(hostile, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(hostile["cache"], cache)
    m = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False).set_index("clip")
    truncated, empty = cache / m.loc["good.wav", "feature_file"], cache / m.loc["good.mp4", "feature_file"]
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty.write_bytes(b"")
    with pytest.raises(Exception) as info:     # every other clip lacks a label here: what matters is the log
        load_training_data(cache)
    assert str(truncated) in caplog.text and str(empty) in caplog.text
    assert "BadZipFile" not in str(info.value)
    argv = [a if a != str(hostile["cache"]) else str(cache) for a in hostile["argv"]]
    assert extract_main(argv + ["--retry-failed"]) == 0
    assert ClipFeatures.load(truncated).has_audio and ClipFeatures.load(empty).has_video


def test_a_foreign_feature_file_is_blamed_by_name_and_replaced_by_extract(hostile, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(hostile["cache"], cache)
    m = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False).set_index("clip")
    for clip in m.index:
        if m.loc[clip, "feature_file"]:
            m.loc[clip, "label"] = "happy" if len(clip) % 2 else "sad"
            m.loc[clip, "speaker"] = "a" if len(clip) % 3 else "b"
    m.reset_index().to_csv(cache / "manifest.csv", index=False)
    target = cache / m.loc["good.wav", "feature_file"]
    feats = ClipFeatures.load(target)
    feats.settings = dict(feats.settings, n_mels=80)
    feats.save(target)
    from train.data import CacheError
    with pytest.raises(CacheError, match=str(target).replace("\\", "\\\\") + r" \(clip 'good.wav'\)"):
        load_training_data(cache)
    argv = [a if a != str(hostile["cache"]) else str(cache) for a in hostile["argv"]]
    assert extract_main(argv) == 0
    assert ClipFeatures.load(target).settings["n_mels"] == 64


def test_non_finite_features_never_reach_a_checkpoint(tmp_path, caplog):
    cache = make_cache(tmp_path / "cache")
    victim = next((tmp_path / "cache").glob("*.npz"))
    feats = ClipFeatures.load(victim)
    feats.arrays["mel"][0, 0] = np.nan
    feats.save(victim)
    data = load_training_data(cache)
    assert str(victim) in caplog.text and len(data) == 47
    # a loss that goes non-finite stops the run before anything is written for that epoch
    with pytest.raises(TrainError, match="loss became"):
        run_training(cache, tmp_path / "run", dict(audio_channels=(8,), video_hidden=8, fbp_o=16),
                     TrainConfig(epochs=3, batch_size=8, lr=1e30, patience=0, progress=False, audio_init="none"),
                     SplitOptions(val_speakers="s3", test_speakers="s4"))
    for name in ("best.pt", "last.pt"):
        if (tmp_path / "run" / name).exists():
            model, _ = load_model(tmp_path / "run" / name)   # refuses non-finite weights


def test_encoder_with_zero_std_is_refused(tmp_path):
    enc = random_encoder(tmp_path / "enc.pt")
    data = torch.load(enc, weights_only=True)
    data["std"] = [0.0, 0.5, 0.5]
    save_checkpoint(tmp_path / "zero.pt", data, ENCODER_FORMAT, ENCODER_FORMAT_VERSION)
    with pytest.raises(CheckpointError, match="'std' finite and above zero"):
        load_encoder(tmp_path / "zero.pt")
    data = torch.load(enc, weights_only=True)
    data["arch_cfg"] = [1, 2]
    save_checkpoint(tmp_path / "list.pt", data, ENCODER_FORMAT, ENCODER_FORMAT_VERSION)
    with pytest.raises(CheckpointError, match="'arch_cfg' must be a table"):
        load_encoder(tmp_path / "list.pt")


# ---- checkpoints ----

@pytest.fixture
def ckpt(tmp_path):
    cfg = ModelConfig(n_classes=3, n_mels=16, modalities="audio", audio_channels=(4, 8))
    path = tmp_path / "best.pt"
    save_model(path, build_model(cfg), ["a", "b", "c"], {"n_mels": 16})
    return path


def _tampered(ckpt: Path, tmp_path: Path, change) -> Path:
    data = torch.load(ckpt, weights_only=True)
    change(data)
    out = tmp_path / "tampered.pt"
    save_checkpoint(out, data, MODEL_KIND, MODEL_VERSION)    # a fresh, valid digest: only the content lies
    return out


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(members=100000), "'members' must be a whole number from 1 to 64"),
    (lambda d: d.update(members=3), "says 3 ensemble member"),
    (lambda d: d["config"].update(video_hidden=2_000_000), "video_hidden must be a whole number"),
    (lambda d: d["config"].update(audio_channels=[4, 16]), "do not fit the model"),
    (lambda d: d.update(config="audio"), "model settings .'config'. are missing or not a table"),
    (lambda d: d.pop("classes"), "'classes' must be a list"),
    (lambda d: d.update(classes=3), "'classes' must be a list"),
    (lambda d: d["extraction_settings"].update(n_mels=80), "reads 16 mel bins but its extraction settings make 80"),
    (lambda d: d["model"]["classifier.bias"].fill_(float("nan")), "NaN or infinite"),
])
def test_tampered_checkpoints_are_refused_before_anything_is_built(ckpt, tmp_path, change, message, capsys):
    bad = _tampered(ckpt, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)
    assert predict_main([str(CREMAD / "1002_DFA_SAD_XX.mp3"), "--model", str(bad)]) == 2
    assert message.split("'")[0][:10] in capsys.readouterr().err


def test_text_random_bytes_and_overwritten_bytes_are_refused_in_words(ckpt, tmp_path):
    text, noise = tmp_path / "text.pt", tmp_path / "noise.pt"
    text.write_text("just some notes\n")
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for p in (text, noise):
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
            load_model(p)
        assert "weights_only" not in str(info.value) and "run code" not in str(info.value)
    # flip bytes inside the weights: the zip still opens, the digest does not match
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 8:start + 16] = b"\x7f" * 8
    (tmp_path / "flipped.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_model(tmp_path / "flipped.pt")


def test_resume_from_a_last_pt_without_optimizer_state_is_refused(tmp_path):
    cache = make_cache(tmp_path / "cache")
    out = tmp_path / "run"
    argv = [str(cache), "--out", str(out), "--val-speakers", "s3", "--test-speakers", "s4", "--epochs", "1",
            "--audio-init", "none", "--audio-channels", "8", "--video-hidden", "8", "--fbp-o", "16", "--quiet"]
    assert train_cli(argv) == 0
    data = torch.load(out / "last.pt", weights_only=True)
    del data["resume"]["optimizer"]
    save_checkpoint(out / "last.pt", data, MODEL_KIND, MODEL_VERSION)
    (out / "report.json").unlink()
    assert train_cli(argv + ["--resume"]) == 2


def test_a_checkpoint_cannot_make_avemo_open_a_path_it_names(tmp_path, capsys):
    enc = random_encoder(tmp_path / "enc.pt")
    from avemo.extraction import ClipExtractor
    from avemo.features import ExtractionSettings
    settings = ClipExtractor(ExtractionSettings(frames=2, encoder=str(enc)), "cpu", with_video=False).settings
    settings = ExtractionSettings.from_dict({**settings.to_dict(), "encoder": str(enc), "feature_dim": 512})
    cfg = ModelConfig(n_classes=2, n_mels=64, video_dim=512, audio_channels=(4,), video_hidden=8, fbp_o=8)
    save_model(tmp_path / "m.pt", build_model(cfg), ["a", "b"], settings.to_dict())
    rc = predict_main([str(CREMAD / "1001_DFA_HAP_XX.flv"), "--model", str(tmp_path / "m.pt")])
    assert rc == 2 and "--face-encoder PATH" in capsys.readouterr().err


# ---- flags ----

@pytest.mark.parametrize("flags", [["--window", "-2"], ["--window", "nan"], ["--window", "0"], ["--window", "1e-9"],
                                   ["--window", "1", "--hop", "-1"], ["--window", "1", "--hop", "0"]])
def test_bad_window_and_hop_are_usage_errors(ckpt, flags, capsys):
    with pytest.raises(SystemExit) as e:
        predict_main([str(CREMAD / "1002_DFA_SAD_XX.mp3"), "--model", str(ckpt), *flags])
    assert e.value.code == 2 and "at least 0.1 s" in capsys.readouterr().err


def test_explain_under_a_file_is_refused_up_front_and_same_stems_do_not_collide(ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    mp3 = CREMAD / "1002_DFA_SAD_XX.mp3"
    assert predict_main([str(mp3), "--model", str(ckpt), "--explain", str(tmp_path / "afile" / "x.png")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(mp3, tmp_path / sub / "same.mp3")
    out = tmp_path / "pics" / "why.png"
    assert predict_main([str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(ckpt), "--explain", str(out)]) == 0
    assert len(list((tmp_path / "pics").glob("why.*.png"))) == 2


def test_json_output_of_a_non_utf8_name_is_valid_json(hostile, ckpt, capsysbinary):
    assert predict_main([str(hostile["clips"] / BAD_NAME), "--model", str(ckpt), "--json"]) == 0
    out = capsysbinary.readouterr().out
    row = json.loads(out.decode("utf-8"))
    assert row["clip"].endswith("bad\\xff.wav")


# ---- shared use and faults ----

def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "x.json", "{}")
        assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
        os.umask(0o077)
        write_text_atomic(tmp_path / "y.json", "{}")
        assert stat.S_IMODE((tmp_path / "y.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_two_unsharded_runs_on_one_cache_cannot_both_hold_it(tmp_path):
    cache = Cache(tmp_path / "cache")
    with cache.locked(exclusive=True):
        with pytest.raises(CacheBusy, match="in use by another avemo-extract run"):
            with Cache(tmp_path / "cache").locked(exclusive=True):
                pass
        with pytest.raises(CacheBusy):
            with Cache(tmp_path / "cache").locked(exclusive=False):
                pass
    with cache.locked(exclusive=False):            # shards share it
        with Cache(tmp_path / "cache").locked(exclusive=False):
            pass


def test_a_second_training_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    # without the lock both would start fresh (or resume one last.pt) and overwrite each other's checkpoints
    from avemo.io import held_lock
    cache = make_cache(tmp_path / "cache")
    run = tmp_path / "run"
    run.mkdir()
    argv = [str(cache), "--out", str(run), "--val-speakers", "s3", "--epochs", "1", "--modalities", "audio",
            "--audio-init", "none", "--audio-channels", "8", "--quiet", "--threads", "1"]
    with held_lock(run / ".lock"):                 # what the first run holds while it trains
        assert train_cli(argv) == 4
        assert "in use by another training run" in capsys.readouterr().err
        assert not (run / "last.pt").exists()
        assert train_cli(argv + ["--resume"]) == 4
    assert train_cli(argv) == 0                    # the first run's end lets go of it
    assert (run / "best.pt").is_file()


def test_full_disk_stops_extraction_with_status_3_and_keeps_finished_clips(hostile, tmp_path, monkeypatch, capsys):
    import avemo.features
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        write_audio(clips / f"c{i}.wav", tone(0.5, 16000, freq=200 + 50 * i), 16000)
    argv = [str(clips), "--out", str(tmp_path / "cache"), "--face-encoder", str(hostile["enc"]), "--device", "cpu",
            "--quiet", "--workers", "1"]
    calls = {"n": 0}
    real = np.savez

    def savez(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **arrays)
    # the workers are separate processes: fill the disk in this one by extracting in-process
    import extract.run
    from extract.workers import WorkerPool

    def in_process(self, items, finished):
        from avemo.extraction import ClipExtractor
        from avemo.features import ExtractionSettings
        ex = ClipExtractor(ExtractionSettings.from_dict(self.args[0]), "cpu")
        for it in items:
            finished(extract.run.clip_row(it, ex, self.cache, self.digest))
    monkeypatch.setattr(WorkerPool, "run", in_process)
    monkeypatch.setattr(avemo.features.np, "savez", savez)
    assert extract_main(argv) == 3
    assert "no space left on" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "rows").glob("*.json"))) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.undo()
    assert extract_main(argv) == 0
    assert "1 already done, 2 to extract" in capsys.readouterr().err


def test_full_disk_stops_training_with_status_3(tmp_path, monkeypatch, capsys):
    cache = make_cache(tmp_path / "cache")
    import avemo.io

    def no_space(path, data):
        raise avemo.io.NoSpaceError(path)
    monkeypatch.setattr("avemo.checkpoint.write_bytes_atomic", no_space)
    rc = train_cli([str(cache), "--out", str(tmp_path / "run"), "--val-speakers", "s3", "--epochs", "1",
                    "--audio-init", "none", "--audio-channels", "8", "--video-hidden", "8", "--fbp-o", "16", "--quiet"])
    assert rc == 3 and "no space left on" in capsys.readouterr().err


def test_labels_and_confusion_csv_neutralise_formulas(tmp_path):
    cache = make_cache(tmp_path / "cache", classes=("=1+1", "hap", "sad"))
    report = run_training(cache, tmp_path / "run", dict(audio_channels=(8,), video_hidden=8, fbp_o=16),
                          TrainConfig(epochs=1, batch_size=8, patience=0, progress=False, audio_init="none"),
                          SplitOptions(val_speakers="s3", test_speakers="s4"))
    assert "=1+1" in report["classes"]
    raw = (tmp_path / "run" / "confusion.csv").read_text()
    assert "'=1+1" in raw and not any(cell.startswith("=") for line in raw.splitlines() for cell in line.split(","))
