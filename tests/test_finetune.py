"""avemo-train --finetune-encoder: the face encoder trained with the video stream from the cache's crops."""

import numpy as np
import pytest
import torch

from _synthetic_cache import blind_encoder, make_crop_cache
from avemo.batching import collate
from avemo.encoders import build_encoder, file_sha256, load_encoder
from avemo.features import ClipFeatures
from avemo.model import ModelConfig, build_model, load_model
from avemo.model.frames import FrameEncoder, clip_face_pixels, encoder_spec
from avemo.prediction import EmotionRecognizer
from train.augment import AugmentConfig
from train.cli import SplitOptions, cli, run_training
from train.evaluate import evaluate_cache
from train.data import load_training_data
from train.finetune import CropBank, sample_frames
from train.loop import TrainConfig, TrainError

torch.set_num_threads(1)
SPLIT = SplitOptions(val_speakers="s3", test_speakers="s4")
SMALL = dict(video_hidden=16, stt_heads=2, dropout=0.1)


@pytest.fixture(scope="module")
def blind(tmp_path_factory):
    """An encoder whose frozen features are one constant vector, and a cache whose classes differ by a
    pattern in the crops: frozen features cannot tell the classes apart, the pixels can."""
    root = tmp_path_factory.mktemp("e2e")
    enc = blind_encoder(root / "blind.pt")
    return {"root": root, "enc": enc, "cache": make_crop_cache(root / "cache", enc)}


