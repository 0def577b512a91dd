"""avemo-train on tiny generated caches: learning, splits, resume, reports and clear errors."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _interrupt import training_interrupted_at
from _synthetic_cache import N_MELS, VIDEO_DIM, make_cache
from avemo.features import ExtractionSettings
from avemo.batching import collate
from avemo.model import Ensemble, load_model
from train.augment import AugmentConfig
from train.cli import SplitOptions, cli, run_training
from train.data import CacheError, load_training_data
from train.loop import TrainConfig, TrainError
from train.metrics import classification_metrics
from train.splits import SplitError, auto_split, column_split, explicit_split, kfold_splits

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SPLIT = SplitOptions(val_speakers="s3", test_speakers="s4")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache"), audio_only_every=7, maps=True)


def quick(**kw):
    # no gain augmentation, as in test_audio_frontend.quick
    base = dict(epochs=10, batch_size=4, lr=2e-2, patience=0, progress=False, augment=AugmentConfig(2, 5, 1, 0.1, gain=0.0),
                audio_init="none", schedule="cosine")
    base.update(kw)
    return TrainConfig(**base)


SMALL = dict(audio_channels=(8, 16), video_hidden=16, fbp_o=32, stt_heads=2, dropout=0.1)


@pytest.mark.parametrize("model,cfg", [
    (dict(modalities="av", video_stream="attention", fusion="fbp"), {}),
    (dict(modalities="av", video_stream="fan", fusion="concat"), {}),
    (dict(modalities="av", video_stream="stt", fusion="fbp"), dict(loss="compact")),
    (dict(modalities="audio"), dict(label_smoothing=0.1)),
    (dict(modalities="video", video_stream="attention"), {}),
    (dict(modalities="video", video_stream="fan", fan_relation=False), dict(loss="compact")),
    (dict(modalities="video", video_stream="stt"), dict(lr=5e-3)),   # cell tokens: 2x the blocks, a gentler lr
    (dict(modalities="av", video_stream="attention", fusion="concat", audio_lambda=0.0), dict(balance=True)),
    (dict(modalities="av"), dict(augment=AugmentConfig(2, 5, 1, 0.1, mixup=0.4, crop=0.3))),
    (dict(modalities="av", video_stream="mean", fusion="product", modality_dropout=0.2), {}),
], ids=["av-attention-fbp", "av-fan-concat", "av-stt-fbp-compact", "audio-ls", "video-attention",
        "video-fan-noreal-compact", "video-stt", "av-mean-concat-balanced", "av-mixup-crop", "av-framemean-product"])
def test_every_stream_fusion_and_loss_learns_well_above_chance(cache, tmp_path, model, cfg):
    report = run_training(cache, tmp_path / "run", dict(SMALL, **model), quick(**cfg), SPLIT)
    assert report["evaluated_on"] == "test" and report["speakers"] == ["s4"] and report["n"] == 12
    assert report["uar"] >= 0.7, report  # chance is 1/3


def test_best_pt_is_the_best_validation_epoch_or_with_keep_last_the_final_one(cache, tmp_path):
    # lr so high that validation UAR moves from epoch to epoch, so the two rules pick different epochs
    for keep in ("last", "best"):
        out = tmp_path / keep
        run_training(cache, out, dict(SMALL, modalities="audio"), quick(epochs=6, lr=0.3, keep=keep), SPLIT)
        hist = pd.read_csv(out / "metrics.csv")
        _, ckpt = load_model(out / "best.pt")
        chosen = 6 if keep == "last" else int(hist["val_uar"].idxmax()) + 1
        assert ckpt["metrics"]["epoch"] == chosen, (keep, hist["val_uar"].tolist())
        assert ckpt["metrics"]["val_uar"] == pytest.approx(hist["val_uar"].iloc[chosen - 1], abs=1e-5)
        assert json.loads((out / "report.json").read_text())["best_epoch"] == chosen
    # early stopping keeps the best epoch: "last" contradicts it
    with pytest.raises(ValueError, match="cannot be combined with keep 'last'"):
        quick(patience=3, keep="last")


def test_run_folder_holds_checkpoints_metrics_and_report(cache, tmp_path):
    out = tmp_path / "run"
    rc = cli([str(cache), "--out", str(out), "--audio-init", "none", "--val-speakers", "s3", "--test-speakers", "s4", "--epochs", "3",
              "--audio-channels", "8,16", "--video-hidden", "16", "--fbp-o", "32", "--quiet"])
    assert rc == 0
    assert {"best.pt", "last.pt", "metrics.csv", "split.json", "report.json", "confusion.csv", "confusion.png",
            "train.log"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.tmp"))
    hist = pd.read_csv(out / "metrics.csv")
    assert list(hist["epoch"]) == [1, 2, 3] and {"train_loss", "val_uar", "val_war", "clips_per_s"} <= set(hist)
    report = json.loads((out / "report.json").read_text())
    assert {"accuracy", "uar", "macro_f1", "per_class_recall", "confusion"} <= set(report)
    assert report["classes"] == ["ang", "hap", "sad"]
    cm = pd.read_csv(out / "confusion.csv", index_col=0)
    assert cm.values.sum() == report["n"] and list(cm.columns) == report["classes"]
    split = json.loads((out / "split.json").read_text())
    assert split["speakers"] == {"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]}
    model, ckpt = load_model(out / "best.pt")
    assert ckpt["classes"] == ["ang", "hap", "sad"] and model.cfg.modalities == "av"
    assert ExtractionSettings.from_dict(ckpt["extraction_settings"]).n_mels == 16
    assert "test_uar" in ckpt["metrics"] and len(ckpt["normalisation"]["mel_mean"]) == 16


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_continues_exactly(cache, tmp_path):
    cfg = quick(epochs=5)
    run_training(cache, tmp_path / "straight", dict(SMALL), cfg, SPLIT)

    with training_interrupted_at(3), pytest.raises(KeyboardInterrupt):
        run_training(cache, tmp_path / "resumed", dict(SMALL), cfg, SPLIT)
    assert len(pd.read_csv(tmp_path / "resumed" / "metrics.csv")) == 3
    with pytest.raises(TrainError, match="--resume"):
        run_training(cache, tmp_path / "resumed", dict(SMALL), cfg, SPLIT)
    run_training(cache, tmp_path / "resumed", dict(SMALL), cfg, SPLIT, resume=True)

    for name in ("last.pt", "best.pt"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "resumed" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")
    cols = ["epoch", "train_loss", "val_uar", "val_war"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "straight" / "metrics.csv")[cols],
                                  pd.read_csv(tmp_path / "resumed" / "metrics.csv")[cols])
    # a finished run resumed again does no work and keeps its report
    before = (tmp_path / "resumed" / "report.json").read_text()
    run_training(cache, tmp_path / "resumed", dict(SMALL), cfg, SPLIT, resume=True)
    assert (tmp_path / "resumed" / "report.json").read_text() == before


def test_ensemble_trains_members_with_their_own_seeds_and_averages_them(cache, tmp_path):
    cfg = quick(epochs=6, ensemble=2)
    report = run_training(cache, tmp_path / "ens", dict(SMALL), cfg, SPLIT)
    assert report["uar"] >= 0.7 and report["speakers"] == ["s4"]
    model, ckpt = load_model(tmp_path / "ens" / "best.pt")
    assert isinstance(model, Ensemble) and len(model.members) == 2 and ckpt["members"] == 2
    members = [load_model(tmp_path / "ens" / f"member{k}" / "best.pt")[0] for k in (1, 2)]
    seeds = [json.loads((tmp_path / "ens" / f"member{k}" / "report.json").read_text()) for k in (1, 2)]
    assert all(r["n"] == 12 for r in seeds)
    # members differ (own seeds); the ensemble's probabilities are exactly their mean
    data = load_training_data(cache)
    batch = collate(data.clips[:5], data.n_mels, data.video_dim)
    with torch.no_grad():
        probs = [torch.softmax(m(batch)["logits"], -1) for m in members]
        ens = torch.softmax(model(batch)["logits"], -1)
    assert not torch.allclose(probs[0], probs[1])
    torch.testing.assert_close(ens, (probs[0] + probs[1]) / 2, atol=1e-5, rtol=1e-4)
    # resuming a finished ensemble redoes no member and keeps the figures
    before = json.loads((tmp_path / "ens" / "report.json").read_text())
    run_training(cache, tmp_path / "ens", dict(SMALL), cfg, SPLIT, resume=True)
    assert json.loads((tmp_path / "ens" / "report.json").read_text())["uar"] == before["uar"]
    with pytest.raises(TrainError, match="finished run"):
        run_training(cache, tmp_path / "ens", dict(SMALL), cfg, SPLIT)


def test_features_held_on_device_or_collated_per_batch_train_identically(cache, tmp_path):
    # the same batches in the same order; only the memory layout differs (an index of the padded cache is a
    # strided view), which changes float32 rounding in the last bits (1e-4 after two epochs). Under bf16 such
    # a bit can cross a rounding boundary and grow, so float32 here; another batch would move weights by 0.1.
    # One thread: with two, on a CPU without bf16 (AVX-512 only), the layouts' runs parted by 0.024 (1.3e-3 with
    # one), and the pool's size was whatever the tests before had left it at (a command run in-process sets it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in ("yes", "no"):
            run_training(cache, tmp_path / mode, dict(SMALL), quick(epochs=2, amp=False, features_on_device=mode),
                         SPLIT)
    finally:
        torch.set_num_threads(threads)
    a, b = _weights(tmp_path / "yes" / "last.pt"), _weights(tmp_path / "no" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=2e-3, msg=k)


def test_stt_over_cells_trains_on_feature_maps_held_on_device_or_collated_alike(cache, tmp_path):
    model = dict(SMALL, modalities="video", video_stream="stt")
    mixup = quick(epochs=2, augment=AugmentConfig(2, 5, 1, 0.1, mixup=0.4))
    for mode in ("yes", "no"):
        run_training(cache, tmp_path / mode, model, dataclasses.replace(mixup, features_on_device=mode), SPLIT)
    a, b = _weights(tmp_path / "yes" / "last.pt"), _weights(tmp_path / "no" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    net, ckpt = load_model(tmp_path / "yes" / "best.pt")
    assert net.cfg.stt_tokens == "cells" and net.cfg.video_cells == 4 and len(ckpt["normalisation"]["map_std"]) == 8


def test_stt_over_cells_on_a_cache_without_feature_maps_says_how_to_get_them(tmp_path, capsys):
    plain = make_cache(tmp_path / "plain")      # extracted without --feature-maps
    with pytest.raises(TrainError, match="avemo-extract --feature-maps.*--stt-tokens frames"):
        run_training(plain, tmp_path / "r1", dict(SMALL, video_stream="stt"), quick(epochs=1), SPLIT)
    assert cli([str(plain), "--out", str(tmp_path / "r2"), "--video-stream", "stt", "--audio-init", "none",
                "--quiet"]) == 2
    assert "--feature-maps" in capsys.readouterr().err
    # one pooled vector per frame, asked for by name, needs no maps
    run_training(plain, tmp_path / "r3", dict(SMALL, video_stream="stt", stt_tokens="frames"), quick(epochs=1), SPLIT)
    net, _ = load_model(tmp_path / "r3" / "best.pt")
    assert net.cfg.stt_tokens == "frames" and net.cfg.video_cells == 0


def test_seed_makes_cpu_runs_repeatable(cache, tmp_path):
    r = [run_training(cache, tmp_path / str(i), dict(SMALL), quick(epochs=2, seed=3), SPLIT) for i in range(2)]
    assert r[0]["confusion"] == r[1]["confusion"]
    a, b = _weights(tmp_path / "0" / "last.pt"), _weights(tmp_path / "1" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_cache_with_other_extraction_settings(cache, tmp_path):
    out = tmp_path / "run"
    run_training(cache, out, dict(SMALL), quick(epochs=1), SPLIT)
    other = make_cache(tmp_path / "other", settings=ExtractionSettings(n_mels=16, feature_dim=8, hop_length=320))
    with pytest.raises(TrainError, match="different settings.*hop_length"):
        run_training(other, out, dict(SMALL), quick(epochs=2), SPLIT, resume=True)


def test_a_voice_only_run_resumes_on_a_cache_whose_face_settings_differ_and_an_av_run_does_not(cache, tmp_path):
    # the same clips, extracted again with another face threshold: a voice-only model never reads that side
    other = make_cache(tmp_path / "other", audio_only_every=7, maps=True,
                       settings=ExtractionSettings(n_mels=N_MELS, feature_dim=VIDEO_DIM, feature_maps=True,
                                                   min_face_prob=0.8))
    voice = tmp_path / "voice"
    run_training(cache, voice, dict(SMALL, modalities="audio"), quick(epochs=1), SPLIT)
    report = (voice / "report.json").read_text()
    run_training(other, voice, dict(SMALL, modalities="audio"), quick(epochs=1), SPLIT, resume=True)
    assert (voice / "report.json").read_text() == report      # accepted, and already finished
    av = tmp_path / "av"
    run_training(cache, av, dict(SMALL), quick(epochs=1), SPLIT)
    with pytest.raises(TrainError, match="different settings.*min_face_prob"):
        run_training(other, av, dict(SMALL), quick(epochs=2), SPLIT, resume=True)


def test_folds_run_every_fold_then_mean_and_std(cache, tmp_path):
    summary = run_training(cache, tmp_path / "cv", dict(SMALL, modalities="audio"), quick(epochs=2),
                           SplitOptions(folds=4, fold_val="none"))
    assert [f["speakers"] for f in summary["folds"]] == [["s1"], ["s2"], ["s3"], ["s4"]]
    uars = [f["uar"] for f in summary["folds"]]
    assert summary["uar_mean"] == pytest.approx(np.mean(uars)) and summary["uar_std"] == pytest.approx(np.std(uars))
    assert json.loads((tmp_path / "cv" / "folds.json").read_text())["uar_mean"] == summary["uar_mean"]
    one = run_training(cache, tmp_path / "one", dict(SMALL, modalities="audio"), quick(epochs=1),
                       SplitOptions(folds=4, fold=2))
    assert one["speakers"] == ["s2"] and (tmp_path / "one" / "fold2" / "best.pt").is_file()


def test_no_split_trains_on_everything_and_says_the_report_is_not_held_out(cache, tmp_path):
    report = run_training(cache, tmp_path / "run", dict(SMALL), quick(epochs=1), SplitOptions(no_split=True))
    assert report["evaluated_on"] == "train" and not report["held_out"] and "not an accuracy" in report["note"]
    assert report["n"] == 48


def test_splits_never_share_a_speaker():
    speakers = [f"s{i % 7}" for i in range(70)]
    candidates = [auto_split(speakers, seed) for seed in range(5)] + kfold_splits(speakers, 7)
    candidates += kfold_splits(speakers, 3, val="none") + [explicit_split(speakers, "s1,s2", "s3")]
    for s in candidates:
        parts = [{speakers[i] for i in getattr(s, p)} for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(s.train + s.val + s.test) == list(range(70)) and s.train
    assert auto_split(speakers, 0).test and auto_split(speakers, 0).val
    with pytest.raises(SplitError, match="'s1' in both 'train' and 'test'"):
        column_split(["s1", "s1", "s2"], ["train", "test", "val"])


@pytest.mark.parametrize("call,match", [
    (lambda sp: explicit_split(sp, None, "nobody"), "nobody"),
    (lambda sp: explicit_split(sp, "a", "a"), "both the validation and the test"),
    (lambda sp: explicit_split(sp, "a,b", "c"), "training part has no speaker"),
    (lambda sp: kfold_splits(sp, 5), "only 3 speakers"),
    (lambda sp: auto_split(["a", "a"]), "only one speaker"),
    (lambda sp: auto_split(["a", None]), "no speaker"),
])
def test_split_errors_are_specific(call, match):
    with pytest.raises(SplitError, match=match):
        call(["a", "b", "c"])


def _manifest(root):
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


def test_cache_errors_are_specific(tmp_path):
    with pytest.raises(CacheError, match="no manifest.csv"):
        load_training_data(tmp_path)
    empty = make_cache(tmp_path / "empty", per_class=1)
    m = _manifest(empty)
    m["status"] = "failed"
    m.to_csv(empty / "manifest.csv", index=False)
    with pytest.raises(CacheError, match="cache is empty"):
        load_training_data(empty)
    one = make_cache(tmp_path / "one", classes=("hap",), per_class=2)
    with pytest.raises(CacheError, match="only one class"):
        load_training_data(one)
    unlabelled = make_cache(tmp_path / "unlabelled", per_class=1, with_labels=False)
    with pytest.raises(CacheError, match="no labels"):
        load_training_data(unlabelled)
    missing = make_cache(tmp_path / "missing", per_class=1)
    (missing / _manifest(missing)["feature_file"][0]).unlink()
    with pytest.raises(CacheError, match="is missing"):
        load_training_data(missing)


def test_labels_csv_overrides_labels_and_carries_a_split_column(cache, tmp_path):
    m = _manifest(cache)
    table = pd.DataFrame({"clip": m["clip"], "label": m["label"], "speaker": m["speaker"],
                          "split": m["speaker"].map({"s1": "train", "s2": "train", "s3": "val", "s4": "test"})})
    table.to_csv(tmp_path / "labels.csv", index=False)
    data = load_training_data(cache, tmp_path / "labels.csv")
    assert data.split_column is not None and len(data) == 48
    report = run_training(cache, tmp_path / "run", dict(SMALL), quick(epochs=1), labels=tmp_path / "labels.csv")
    assert report["speakers"] == ["s4"]
    table.loc[0, "split"] = "test"  # s1 now in train and test
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SplitError, match="'s1' in both"):
        run_training(cache, tmp_path / "bad", dict(SMALL), quick(epochs=1), labels=tmp_path / "bad.csv")


def test_cli_reports_errors_in_words_with_exit_code_2(tmp_path, capsys):
    one = make_cache(tmp_path / "one", classes=("hap",), per_class=2)
    assert cli([str(one), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "only one class" in capsys.readouterr().err
    audio_only = make_cache(tmp_path / "ao", video=False, per_class=2)
    assert cli([str(audio_only), "--out", str(tmp_path / "r2"), "--modalities", "video", "--quiet"]) == 2
    assert "no training clip has a face" in capsys.readouterr().err


def test_metrics_war_uar_f1():
    m = classification_metrics(np.array([0, 0, 0, 0, 1, 2]), np.array([0, 0, 0, 1, 1, 0]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["uar"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert m["per_class_recall"] == {"a": 0.75, "b": 1.0, "c": 0.0}
    f1_a, f1_b = 2 * 0.75 * 0.75 / 1.5, 2 * 0.5 * 1.0 / 1.5
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b + 0.0) / 3)
    assert m["confusion"] == [[3, 1, 0], [0, 1, 0], [1, 0, 0]]


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_the_same_files_as_one(cache, tmp_path):
    args = [str(cache), "--audio-init", "none", "--val-speakers", "s3", "--test-speakers", "s4", "--epochs", "2", "--batch-size", "8",
            "--audio-channels", "8,16", "--video-hidden", "16", "--fbp-o", "32", "--quiet", "--threads", "1"]
    single = subprocess.run([sys.executable, "-m", "train.cli", *args, "--out", str(tmp_path / "one")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "train.cli", *args, "--out", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two
    assert "x2" in (tmp_path / "two" / "train.log").read_text()
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert set(r1) == set(r2) and r1["n"] == r2["n"] == 12
    assert len(pd.read_csv(tmp_path / "two" / "metrics.csv")) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_device", ["yes", "no"])
def test_cuda_bf16_training_learns_and_its_checkpoint_predicts_on_the_cpu(cache, tmp_path, on_device):
    report = run_training(cache, tmp_path / "run", dict(SMALL), quick(features_on_device=on_device), SPLIT)
    assert report["uar"] >= 0.7, report
    model, ckpt = load_model(tmp_path / "run" / "best.pt")            # CPU, as avemo-predict on a laptop
    assert next(model.parameters()).device.type == "cpu"
    data = load_training_data(cache)
    batch = collate(data.clips[:5], data.n_mels, data.video_dim)
    with torch.no_grad():
        cpu_logits = model(batch)["logits"]
        gpu_model, _ = load_model(tmp_path / "run" / "best.pt", map_location="cuda")
        gpu_logits = gpu_model({k: v.cuda() for k, v in batch.items()})["logits"].cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-3, rtol=1e-3)


def _with_a_long_clip(root: Path, frames: int) -> Path:
    """make_cache's clips last 0.24-0.48 s; its first clip becomes ``frames`` mel frames long."""
    from avemo.features import ClipFeatures
    cache = make_cache(root, audio_only_every=7)
    first = pd.read_csv(cache / "manifest.csv").feature_file[0]
    clip = ClipFeatures.load(cache / first)
    rng = np.random.default_rng(1)
    clip.arrays["mel"] = np.tile(clip.arrays["mel"], (1, -(-frames // clip.arrays["mel"].shape[1])))[:, :frames]
    clip.arrays["mel"] += rng.normal(0, 0.1, clip.arrays["mel"].shape).astype(np.float32)
    clip.save(cache / first)
    return cache


def test_a_long_clip_trains_on_random_windows_and_never_pads_a_batch_to_its_length(tmp_path):
    from train.loop import FeatureStore
    data = load_training_data(_with_a_long_clip(tmp_path / "cache", 3000))
    assert data.clips[0].arrays["mel"].shape[1] == 3000
    store = FeatureStore(data, list(range(len(data.clips))), VIDEO_DIM, torch.device("cpu"), on_device=True,
                         audio_window=50)
    assert not store.on_device                      # a held padded copy would be 3000 frames wide
    long_mel = data.clips[0].arrays["mel"]
    starts = set()
    for _ in range(20):
        b = store.batch(torch.tensor([0, 1, 2]))
        assert b["mel"].shape[2] == 50 and bool(b["mel_mask"][0].all())
        window = b["mel"][0].numpy()
        # a contiguous stretch of the clip itself
        start = int(np.argmin([np.abs(long_mel[:, s:s + 50] - window).max() for s in range(3000 - 49)]))
        assert np.array_equal(long_mel[:, start:start + 50], window)
        starts.add(start)
        # the short clips are untouched
        assert np.array_equal(b["mel"][1, :, :data.clips[1].arrays["mel"].shape[1]].numpy(), data.clips[1].arrays["mel"])
    assert len(starts) > 10                         # drawn anew each time
    # a store of short clips only is not affected by the bound
    short = FeatureStore(data, [1, 2, 3], VIDEO_DIM, torch.device("cpu"), on_device=True, audio_window=50)
    assert short.on_device and short.audio_window == 0

    # end to end: the run records the bound, trains, and its report scores the long clip whole
    cfg = quick(epochs=2, max_train_seconds=0.5)
    report = run_training(tmp_path / "cache", tmp_path / "run", {"modalities": "audio", **SMALL}, cfg,
                          SplitOptions(no_split=True))
    assert report["n"] == len(data.clips)
    _, ckpt = load_model(tmp_path / "run" / "best.pt")
    assert ckpt["train_config"]["max_train_seconds"] == 0.5
    with pytest.raises(ValueError, match="max_train_seconds"):
        TrainConfig(max_train_seconds=-1)


def test_evaluation_batches_by_length_and_returns_outputs_in_the_store_order(tmp_path):
    from train.loop import FeatureStore, predict_outputs
    data = load_training_data(_with_a_long_clip(tmp_path / "cache", 20000))   # over EVAL_FRAMES on its own
    torch.manual_seed(0)
    from avemo.model import build_model, ModelConfig
    net = build_model(ModelConfig(n_mels=N_MELS, video_dim=VIDEO_DIM, n_classes=len(data.classes), **SMALL)).eval()
    idx = list(range(len(data.clips)))
    store = FeatureStore(data, idx, VIDEO_DIM, torch.device("cpu"), on_device=False)
    seen = []
    real_batch = store.batch
    store.batch = lambda i, faces=True: seen.append(i.clone()) or real_batch(i, faces)
    out = predict_outputs(net, store, 8, amp=False)["logits"]
    # the long clip is alone in its batch: no short clip is padded to its length
    assert any(len(b) == 1 and int(b[0]) == 0 for b in seen)
    with torch.no_grad():
        one_by_one = torch.cat([net(collate([data.clips[i]], N_MELS, VIDEO_DIM))["logits"] for i in idx]).numpy()
    np.testing.assert_allclose(out, one_by_one, atol=1e-5, rtol=1e-4)
