"""avemo-predict and avemo.predict: one clip -> emotion, probabilities, attention, warnings."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mediagen
from mediagen import unlistable
from avemo.checkpoint import CheckpointError, save_checkpoint
from avemo.extraction import ClipError, ClipExtractor
from avemo.features import ExtractionSettings
from avemo.batching import collate
from avemo.model import MODEL_KIND, Ensemble, ModelConfig, build_model, save_model
from avemo.model import load_model as load_network
from avemo.prediction import Prediction, load_model, predict, predict_timeline
from avemo.predict_cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cremad"
FLV = SAMPLES / "1001_DFA_HAP_XX.flv"
MP3 = SAMPLES / "1002_DFA_SAD_XX.mp3"
CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad"]


def _checkpoint(path, settings: ExtractionSettings, modalities="av") -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=len(CLASSES), modalities=modalities, n_mels=settings.n_mels,
                      video_dim=settings.feature_dim if modalities != "audio" else 0,
                      audio_channels=(8, 16), video_hidden=32, fbp_o=32)
    model = build_model(cfg)
    # attention parameters away from zero, so weights differ between frames and cells
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(path, model, CLASSES, settings.to_dict())
    return Path(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    enc = mediagen.random_encoder(root / "enc.pt")
    settings = ClipExtractor(ExtractionSettings(frames=6, encoder=str(enc)), "cpu").settings
    return {"root": root, "settings": settings, "enc": str(enc),
            "av": _checkpoint(root / "av.pt", settings), "audio": _checkpoint(root / "audio.pt", settings, "audio")}


@pytest.fixture(scope="module")
def av_model(work):
    return load_model(work["av"], "cpu", work["enc"])


@pytest.fixture(scope="module")
def media(work):
    root = work["root"]
    face = [mediagen.astronaut(224)] * 12
    noise = [np.random.default_rng(i).integers(0, 255, (224, 224, 3), dtype=np.uint8) for i in range(12)]
    speech = mediagen.tone(1.2, 16000, freq=180.0)
    return {
        "silent_video": mediagen.write_video(root / "silent.mp4", face, fps=10),
        "no_face": mediagen.write_video(root / "noface.mkv", noise, fps=10, audio=speech, audio_codec="pcm_s16le"),
        "garbage": _write(root / "garbage.mp4", b"this is not a video at all\n" * 50),
    }


def _write(path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_video_with_sound_uses_both_and_attention_is_a_distribution(av_model):
    pred = av_model.predict(FLV)
    assert isinstance(pred, Prediction)
    assert pred.emotion in CLASSES and set(pred.probabilities) == set(CLASSES)
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred.emotion == max(pred.probabilities, key=pred.probabilities.get)
    assert pred.modalities == ["audio", "video"] and pred.face_coverage > 0.5
    v, a = pred.attention["video"], pred.attention["audio"]
    assert v.shape == (pred.features.frames_sampled,) and v.sum() == pytest.approx(1.0, abs=1e-4)
    assert a.ndim == 2 and a.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.ptp(v) > 0   # not all frames weigh the same


def test_prediction_reuses_the_extraction_path_exactly(work, av_model):
    # the same ClipExtractor with the checkpoint's settings: identical numbers to a direct call
    feats = ClipExtractor(work["settings"], "cpu").extract(FLV, clip_id=str(FLV))
    direct = av_model.predict_features(feats)
    via_predict = predict(FLV, av_model)
    for c in CLASSES:
        assert via_predict.probabilities[c] == pytest.approx(direct.probabilities[c], abs=1e-6)


def test_an_ensemble_checkpoint_predicts_its_members_mean(work, av_model, tmp_path):
    member_a = load_network(work["av"])[0]
    member_b = load_network(_checkpoint(tmp_path / "b.pt", work["settings"]))[0]
    with torch.no_grad():
        for p in member_b.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "ens.pt"
    save_model(path, Ensemble([member_a, member_b]), CLASSES, work["settings"].to_dict())
    ens = load_model(path, "cpu", work["enc"])
    pred = ens.predict(FLV)
    feats = pred.features
    one = av_model.predict_features(feats).probabilities
    with torch.no_grad():
        other = torch.softmax(member_b.eval()(collate([feats], member_b.cfg.n_mels, member_b.cfg.video_dim))["logits"], -1)[0]
    for i, c in enumerate(CLASSES):
        assert pred.probabilities[c] == pytest.approx((one[c] + float(other[i])) / 2, abs=1e-5)
    assert pred.attention["video"].sum() == pytest.approx(1.0, abs=1e-4)


def test_a_model_with_a_finetuned_encoder_predicts_a_clip_through_it(work, tmp_path):
    from avemo.encoders import build_encoder, load_encoder, normalize, to_model_pixels
    from avemo.model.frames import encoder_spec
    enc, settings = load_encoder(work["enc"]), work["settings"]
    cfg = ModelConfig(n_classes=len(CLASSES), modalities="video", n_mels=settings.n_mels,
                      video_dim=settings.feature_dim, video_hidden=32, video_stream="fan", frame_encoder=encoder_spec(enc))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.frame_encoder.net.load_state_dict(enc.model.state_dict())
    # as training sets it from a cache: this random encoder's features are about 1e-5
    model.set_normalisation({"video_std": np.full(cfg.video_dim, 2e-5)})
    with torch.no_grad():                    # "fine-tuned": the encoder's weights moved off the file's
        for name, p in model.named_parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p)) if name.startswith("frame_encoder.") else p.add_(0.3 * torch.randn_like(p))
    save_model(tmp_path / "e2e.pt", model, CLASSES, settings.to_dict())
    # no --face-encoder: the model carries its encoder, so the (non-shipped) file it started from is not needed
    pred = load_model(tmp_path / "e2e.pt", "cpu").predict(FLV)
    feats = pred.features
    mask = feats.arrays["face_mask"]
    assert pred.modalities == ["video"] and feats.arrays["crops"].shape[0] == len(mask) and mask.any()

    # by hand: the tuned encoder rebuilt from the file, on the clip's crops, into the cached-feature path
    stored = load_network(tmp_path / "e2e.pt")[0].state_dict()
    net = build_encoder(enc.arch, len(enc.classes), **enc.arch_cfg).eval()
    net.load_state_dict({k[len("frame_encoder.net."):]: v for k, v in stored.items() if k.startswith("frame_encoder.net.")})
    frozen_style = build_model({**cfg.to_dict(), "frame_encoder": None}).eval()
    frozen_style.load_state_dict({k: v for k, v in stored.items() if not k.startswith("frame_encoder.")})
    batch = collate([feats], cfg.n_mels, cfg.video_dim)
    faces = torch.from_numpy(mask)
    with torch.no_grad():
        x = normalize(to_model_pixels(feats.arrays["crops"][mask], enc.input_size, enc.grayscale), enc.mean, enc.std)
        tuned, original = net.forward_features(x), enc.model.forward_features(x)
        assert (tuned - original).abs().mean() > 0.1 * original.abs().mean()
        batch["video"][0, faces] = original
        cached = torch.softmax(frozen_style(batch)["logits"], -1)[0].numpy()
        batch["video"][0, faces] = tuned
        by_hand = torch.softmax(frozen_style(batch)["logits"], -1)[0].numpy()
    np.testing.assert_allclose([pred.probabilities[c] for c in CLASSES], by_hand, atol=1e-5)
    assert not np.allclose(by_hand, cached, atol=1e-3)       # the original encoder's features say otherwise


def test_audio_file_is_audio_only_with_a_warning(av_model):
    pred = av_model.predict(MP3)
    assert pred.modalities == ["audio"] and pred.emotion in CLASSES and pred.face_coverage is None
    assert any("no usable video" in w for w in pred.warnings)


def test_silent_video_uses_the_face_alone(av_model, media):
    pred = av_model.predict(media["silent_video"])
    assert pred.modalities == ["video"]
    assert any(w.startswith("audio:") for w in pred.warnings)
    assert any("no usable audio" in w for w in pred.warnings)


def test_video_without_a_face_uses_the_audio(av_model, media):
    pred = av_model.predict(media["no_face"])
    assert pred.modalities == ["audio"] and pred.face_coverage == 0.0
    assert any("no face found" in w for w in pred.warnings)


def test_audio_model_loads_no_face_models_and_ignores_the_video(work):
    model = load_model(work["audio"], "cpu", work["enc"])
    pred = model.predict(FLV)
    assert model.extractor.detector is None and model.extractor.encoder is None
    assert pred.modalities == ["audio"] and "video" not in pred.attention
    assert not any("video" in w for w in pred.warnings)


def test_audio_model_on_silent_video_is_a_clear_error(work, media):
    model = load_model(work["audio"], "cpu", work["enc"])
    with pytest.raises(ClipError, match="needs audio"):
        model.predict(media["silent_video"])


def test_undecodable_clip_is_a_clear_error(av_model, media):
    with pytest.raises(ClipError):
        av_model.predict(media["garbage"])


def test_timeline_windows_cover_the_file(av_model):
    preds = predict_timeline(FLV, av_model, window=1.0, hop=0.5)
    assert len(preds) == 4
    assert [p.start for p in preds] == [0.0, 0.5, 1.0, 1.5]
    assert all(p.end <= 2.5 and p.end > p.start for p in preds)
    assert all(p.emotion in CLASSES for p in preds)
    # windows see different parts of the clip, so they do not all say exactly the same
    assert len({round(p.probabilities["happy"], 6) for p in preds}) > 1


def test_explain_pictures_are_written(av_model, tmp_path):
    from avemo.explain import plot_prediction, plot_timeline
    plot_prediction(av_model.predict(FLV), tmp_path / "one.png")
    plot_prediction(av_model.predict(MP3), tmp_path / "audio.png")
    plot_timeline(list(av_model.predict_timeline(FLV, 1.0)), tmp_path / "tl.png")
    for name in ("one.png", "audio.png", "tl.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_json_lines_for_a_folder(work, capsys, tmp_path):
    folder = tmp_path / "clips with space" / "sub"
    folder.mkdir(parents=True)
    for src in (FLV, MP3):
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not media: skipped when expanding a folder")
    # what a copy from macOS or a repository brings along: hidden, so skipped as avemo-extract does
    (folder / f"._{FLV.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / ".git").mkdir()
    (folder / ".git" / "clip.wav").write_bytes(b"not a wav")
    rc = main([str(folder.parent), "--model", str(work["av"]), "--face-encoder", work["enc"], "--json", "--device", "cpu",
               "--explain", str(tmp_path / "x.png")])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert {"clip", "emotion", "probabilities", "modalities", "face_coverage", "warnings"} <= set(r)
    assert {tuple(r["modalities"]) for r in rows} == {("audio", "video"), ("audio",)}
    assert len(list(tmp_path.glob("x.*.png"))) == 2

    # a broken link in the folder is asked about, and fails with its own reason
    (folder / "gone.wav").symlink_to(tmp_path / "moved away.wav")
    rc = main([str(folder), "--model", str(work["av"]), "--face-encoder", work["enc"], "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = {Path(r["clip"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert set(rows) == {FLV.name, MP3.name, "gone.wav"}
    assert rows["gone.wav"]["emotion"] is None and "broken symbolic link" in rows["gone.wav"]["error"]

    only_hidden = tmp_path / "only hidden"
    only_hidden.mkdir()
    (only_hidden / f"._{MP3.name}").write_bytes(b"resource fork")
    assert main([str(only_hidden), "--model", str(work["av"]), "--device", "cpu"]) == 2
    assert "no media files found in" in (err := capsys.readouterr().err) and "(1 hidden file or folder ignored)" in err
    (only_hidden / "notes.txt").write_text("not a clip")
    (only_hidden / "clip.mp4.part").write_bytes(b"half a download")
    assert main([str(only_hidden), "--model", str(work["av"]), "--device", "cpu"]) == 2
    assert "2 files of other types (.part, .txt): media files end in one of " in capsys.readouterr().err


def test_cli_human_output_and_window(work, capsys):
    assert main([str(FLV), "--model", str(work["av"]), "--face-encoder", work["enc"], "--window", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("[") == 2 and "happy" in out


def test_cli_bad_clip_exits_nonzero_and_goes_on(work, media, capsys):
    rc = main([str(media["garbage"]), str(MP3), "--model", str(work["av"]), "--face-encoder", work["enc"], "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0]["emotion"] is None and rows[0]["error"]
    assert rows[1]["emotion"] in CLASSES
    assert "garbage.mp4" in captured.err


def test_cli_names_a_missing_file_and_refuses_a_url(work, capsys, tmp_path):
    missing = tmp_path / "nope.wav"
    rc = main([str(missing), str(MP3), "--model", str(work["av"]), "--face-encoder", work["enc"], "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{missing}: no such file or folder" in err
    assert main(["https://example.org/clip.mp4", "--model", str(work["av"])]) == 2
    assert "a URL; avemo reads local files only" in capsys.readouterr().err


def test_cli_names_a_folder_it_cannot_list_and_goes_on(work, capsys, tmp_path, monkeypatch):
    folder = tmp_path / "study"
    (folder / "p07").mkdir(parents=True)
    (folder / MP3.name).write_bytes(MP3.read_bytes())
    unlistable(monkeypatch, folder / "p07")
    rc = main([str(folder), "--model", str(work["av"]), "--face-encoder", work["enc"], "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = {Path(r["clip"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert rows["p07"]["error"] == "cannot list this folder (Permission denied); the files in it were not read"
    assert rows[MP3.name]["emotion"] in CLASSES
    assert "p07: cannot list this folder" in captured.err


def test_names_with_control_characters_cannot_break_lines_or_drive_the_terminal(work, capsys, tmp_path):
    odd = "line1\nline2\x1b[2J\x1b[31m.mp3"       # a newline, then "clear screen" and "red"
    (tmp_path / odd).write_bytes(MP3.read_bytes())
    (tmp_path / ("broken\r" + odd)).write_text("not audio")
    rc = main([str(tmp_path), "--model", str(work["av"]), "--face-encoder", work["enc"], "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    for text in (captured.out, captured.err):
        assert "\x1b" not in text and "\r" not in text
    shown = "line1\\nline2\\x1b[2J\\x1b[31m.mp3"
    assert captured.out.splitlines()[0].startswith(f"{tmp_path / shown}: ")
    assert f"{tmp_path}/broken\\r{shown}: " in captured.err
    main([str(tmp_path), "--model", str(work["av"]), "--face-encoder", work["enc"], "--device", "cpu", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {Path(r["clip"]).name for r in rows} == {odd, "broken\r" + odd}     # JSON keeps the name itself


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_bad_checkpoints_are_refused_with_reasons(work, tmp_path, capsys):
    corrupt = _write(tmp_path / "corrupt.pt", Path(work["av"]).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(corrupt)
    evil = tmp_path / "evil.pt"
    torch.save({"format": MODEL_KIND, "format_version": 1, "x": _RunsCode()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    future = tmp_path / "future.pt"
    save_checkpoint(future, {"model": {}}, MODEL_KIND, 99)
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_model(future)
    encoder_file = tmp_path / "enc_as_model.pt"
    encoder_file.write_bytes(Path(work["settings"].encoder).read_bytes())
    with pytest.raises(CheckpointError, match="expected 'avemo-model'"):
        load_model(encoder_file)
    assert main([str(FLV), "--model", str(evil)]) == 2
    assert "refused" in capsys.readouterr().err


def test_checkpoint_whose_encoder_is_missing_says_what_to_do(work, tmp_path):
    settings = work["settings"]
    moved = _checkpoint(tmp_path / "m.pt", settings.__class__(**{**settings.to_dict(), "encoder": str(tmp_path / "gone.pt")}))
    model = load_model(moved, "cpu")
    with pytest.raises(CheckpointError, match="--face-encoder"):
        model.predict(FLV)
    # pointing at the file (same hash) fixes it
    assert load_model(moved, "cpu", face_encoder=settings.encoder).predict(FLV).emotion in CLASSES


def test_stt_over_feature_maps_from_extraction_through_training_to_prediction(work, tmp_path, capsys):
    from extract import extract_folder
    from train.cli import SplitOptions, run_training
    from train.loop import TrainConfig
    clips = tmp_path / "clips"
    for label, freq in (("happy", 300.0), ("sad", 150.0)):
        (clips / label).mkdir(parents=True)
        for j in range(2):
            frames = mediagen.moving_face(8, (20 + 20 * j, 10, 150), (70, 40, 170))
            mediagen.write_video(clips / label / f"{j}.mkv", frames, fps=8, audio=mediagen.tone(1.0, 16000, freq=freq),
                                 audio_codec="pcm_s16le")
    manifest = extract_folder(clips, tmp_path / "cache", frames=6, label_from="folder", face_encoder=work["enc"],
                              device="cpu", progress=False, feature_maps=True)
    assert (manifest["status"] == "ok").all() and manifest["feature_maps"].all()
    run_training(tmp_path / "cache", tmp_path / "run",
                 dict(video_stream="stt", audio_channels=(8, 16), video_hidden=16, stt_heads=2, fbp_o=16),
                 TrainConfig(epochs=2, batch_size=2, progress=False, audio_init="none"), SplitOptions(no_split=True))
    rc = main([str(clips / "happy" / "0.mkv"), "--model", str(tmp_path / "run" / "best.pt"), "--face-encoder",
               work["enc"], "--json", "--device", "cpu", "--explain", str(tmp_path / "why.png")])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)
    assert row["modalities"] == ["audio", "video"] and row["emotion"] in ("happy", "sad")
    # where (4 x 4 cells of the random encoder's map at 112 px) and when (6 frames)
    cells = np.array([grid for _, grid in row["cell_attention"]])
    frames = np.array([w for _, w in row["frame_attention"]])
    assert cells.shape == (6, 4, 4) and cells.sum() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(cells.sum((1, 2)), frames, atol=1e-3)
    png = (tmp_path / "why.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_model_over_cells_gets_feature_maps_even_if_its_settings_predate_them(work, tmp_path):
    torch.manual_seed(0)
    settings = work["settings"]                       # extracted without feature maps
    assert not settings.feature_maps
    cfg = ModelConfig(n_classes=len(CLASSES), modalities="video", video_dim=settings.feature_dim, video_stream="stt",
                      video_cells=16, video_hidden=16, stt_heads=2)
    save_model(tmp_path / "stt.pt", build_model(cfg), CLASSES, settings.to_dict())
    pred = load_model(tmp_path / "stt.pt", "cpu", work["enc"]).predict(FLV)
    assert pred.features.arrays["feature_maps"].shape == (6, 4, 4, settings.feature_dim)
    assert pred.attention["video_cells"].shape == (6, 4, 4)
    np.testing.assert_allclose(pred.attention["video_cells"].sum((1, 2)), pred.attention["video"], atol=1e-6)


def test_adapt_fits_the_voice_side_to_the_files_given_and_leaves_out_those_without_audio(work, media, capsys):
    clips = sorted(SAMPLES.glob("*.flv")) + sorted(SAMPLES.glob("*.mp3"))
    args = ["--model", str(work["audio"]), "--json", "--device", "cpu"]
    assert main([*map(str, clips), *args]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rc = main([*map(str, clips), str(media["silent_video"]), str(media["garbage"]), *args, "--adapt"])
    captured = capsys.readouterr()
    assert rc == 1                                               # the two files without audio fail as ever
    assert "adapted the voice side to 12 clips (their statistics weigh 12/22 against the model's own)" in captured.err
    left_out = [line for line in captured.err.splitlines() if "--adapt: left out" in line]
    assert len(left_out) == 2 and "silent.mp4: audio: no audio stream" in left_out[0] and "garbage.mp4" in left_out[1]
    adapted = [json.loads(line) for line in captured.out.splitlines()][:12]
    assert [r["clip"] for r in adapted] == [r["clip"] for r in plain]
    assert any(abs(a["probabilities"][c] - p["probabilities"][c]) > 1e-3
               for a, p in zip(adapted, plain) for c in CLASSES)
    # the Python API gives the same predictions
    model = load_model(work["audio"], "cpu")
    assert model.adapt_to(clips)[0] == 12
    assert model.predict(clips[0]).probabilities == pytest.approx(adapted[0]["probabilities"], abs=1e-6)
    # two clips weigh little against the model's own statistics, and a model that reads no audio has nothing to adapt
    assert main([*map(str, clips[:2]), *args, "--adapt"]) == 0
    assert "2 clips (their statistics weigh 2/12" in capsys.readouterr().err
    # the shipped default model's voice side learned from three corpora at once: adapting it is refused
    assert main([str(clips[0]), "--device", "cpu", "--adapt"]) == 2
    assert "several corpora at once (cremad, emodb, ravdess)" in capsys.readouterr().err
    face_only = _checkpoint(work["root"] / "video.pt", work["settings"], "video")
    assert main([str(FLV), "--model", str(face_only), "--face-encoder", work["enc"], "--adapt"]) == 2
    assert "reads no audio" in capsys.readouterr().err


def test_adapt_relative_to_a_corpus_works_with_the_default_model_and_never_compounds(media, capsys, monkeypatch):
    speaker, corpus = sorted(SAMPLES.glob("1002_*.mp3")), sorted(SAMPLES.iterdir())
    args = [*map(str, speaker), "--device", "cpu", "--json"]
    assert main(args) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # refused on the speaker's clips alone (three corpora's statistics), accepted relative to their corpus
    assert main([*args, "--adapt", "--corpus", str(SAMPLES), str(media["garbage"])]) == 0
    captured = capsys.readouterr()
    assert ("adapted the voice side to 6 clips, relative to a corpus of 12 clips (their statistics weigh 6/16"
            in captured.err)
    assert "--adapt: left out corpus: " in captured.err and "garbage.mp4: not a readable media file" in captured.err
    adapted = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["clip"] for r in adapted] == [r["clip"] for r in plain]
    assert any(abs(a["probabilities"][c] - p["probabilities"][c]) > 1e-3
               for a, p in zip(adapted, plain) for c in CLASSES)
    # the Python API gives the same, and adapting again starts from the model as trained
    model = load_model("default", "cpu")
    decoded = []
    extract = ClipExtractor.extract
    monkeypatch.setattr(ClipExtractor, "extract", lambda self, path, **kw: decoded.append(path) or extract(self, path, **kw))
    for _ in range(2):
        assert model.adapt_to(speaker, corpus=corpus) == (6, [])
        assert model.predict(speaker[0]).probabilities == pytest.approx(adapted[0]["probabilities"], abs=1e-6)
    assert len(decoded) == 2 * (12 + 1)       # the speaker's files are in the corpus: each read once per adaptation
    assert main([str(speaker[0]), "--corpus", str(SAMPLES)]) == 2
    assert "--corpus needs --adapt" in capsys.readouterr().err
    assert main([str(speaker[0]), "--device", "cpu", "--adapt", "--corpus", str(media["garbage"])]) == 2
    assert "none of the corpus files has usable audio" in capsys.readouterr().err
