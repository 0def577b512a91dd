"""Training-time augmentation: gain, random windows, mixup and SpecAugment respect the padding masks; the voice
head's noisy copies add noise at the signal-to-noise ratios they say, and its band copies keep the bands they say."""
import numpy as np
import pytest
import torch
import torchaudio

from avemo.audio import LOG_EPS
from avemo.features import ExtractionSettings
from train.augment import (NOISE_SNR_DB, AugmentConfig, BatchAugment, band_copies, mix_clips, noisy_copies, random_crop,
                           tempo_stretch, voice_copies)


def _padded_batch(lengths, n_mels=6, t=12):
    mel = torch.randn(len(lengths), n_mels, t) - 4.0
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return {"mel": mel * mask[:, None, :], "mel_mask": mask}


def test_random_crop_takes_a_contiguous_window_of_real_steps_only():
    torch.manual_seed(0)
    b = _padded_batch([12, 9, 3])
    for _ in range(20):
        mel, mask = random_crop(b["mel"], b["mel_mask"], frames=5)
        assert mel.shape == (3, 6, 5)
        assert mask.sum(1).tolist() == [5, 5, 3]          # a clip shorter than the window is kept whole
        for i, length in enumerate([12, 9, 3]):
            kept = int(mask[i].sum())
            window = mel[i, :, :kept]
            # the window is some run of the clip's own real steps, never padding
            starts = [s for s in range(length - kept + 1) if torch.equal(b["mel"][i, :, s:s + kept], window)]
            assert starts, (i, kept)
            assert torch.all(mel[i, :, kept:] == 0)


def test_mixup_mixes_where_both_clips_are_real_and_copies_where_one_is():
    b = _padded_batch([12, 7])
    b["video"] = torch.randn(2, 4, 3)
    b["video_mask"] = torch.tensor([[True, True, False, False], [True, False, True, False]])
    out = mix_clips(b, torch.tensor([1, 0]), 0.7)
    x, y = b["mel"][0], b["mel"][1]
    torch.testing.assert_close(out["mel"][0, :, :7], 0.7 * x[:, :7] + 0.3 * y[:, :7])
    torch.testing.assert_close(out["mel"][0, :, 7:], x[:, 7:])             # partner is padding there
    torch.testing.assert_close(out["mel"][1, :, 7:], x[:, 7:])             # own padding: partner's real steps
    assert out["mel_mask"].all()
    v = b["video"]
    torch.testing.assert_close(out["video"][0, 0], 0.7 * v[0, 0] + 0.3 * v[1, 0])
    torch.testing.assert_close(out["video"][0, 1], v[0, 1])
    torch.testing.assert_close(out["video"][0, 2], v[1, 2])
    assert out["video_mask"].tolist() == [[True, True, True, False]] * 2


def test_mixup_is_off_by_default_and_keeps_the_clips_own_label_dominant():
    b = _padded_batch([12, 12, 12, 12])
    same, partner, lam = BatchAugment(AugmentConfig()).mixup(b)
    assert same is b and partner is None and lam == 1.0
    torch.manual_seed(0)
    for _ in range(10):
        _, partner, lam = BatchAugment(AugmentConfig(mixup=0.4)).mixup(b)
        assert 0.5 <= lam <= 1.0 and sorted(partner.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(crop=0.05)])
def test_spec_augment_and_crops_leave_padding_at_zero(cfg):
    torch.manual_seed(0)
    b = _padded_batch([12, 5, 9])
    out = BatchAugment(cfg, mel_frames_per_second=100.0)(b, torch.full((6,), -4.0))
    assert torch.all(out["mel"] * ~out["mel_mask"][:, None, :] == 0)
    assert out["mel_mask"].sum(1).tolist() == ([12, 5, 9] if cfg.crop == 0 else [5, 5, 5])


def test_tempo_stretch_resamples_each_clip_in_time_and_keeps_padding_out():
    b = _padded_batch([12, 9, 0])
    mel, mask = tempo_stretch(b["mel"], b["mel_mask"], torch.tensor([1.0, 2.0, 1.5]))
    assert mask.sum(1).tolist() == [12, 4, 0]                  # 9 steps at double speed -> 4 (floor 9 / 2)
    torch.testing.assert_close(mel[0], b["mel"][0])            # rate 1: the clip itself
    torch.testing.assert_close(mel[1, :, :4], b["mel"][1][:, [0, 2, 4, 6]])
    assert torch.all(mel[1, :, 4:] == 0) and torch.all(mel[2] == 0)
    slow, smask = tempo_stretch(b["mel"][:1], b["mel_mask"][:1], torch.tensor([0.5]))
    assert int(smask.sum()) == 24
    # half speed: every other step is the mean of two neighbours, never a value from the padding
    torch.testing.assert_close(slow[0, :, 1], (b["mel"][0, :, 0] + b["mel"][0, :, 1]) / 2)
    torch.testing.assert_close(slow[0, :, 23], b["mel"][0, :, 11])


