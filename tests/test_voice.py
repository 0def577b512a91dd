"""The voice head: the shipped speaker encoder read from cached log-mels, its regressions, and avemo-train's use."""
import numpy as np
import pytest
import torch

from _synthetic_cache import make_cache
from avemo.audio import at_gain, log_mel
from avemo.features import ExtractionSettings
from avemo.model import ModelConfig, build_model, load_model
from avemo.model.adapt import adapt
from avemo.model.voice import (LAYER_STATS, VoiceError, VoiceHead, band_map, encoder, fit_logistic, voice_stats,
                               voice_stats_batch)
from train.cli import SplitOptions, run_training
from train.loop import TrainConfig

torch.set_num_threads(1)
SETTINGS = ExtractionSettings().to_dict()


def speech_like(seed: int, seconds: float = 1.5, f0: float = 140.0) -> np.ndarray:
    """A voiced, gliding harmonic tone with a syllable rhythm, as a cache's log-mel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / 16000
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    wav = (0.1 * wav + 0.003 * rng.standard_normal(len(t))).astype(np.float32)
    s = SETTINGS
    return log_mel(wav, s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])


def test_the_shipped_encoder_loads_and_the_band_map_rebuilds_its_filterbank():
    layers = encoder()
    assert len(layers) == 3 and all(not p.requires_grad for p in layers.parameters())
    bands = band_map(SETTINGS)
    assert bands.shape == (64, 40)
    import torchaudio
    ours = torchaudio.functional.melscale_fbanks(201, 20.0, 8000.0, 64, 16000)
    theirs = torchaudio.functional.melscale_fbanks(201, 0.0, 8000.0, 40, 16000, norm="slaney", mel_scale="slaney")
    assert float((ours @ bands - theirs).norm() / theirs.norm()) < 0.2
    with pytest.raises(VoiceError, match="8 kHz.*4000 Hz"):
        band_map(SETTINGS | {"sample_rate": 8000})


def test_statistics_are_blind_to_the_recording_gain_and_to_chunking(monkeypatch):
    mel = torch.from_numpy(speech_like(0))
    bands = band_map(SETTINGS)
    x = voice_stats(mel, bands)
    assert x.shape == (2 * LAYER_STATS,) and bool(torch.isfinite(x).all())
    # the default layers (2 and 3) are those parts of all three layers' statistics
    every = voice_stats(mel, bands, (1, 2, 3))
    torch.testing.assert_close(every[LAYER_STATS:], x)
    torch.testing.assert_close(voice_stats(mel, bands, (1,)), every[:LAYER_STATS])
    torch.testing.assert_close(voice_stats(at_gain(mel, 20.0), bands), x, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(voice_stats(at_gain(mel, -12.0), bands), x, atol=2e-4, rtol=1e-3)
    monkeypatch.setattr("avemo.model.voice.CHUNK_FRAMES", 37)        # an hour-long clip runs a minute at a time
    torch.testing.assert_close(voice_stats(mel, bands), x, atol=1e-5, rtol=1e-4)
    # a different voice gives different statistics
    assert float((voice_stats(torch.from_numpy(speech_like(1, f0=220.0)), bands) - x).abs().max()) > 1e-2


def test_clips_batched_through_the_encoder_give_each_clip_its_own_statistics(monkeypatch):
    mels = [torch.from_numpy(speech_like(i, seconds=s, f0=f))
            for i, (s, f) in enumerate([(1.5, 140), (0.4, 220), (2.5, 110), (1.0, 180), (0.6, 130)])]
    mels.insert(2, mels[0][:, :0])                                    # a clip of no frames
    bands = band_map(SETTINGS)
    each = [voice_stats(m, bands, (1, 3)) for m in mels if m.shape[1]]
    # several batches (the budget splits the five clips) and one clip longer than the budget, run in chunks
    monkeypatch.setattr("avemo.model.voice.BATCH_FRAMES", 200)
    monkeypatch.setattr("avemo.model.voice.CHUNK_FRAMES", 97)
    batched = voice_stats_batch(mels, bands, (1, 3))
    assert batched.shape == (6, 2 * LAYER_STATS)
    assert bool((batched[2] == 0).all())
    torch.testing.assert_close(torch.cat([batched[:2], batched[3:]]), torch.stack(each), atol=2e-5, rtol=1e-4)
    assert voice_stats_batch([], bands).shape == (0, 2 * LAYER_STATS)


def test_noisy_copies_train_the_plain_regression_and_leave_the_clean_mean_and_the_speaker_regression():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    x = (rng.normal(size=(30, 2 * LAYER_STATS)) + np.eye(3, 2 * LAYER_STATS)[y] * 2).astype(np.float32)
    x_noisy = np.stack([x + rng.normal(0.5, 1.0, x.shape).astype(np.float32) for _ in range(2)])
    speakers = ["a", "b", "c"] * 10
    head, clean = VoiceHead(64, 3, 0.5, (2, 3)), VoiceHead(64, 3, 0.5, (2, 3))
    head.fit_stats(x, y, speakers, 3, x_noisy)
    clean.fit_stats(x, y, speakers, 3)
    mu, sd, w, b = fit_logistic(np.concatenate([x, *x_noisy]), np.tile(y, 3), 3)
    np.testing.assert_allclose(head.logits(x), ((x - mu) / sd) @ w.T + b, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(head.stats_mean.numpy(), x.mean(0), atol=1e-5)
    assert not np.allclose(head.logits(x), clean.logits(x), atol=1e-2)
    for name in ("speaker_classifier.weight", "speaker_classifier.bias", "centred_std"):
        torch.testing.assert_close(head.state_dict()[name], clean.state_dict()[name])


def test_logistic_fit_is_deterministic_and_separates_what_is_separable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 3, 20, axis=0)
    y = np.repeat(np.arange(3), 20)
    a, b = fit_logistic(x, y, 3), fit_logistic(x, y, 3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    mu, sd, w, bias = a
    assert (((x - mu) / sd @ w.T + bias).argmax(1) == y).mean() > 0.95


def test_the_head_mixes_probabilities_and_adapts_to_a_group():
    mels = [speech_like(i, f0=f) for i, f in enumerate((110, 120, 130, 200, 210, 220) * 2)]
    labels = np.array([0, 0, 0, 1, 1, 1] * 2)
    speakers = ["a"] * 6 + ["b"] * 6
    head = VoiceHead(64, 2, weight=0.4, layers=(2, 3))
    assert not head.is_fitted
    head.fit(mels, labels, speakers, SETTINGS, 2)
    assert head.is_fitted and bool(head.speaker_fitted > 0)
    mel = torch.zeros(2, 64, max(m.shape[1] for m in mels))
    mask = torch.zeros(2, mel.shape[2], dtype=torch.bool)
    mel[0, :, :mels[0].shape[1]], mask[0, :mels[0].shape[1]] = torch.from_numpy(mels[0]), True
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    out = torch.softmax(head.mix(logits, mel, mask), -1)
    x = (head.stats(mel[:1], mask[:1]) - head.stats_mean) / head.stats_std
    p_voice = torch.softmax(head.classifier(x), -1)
    torch.testing.assert_close(out[0], 0.6 * torch.softmax(logits[0], -1) + 0.4 * p_voice[0])
    torch.testing.assert_close(out[1], torch.softmax(logits[1], -1))     # no audio: the model's own
    head.adapt(mels[:6], prior_clips=0)
    assert bool(head.adapted > 0)
    group = np.stack([voice_stats(torch.from_numpy(m), head.bands, (2, 3)).numpy() for m in mels[:6]]).mean(0)
    torch.testing.assert_close(head.group_mean, torch.from_numpy(group))       # prior 0: the group's own mean


def test_one_speaker_fits_no_speaker_relative_regression():
    mels = [speech_like(i) for i in range(4)]
    head = VoiceHead(64, 2, weight=0.5, layers=(3,))
    head.fit(mels, np.array([0, 1, 0, 1]), ["a"] * 4, SETTINGS, 2)
    assert head.is_fitted and not bool(head.speaker_fitted > 0)
    head.adapt(mels, prior_clips=10)
    assert not bool(head.adapted > 0)                  # nothing to adapt with: the plain regression stays


def test_avemo_train_fits_the_head_after_the_fcn_and_the_checkpoint_carries_it(tmp_path):
    cache = make_cache(tmp_path / "c", video=False, n_mels=64, per_class=4)
    split = SplitOptions(val_speakers="s3", test_speakers="s4")
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, audio_init="none")
    run_training(cache, tmp_path / "run", {}, cfg, split)
    net, ckpt = load_model(tmp_path / "run" / "best.pt")
    assert ckpt["config"]["voice_head"] == ModelConfig.voice_head and net.voice.is_fitted and bool(net.voice.speaker_fitted > 0)
    assert not any(p.requires_grad for p in net.voice.parameters())       # the optimiser and DDP never see it
    last, _ = load_model(tmp_path / "run" / "last.pt")      # training itself never saw the head
    assert not last.voice.is_fitted
    batch = {"mel": torch.randn(2, 64, 30) - 4, "mel_mask": torch.ones(2, 30, dtype=torch.bool)}
    fused = torch.softmax(net(batch)["logits"], -1)
    net.voice.fitted.zero_()
    alone = torch.softmax(net(batch)["logits"], -1)
    assert not torch.allclose(fused, alone)
    adapted = adapt(load_model(tmp_path / "run" / "best.pt")[0], [batch["mel"][0].numpy()])
    assert bool(adapted.voice.adapted > 0)
    # --voice-head 0, and any av or video model: no head at all
    run_training(cache, tmp_path / "plain", {"voice_head": 0.0}, cfg, split)
    plain, _ = load_model(tmp_path / "plain" / "best.pt")
    assert not hasattr(plain, "voice")
    assert not hasattr(build_model(ModelConfig(n_classes=3, modalities="av", video_dim=8)), "voice")
    with pytest.raises(ValueError, match="voice_head must be in"):
        ModelConfig(n_classes=3, modalities="audio", voice_head=1.0)


def test_voice_layers_are_checked_and_a_head_from_before_the_choice_reads_all_three():
    for bad in ((), (0, 2), (3, 2), (2, 2), (4,)):
        with pytest.raises(ValueError, match="voice_layers"):
            ModelConfig(n_classes=3, modalities="audio", voice_layers=bad)
    assert ModelConfig.from_dict(ModelConfig(n_classes=3, modalities="audio").to_dict()).voice_layers == (2, 3)
    stored = {k: v for k, v in ModelConfig(n_classes=3, modalities="audio").to_dict().items() if k != "voice_layers"}
    old = ModelConfig.from_stored(stored)
    assert old.voice_layers == (1, 2, 3)
    assert build_model(old).voice.stats_mean.shape == (3 * LAYER_STATS,)


def test_a_late_fusion_model_mixes_the_head_into_its_audio_expert_before_the_product():
    cfg = ModelConfig(n_classes=2, modalities="av", video_dim=6, video_stream="mean", fusion="product",
                      audio_channels=(4, 8), voice_head=0.3)
    assert cfg.uses_voice_head and not ModelConfig(**{**cfg.to_dict(), "fusion": "fbp"}).uses_voice_head
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    mels = [speech_like(i, f0=f) for i, f in enumerate((110, 120, 130, 200, 210, 220))]
    net.voice.fit(mels, np.array([0, 0, 0, 1, 1, 1]), [None] * 6, SETTINGS, 2)
    n = mels[0].shape[1]
    batch = {"mel": torch.from_numpy(np.stack([mels[0], mels[4]])), "mel_mask": torch.ones(2, n, dtype=torch.bool),
             "video": torch.randn(2, 5, 6), "video_mask": torch.ones(2, 5, dtype=torch.bool)}
    with torch.no_grad():
        out = net(batch)
        net.voice.fitted.zero_()
        alone = net(batch)
        net.voice.fitted.fill_(1.0)
    p_voice = torch.softmax(torch.from_numpy(net.voice.logits(net.voice.clip_stats([mels[0], mels[4]]))), -1)
    torch.testing.assert_close(out["audio_logits"].exp(), 0.7 * alone["audio_logits"].exp() + 0.3 * p_voice)
    torch.testing.assert_close(out["video_logits"], alone["video_logits"])
    torch.testing.assert_close(out["logits"], torch.log_softmax(out["audio_logits"] + out["video_logits"], -1))
    # temper: the regression's logits divided by T
    x = net.voice.clip_stats(mels[:2])
    before = net.voice.logits(x)
    net.voice.temper(2.0)
    np.testing.assert_allclose(net.voice.logits(x), before / 2.0, rtol=1e-5, atol=1e-6)


def test_building_a_head_draws_no_random_numbers_from_the_models_stream():
    # a seed's FCN (and everything drawn after it) is the same with or without a head
    states = []
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        net = build_model(ModelConfig(n_classes=3, modalities="audio", audio_channels=(4, 8), voice_head=weight))
        states.append(({k: v for k, v in net.state_dict().items() if not k.startswith("voice.")}, torch.rand(3)))
    (a, after_a), (b, after_b) = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(after_a, after_b)


def test_a_cache_below_16_khz_trains_the_fcn_alone_and_says_why(tmp_path, caplog):
    settings = ExtractionSettings(sample_rate=8000, n_mels=64, feature_dim=16)
    cache = make_cache(tmp_path / "c", video=False, n_mels=64, per_class=3, settings=settings)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, audio_init="none")
    with caplog.at_level("WARNING"):
        run_training(cache, tmp_path / "run", {}, cfg, SplitOptions(test_speakers="s4"))
    net, _ = load_model(tmp_path / "run" / "best.pt")
    assert not net.voice.is_fitted
    assert any("no voice head" in r.getMessage() and "8 kHz" in r.getMessage() for r in caplog.records)