def quick(**kw):
    base = dict(epochs=12, batch_size=8, lr=1e-2, patience=0, progress=False, augment=AugmentConfig(0, 0, 1, 0.0),
                audio_init="none", schedule="cosine", encoder_lr=1e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fan_run(blind):
    out = blind["root"] / "fan-e2e"
    report = run_training(blind["cache"], out, dict(SMALL, video_stream="fan"), quick(finetune_encoder=True), SPLIT)
    return {"out": out, "report": report}


@pytest.mark.parametrize("stream", ["fan", "stt", "attention"])
def test_end_to_end_learns_a_pattern_the_frozen_features_cannot_see(blind, fan_run, tmp_path, stream):
    frozen = run_training(blind["cache"], tmp_path / "frozen", dict(SMALL, video_stream=stream), quick(), SPLIT)
    e2e = fan_run["report"] if stream == "fan" else run_training(
        blind["cache"], tmp_path / "e2e", dict(SMALL, video_stream=stream), quick(finetune_encoder=True), SPLIT)
    assert frozen["evaluated_on"] == e2e["evaluated_on"] == "test" and e2e["n"] == 16
    assert frozen["uar"] <= 0.55, frozen        # chance is 1/2: every cached feature is the same vector
    assert e2e["uar"] >= 0.9, e2e


def test_checkpoint_carries_the_finetuned_encoder_and_predicts_through_it(blind, fan_run):
    model, ckpt = load_model(fan_run["out"] / "best.pt")
    spec = model.cfg.frame_encoder
    assert spec["started_from"]["sha256"] == file_sha256(blind["enc"]) and spec["augment"]["rotate"] == 5.0
    assert ckpt["train_config"]["finetune_encoder"] is True and ckpt["train_config"]["frames_per_clip"] == 3
    start = load_encoder(blind["enc"]).model.state_dict()
    tuned = model.frame_encoder.net.state_dict()
    assert set(tuned) == set(start)
    assert float(start["conv5.1.weight"].abs().max()) == 0.0 < float(tuned["conv5.1.weight"].abs().max())

    # by hand: the encoder rebuilt from the checkpoint's plain settings and weights, its features fed to
    # the same model without a frame encoder (the frozen-feature path)
    net = build_encoder(spec["arch"], spec["n_classes"], **spec["arch_cfg"]).eval()
    net.load_state_dict({k[len("frame_encoder.net."):]: v for k, v in ckpt["model"].items()
                         if k.startswith("frame_encoder.net.")})
    frozen_style = build_model({**model.cfg.to_dict(), "frame_encoder": None}).eval()
    frozen_style.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("frame_encoder.")})
    data = load_training_data(blind["cache"])
    recognizer = EmotionRecognizer(fan_run["out"] / "best.pt", "cpu", str(blind["enc"]))
    for i in (0, 17, 40):
        feats = ClipFeatures.load(data.files[i], with_crops=True)
        mask = feats.arrays["face_mask"]
        with torch.no_grad():
            x = (torch.from_numpy(feats.arrays["crops"][mask]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
            video = torch.zeros(1, len(mask), spec["feature_dim"])
            video[0, torch.from_numpy(mask)] = net.forward_features(x)
            by_hand = torch.softmax(frozen_style({"video": video, "video_mask": torch.from_numpy(mask)[None]})["logits"], -1)[0]
            cached = torch.softmax(frozen_style(collate([feats], model.cfg.n_mels, spec["feature_dim"]))["logits"], -1)[0]
        pred = recognizer.predict_features(feats)
        np.testing.assert_allclose([pred.probabilities[c] for c in recognizer.classes], by_hand.numpy(), atol=1e-5)
        assert not np.allclose(by_hand.numpy(), cached.numpy(), atol=1e-3)    # not the frozen cached features
        assert pred.attention["video"][~mask].sum() == 0


def test_a_cache_without_crops_fails_before_training_saying_to_keep_crops(blind, tmp_path, capsys):
    cache = make_crop_cache(tmp_path / "nocrops", blind["enc"], per_class=2, keep_crops=False)
    with pytest.raises(TrainError, match="re-extract.*--keep-crops|Re-extract.*--keep-crops"):
        run_training(cache, tmp_path / "run", dict(SMALL, video_stream="fan"), quick(finetune_encoder=True), SPLIT)
    assert not (tmp_path / "run" / "last.pt").exists()
    rc = cli([str(cache), "--out", str(tmp_path / "cli"), "--audio-init", "none", "--video-stream", "fan",
              "--finetune-encoder", "--epochs", "1", "--quiet"])
    assert rc == 2 and "--keep-crops" in capsys.readouterr().err
    with pytest.raises(TrainError, match="--mixup"):
        run_training(blind["cache"], tmp_path / "mix", dict(SMALL), quick(finetune_encoder=True,
                                                                          augment=AugmentConfig(0, 0, 1, 0.0, mixup=0.4)), SPLIT)


def test_sample_frames_keeps_k_face_frames_per_clip_in_place():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    seen = torch.zeros_like(mask, dtype=torch.long)
    for _ in range(200):
        got = sample_frames(mask, 3)
        assert not (got & ~mask).any()                                   # only frames with a face
        assert got.sum(1).tolist() == [3, 2, 0, 3]                       # k, or all of a shorter clip
        seen += got
    assert ((seen > 0) == mask).all()                                    # every face frame gets its turn
    assert torch.equal(sample_frames(mask, 0), mask) and torch.equal(sample_frames(mask, 6), mask)


def test_training_encodes_k_frames_per_clip_and_evaluation_every_frame(blind, tmp_path, monkeypatch):
    calls = []
    forward = FrameEncoder.forward

    def spy(self, faces, mask, maps=False):
        calls.append((self.training, mask.sum(1).tolist(), len(faces)))
        return forward(self, faces, mask, maps)

    monkeypatch.setattr(FrameEncoder, "forward", spy)
    run_training(blind["cache"], tmp_path / "run", dict(SMALL, video_stream="stt"),
                 quick(finetune_encoder=True, epochs=1, frames_per_clip=2, augment=AugmentConfig(0, 0, 1, 0.1)), SPLIT)
    train = [c for c in calls if c[0]]
    evals = [c for c in calls if not c[0]]
    assert train and evals
    assert all(n in (1, 2) for _, counts, _ in train for n in counts)   # 2 (frame dropout may leave 1)
    assert all(len_faces == sum(counts) for _, counts, len_faces in calls)
    assert {n for _, counts, _ in evals for n in counts} == {5}           # 6 frames, one without a face


@pytest.mark.parametrize("stream", ["fan", "stt"])
def test_the_model_on_its_starting_encoder_reproduces_the_frozen_features(tmp_path, stream):
    # a sighted (not blind) encoder: the e2e model at step 0 equals the frozen-feature model exactly
    # (stt: over the cells of the feature maps, which the model's encoder then computes too)
    path = blind_encoder(tmp_path / "enc.pt")
    enc = load_encoder(path)
    with torch.no_grad():
        enc.model.conv5[1].weight.fill_(1.0)
    cache = make_crop_cache(tmp_path / "cache", path, per_class=1, speakers=("s1",))
    data = load_training_data(cache, with_maps=True)
    cells = data.video_cells if stream == "stt" else 0
    cfg = ModelConfig(n_classes=2, modalities="video", video_dim=enc.feature_dim, video_stream=stream, video_hidden=8,
                      stt_heads=2, video_cells=cells)
    frozen = build_model(cfg).eval()
    e2e = build_model({**cfg.to_dict(), "frame_encoder": encoder_spec(enc)}).eval()
    missing = e2e.load_state_dict(frozen.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("frame_encoder.") for k in missing)
    e2e.frame_encoder.net.load_state_dict(enc.model.state_dict())
    feats = [ClipFeatures.load(f, with_crops=True) for f in data.files]
    for f in feats:      # the cache's features, recomputed by the sighted encoder, as extraction would
        m = f.arrays["face_mask"]
        pooled, maps = enc.embed_maps(f.arrays["crops"][m])
        f.arrays["video_features"][m] = pooled.numpy()
        f.arrays["feature_maps"] = np.zeros((len(m), *maps.shape[1:]), np.float32)
        f.arrays["feature_maps"][m] = maps.numpy()
    batch = collate(feats, cfg.n_mels, enc.feature_dim, cells)
    bank = CropBank(data, list(range(len(data))), e2e.cfg.frame_encoder).place(torch.device("cpu"), True)
    e2e_batch = bank.attach({**batch, "frame_rows": bank.rows_of(torch.arange(len(data)), batch["video_mask"].shape[1])})
    assert "video" not in e2e_batch and "video_maps" not in e2e_batch and e2e_batch["faces"].dtype == torch.uint8
    assert torch.equal(e2e_batch["faces"], torch.cat([clip_face_pixels(f, enc.input_size, False) for f in feats]))
    with torch.no_grad():
        np.testing.assert_allclose(e2e(e2e_batch)["logits"].numpy(), frozen(batch)["logits"].numpy(), atol=1e-4)


@pytest.mark.parametrize("change,reason", [
    (lambda fe: fe["arch_cfg"].update(stages_repeats=[1]), "cannot be built"),
    (lambda fe: fe.update(std=[0.0, 0.0, 0.0]), "std"),
    (lambda fe: fe.update(feature_dim=7), "video stream reads"),
])
def test_a_tampered_frame_encoder_is_refused_with_a_reason(fan_run, tmp_path, change, reason):
    from avemo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from avemo.model import MODEL_KIND, MODEL_VERSION
    ckpt = load_checkpoint(fan_run["out"] / "best.pt", MODEL_KIND, (MODEL_VERSION,))
    change(ckpt["config"]["frame_encoder"])
    save_checkpoint(tmp_path / "bad.pt", ckpt, MODEL_KIND, MODEL_VERSION)
    with pytest.raises(CheckpointError, match=reason):
        load_model(tmp_path / "bad.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stream", ["fan", "stt"])
def test_cuda_end_to_end_learns_with_the_crops_on_the_device(blind, tmp_path, stream):
    # the GPU path: crops held on the device as uint8, bf16 autocast, stt over the encoder's own maps
    report = run_training(blind["cache"], tmp_path / "run", dict(SMALL, video_stream=stream),
                          quick(finetune_encoder=True), SPLIT)
    assert report["uar"] >= 0.9, report
    model, _ = load_model(tmp_path / "run" / "best.pt")          # and it loads on the CPU, as avemo-predict does
    assert next(model.parameters()).device.type == "cpu" and model.cfg.frame_encoder is not None


def test_avemo_evaluate_reads_the_crops_of_a_model_trained_end_to_end(blind, fan_run):
    r = evaluate_cache(blind["cache"], model=str(fan_run["out"] / "best.pt"), speakers=["s4"], device="cpu")
    assert r["n"] == fan_run["report"]["n"] and r["uar"] == pytest.approx(fan_run["report"]["uar"])
    assert r["confusion"] == fan_run["report"]["confusion"]
