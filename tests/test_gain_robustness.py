"""avemo.audio.at_gain and benchmarks/gain_robustness.py: a cached clip replayed at another recording gain, exactly."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from avemo.audio import at_gain, log_mel

_spec = importlib.util.spec_from_file_location(
    "gain_robustness", Path(__file__).resolve().parents[1] / "benchmarks" / "gain_robustness.py")
gain_robustness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gain_robustness)


def test_a_replayed_spectrogram_is_the_spectrogram_of_the_louder_or_quieter_recording():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) * (t < 0.6) + 1e-4 * rng.standard_normal(16000)).astype(np.float32)
    mel = log_mel(wav, 16000, 400, 160, 16)
    for db in (-30.0, -6.0, 0.0, 12.0):
        quieter = log_mel(wav * np.float32(10 ** (db / 20)), 16000, 400, 160, 16)
        np.testing.assert_allclose(at_gain(torch.from_numpy(mel), db).numpy(), quieter, atol=2e-3)
    # near the silence floor the shift is not a constant: that is what replaying exactly is for
    assert np.abs(at_gain(torch.from_numpy(mel), -30.0).numpy() - (mel - 30 * np.log(10) / 10)).max() > 1.0
    # a batch, one gain per clip
    batch = at_gain(torch.from_numpy(np.stack([mel, mel])), torch.tensor([-6.0, 12.0])).numpy()
    np.testing.assert_allclose(batch[0], log_mel(wav * np.float32(10 ** (-6 / 20)), 16000, 400, 160, 16), atol=2e-3)
    np.testing.assert_allclose(batch[1], log_mel(wav * np.float32(10 ** (12 / 20)), 16000, 400, 160, 16), atol=2e-3)


def test_rows_name_runs_files_and_directories_of_runs(tmp_path):
    for fold in ("seed0/fold1", "seed0/fold2", "seed1/fold1"):
        (tmp_path / "bench" / fold).mkdir(parents=True)
        (tmp_path / "bench" / fold / "best.pt").write_bytes(b"")
        (tmp_path / "bench" / fold / "split.json").write_text("{}")
    (tmp_path / "bench" / "seed1" / "fold1" / "split.json").unlink()     # unfinished: no split, not a run
    name, runs = gain_robustness.expand(f"level={tmp_path / 'bench'}")
    assert name == "level" and [r.relative_to(tmp_path / "bench").as_posix() for r in runs] == ["seed0/fold1",
                                                                                                  "seed0/fold2"]
    name, runs = gain_robustness.expand(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}")
    assert name == f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}" and runs == [tmp_path / "a.pt", tmp_path / "b.pt"]


def _write_wav(path, wav: np.ndarray, rate: int = 16000) -> None:
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())


def test_noise_is_mixed_into_the_decoded_speech_at_the_asked_snr_and_a_foreign_cache_is_refused(tmp_path):
    from types import SimpleNamespace

    import pytest

    from avemo.features import ExtractionSettings
    s = ExtractionSettings().to_dict()
    t = np.arange(24000) / 16000
    clips, speakers = [], ["a", "b", "c"]
    for k, f0 in enumerate((150.0, 210.0, 120.0)):
        wav = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        _write_wav(tmp_path / f"{k}.wav", wav)
        kept = gain_robustness.decoded(tmp_path / f"{k}.wav", s)
        mel = log_mel(kept, s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])
        clips.append(SimpleNamespace(clip=f"{k}.wav", has_audio=True, arrays={"mel": mel}))
    data = SimpleNamespace(settings=s, clips=clips, speakers=speakers)
    noisy = gain_robustness.Noisy(data, tmp_path, {"a"})
    assert noisy.others == [1, 2]                          # babble is made of speakers outside the test set
    noisy.check(0)
    power = lambda m: np.exp(m.astype(np.float64)) - 1e-6  # noqa: E731
    clean = power(clips[0].arrays["mel"])
    for kind in ("white", "babble"):
        for snr in (20.0, 5.0):
            mixed = noisy.mel(0, kind, snr)
            assert mixed.shape == clean.shape
            np.testing.assert_array_equal(mixed, noisy.mel(0, kind, snr))     # the same noise for every row
            measured = 10 * np.log10(clean.sum() / (power(mixed) - clean).sum())   # cross terms average out
            assert abs(measured - snr) < 1.5, (kind, snr, measured)
    # a room: the same length, the same every call, and the longer its reverberation the more it smears the
    # syllable rhythm (the loudness envelope's modulation depth shrinks)
    short, long_ = noisy.reverberant(0, 0.2), noisy.reverberant(0, 1.0)
    assert short.shape == long_.shape == clean.shape
    np.testing.assert_array_equal(short, noisy.reverberant(0, 0.2))
    depth = lambda m: power(m).sum(0).std() / power(m).sum(0).mean()     # noqa: E731
    assert depth(long_) < depth(short) < depth(clips[0].arrays["mel"])
    # a telephone line takes away this 150 Hz voice (the fundamental it does not carry); 8 kHz audio keeps it
    phone, narrow = noisy.band(0, 300.0, 3400.0), noisy.band(0, 0.0, 4000.0)
    assert phone.shape == narrow.shape == clean.shape
    assert power(phone).sum() < 1e-3 * clean.sum() and abs(power(narrow).sum() / clean.sum() - 1) < 0.01
    clips[0].arrays["mel"] = clips[0].arrays["mel"] + 1.0
    with pytest.raises(SystemExit, match="extracted from"):
        gain_robustness.Noisy(data, tmp_path, {"a"}).check(0)