@pytest.mark.parametrize("norm", ["global", "level"])
def test_spec_augment_masks_to_what_the_models_normalisation_maps_to_zero(norm):
    from avemo.model import ModelConfig, build_model
    torch.manual_seed(0)
    b = _padded_batch([12, 5, 9])
    b["mel"] = (b["mel"] + torch.tensor([3.0, -2.0, 0.5])[:, None, None]) * b["mel_mask"][:, None, :]  # loudness
    model = build_model(ModelConfig(n_classes=2, n_mels=6, modalities="audio", audio_channels=(4,), audio_norm=norm))
    model.set_normalisation({"mel_mean": torch.linspace(-5, -3, 6), "mel_std": torch.ones(6)})
    cfg = AugmentConfig(freq_mask=2, time_mask=3, n_masks=2, gain=0.0)      # the masks alone
    out = BatchAugment(cfg)(b, model.mel_mean, norm)
    masked = ((out["mel"] - b["mel"]).abs() > 1e-4) & b["mel_mask"][:, None, :]     # not rounding
    assert masked.any()
    before = model._normalise_mel(b["mel"], b["mel_mask"])
    after = model._normalise_mel(out["mel"], out["mel_mask"])
    # the masks change the clip's loudness a little, so a level model's zero moves
    # with them; unmasked, they are the clip's own zero
    tol = 1e-5 if norm == "global" else 0.3          # masked to the training mean instead: 3 to 5
    assert after[masked].abs().max() < tol
    if norm != "global":
        assert (before - after)[~masked & b["mel_mask"][:, None, :]].abs().max() < tol


def test_gain_replays_each_clip_at_its_own_volume_and_keeps_padding_out():
    torch.manual_seed(0)
    b = _padded_batch([12, 9, 3])
    b["mel"][0, :, :4] = torch.log(torch.tensor(1e-6))            # a silent stretch at the floor
    b["mel"] = b["mel"] * b["mel_mask"][:, None, :]
    out = BatchAugment(AugmentConfig(freq_mask=0, time_mask=0, gain=20.0))(b, None)
    shift = out["mel"] - b["mel"]
    for i, length in enumerate([12, 9, 3]):
        loud = shift[i, :, 4 if i == 0 else 0:length]
        # well above the floor every cell moves by the clip's one gain, within +-20 dB (2 ln g <= 4.61 nats)
        assert loud.std() < 1e-3 and loud.abs().max() <= 20 * torch.log(torch.tensor(10.0)) / 10 + 1e-4
        assert torch.all(out["mel"][i, :, length:] == 0)
    assert shift[:, 0, 5].unique().numel() == 3                   # a gain of its own per clip
    # the floor stays where it is when the clip gets quieter, and rises only by what was under it when louder
    assert torch.all(out["mel"][0, :, :4] >= torch.log(torch.tensor(1e-6)) - 1e-4)
    assert (out["mel"][0, :, :4] - b["mel"][0, :, :4]).abs().max() < 1e-3


def test_noisy_copies_only_add_power_at_the_snr_range_reproducibly_and_whatever_the_chunking(monkeypatch):
    settings = ExtractionSettings().to_dict()
    rng = np.random.default_rng(0)
    # speech-like power: a sloping spectrum with a syllable rhythm, each clip its own length and level
    mels = [np.log(rng.gamma(2.0, 1.0, (64, t)) * np.linspace(1.0, 0.01, 64)[:, None]
                   * (1.2 + np.sin(np.arange(t) / 7.0))[None] * level + LOG_EPS).astype(np.float32)
            for t, level in ((180, 1e-2), (90, 1.0), (260, 3e-3), (120, 0.2))]
    speakers = ["a", "a", "b", None]
    copies = noisy_copies(mels, speakers, settings, 3, seed=1)
    assert len(copies) == 3 and all(len(copy) == len(mels) for copy in copies)
    power = lambda m: np.exp(m.astype(np.float64)) - LOG_EPS                      # noqa: E731
    for copy in copies:
        for clean, noisy in zip(mels, copy):
            assert noisy.shape == clean.shape and noisy.dtype == np.float32 and np.isfinite(noisy).all()
            added = power(noisy) - power(clean)
            assert added.min() > -1e-4 * power(clean).max()                     # noise adds power, never removes
            snr = 10 * np.log10(power(clean).sum(0).mean() / added.sum(0).mean())
            assert NOISE_SNR_DB[0] - 1 < snr < NOISE_SNR_DB[1] + 1
    again = noisy_copies(mels, speakers, settings, 3, seed=1)
    assert all(np.array_equal(a, b) for x, y in zip(copies, again) for a, b in zip(x, y))
    other = noisy_copies(mels, speakers, settings, 1, seed=2)[0]
    assert not all(np.array_equal(a, b) for a, b in zip(copies[0], other))
    monkeypatch.setattr("train.augment.NOISE_CHUNK", 37)                         # an hour-long clip, a bit at a time
    chunked = noisy_copies(mels, speakers, settings, 3, seed=1)
    for x, y in zip(copies, chunked):
        for a, b in zip(x, y):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert noisy_copies(mels, speakers, settings, 0) == [] and noisy_copies([], [], settings, 2) == []


def test_band_copies_keep_a_telephone_or_8k_band_and_take_the_rest_away_reproducibly():
    settings = ExtractionSettings().to_dict()
    rng = np.random.default_rng(0)
    mels = [np.log(rng.gamma(2.0, 1.0, (64, t)) * 1e-2 + LOG_EPS).astype(np.float32) for t in (50, 140, 90)]
    copies = band_copies(mels, settings, 40, seed=3)
    assert len(copies) == 40 and all(len(copy) == len(mels) for copy in copies)
    centres = torchaudio.functional.melscale_fbanks(201, settings["f_min"], 8000.0, 64, 16000).argmax(0) * 40.0
    power = lambda m: np.exp(m.astype(np.float64)) - LOG_EPS                      # noqa: E731
    kept_lows = 0
    for copy in copies:
        for clean, narrow in zip(mels, copy):
            assert narrow.shape == clean.shape and narrow.dtype == np.float32 and np.isfinite(narrow).all()
            share = power(narrow).sum(1) / power(clean).sum(1)                     # [n_mels]: what each band kept
            assert (share <= 1 + 1e-4).all()                                       # a channel only takes away
            assert (share[(centres > 800) & (centres < 2800)] > 0.999).all()      # speech's core always passes
            assert (share[centres > 4500] < 1e-6).all()                            # nothing above 4.2 kHz
            kept_lows += bool(share[centres < 150].min() > 0.999)
    assert 0.3 < kept_lows / (40 * len(mels)) < 0.7                               # half keep the lows (8 kHz audio)
    again = band_copies(mels, settings, 40, seed=3)
    assert all(np.array_equal(a, b) for x, y in zip(copies, again) for a, b in zip(x, y))
    assert band_copies(mels, settings, 0) == [] and band_copies([], settings, 2) == []
    both = voice_copies(mels, ["a", "b", "a"], settings, noise=1, band=2, seed=3)
    assert len(both) == 3 and all(np.array_equal(a, b) for a, b in zip(both[1], band_copies(mels, settings, 2, 3)[0]))


def test_batch_noise_mixes_into_the_chosen_clips_only_and_keeps_padding_out():
    settings = ExtractionSettings().to_dict()
    torch.manual_seed(0)
    lengths = [50, 30, 50, 40]
    mask = torch.arange(50)[None, :] < torch.tensor(lengths)[:, None]
    mel = (torch.log(torch.rand(4, 64, 50) * 1e-2 + LOG_EPS)) * mask[:, None, :]
    batch = {"mel": mel, "mel_mask": mask}
    off = BatchAugment(AugmentConfig(freq_mask=0, time_mask=0, gain=0.0), settings=settings)(batch, None)
    assert torch.equal(off["mel"], mel)                                          # --noise 0: untouched
    noisy = BatchAugment(AugmentConfig(freq_mask=0, time_mask=0, gain=0.0, noise=1.0), settings=settings)(batch, None)
    assert bool((noisy["mel"][~mask[:, None, :].expand_as(mel)] == 0).all())     # padding stays zero
    power = lambda m: (m.double().exp() - LOG_EPS) * mask[:, None, :]             # noqa: E731
    added = power(noisy["mel"]) - power(mel)
    assert float(added.min()) > -1e-6
    snr = 10 * torch.log10(power(mel).sum((1, 2)) / added.sum((1, 2)))
    assert bool(((snr > NOISE_SNR_DB[0] - 1.5) & (snr < NOISE_SNR_DB[1] + 1.5)).all())
