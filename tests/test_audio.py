"""avemo.audio: trim_silence follows librosa.effects.trim's rule exactly (it replaces it for speed),
and the chunked log-mel equals the whole-signal one."""
import librosa
import numpy as np
import pytest
import torch
import torchaudio

from avemo.audio import LOG_EPS, _Mixdown, _SampleBuffer, log_mel, trim_silence


@pytest.mark.parametrize("seed", range(40))
def test_trim_matches_librosa(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(100, 50000))
    wav = (rng.standard_normal(n) * rng.uniform(0.001, 1)).astype(np.float32)
    a, b = sorted(rng.integers(0, n, 2))
    wav[:a] *= rng.uniform(0, 0.01)     # quiet lead-in and tail of random length and level
    wav[b:] *= rng.uniform(0, 0.01)
    top_db = float(rng.uniform(10, 60))
    expected, _ = librosa.effects.trim(wav, top_db=top_db)
    np.testing.assert_array_equal(trim_silence(wav, top_db), expected)


def test_trim_edge_cases():
    assert len(trim_silence(np.zeros(0, np.float32), 40)) == 0
    zeros = np.zeros(1000, np.float32)   # no frame louder than another: librosa keeps it all, so do we
    np.testing.assert_array_equal(trim_silence(zeros, 40), librosa.effects.trim(zeros, top_db=40)[0])
    tone = np.sin(np.linspace(0, 200, 8000)).astype(np.float32)
    padded = np.concatenate([np.zeros(16000, np.float32), tone, np.zeros(16000, np.float32)])
    out = trim_silence(padded, 40)
    assert 8000 <= len(out) < 8000 + 2 * 2048


@pytest.mark.parametrize("frame_length,hop_length", [(2048, 512), (2048, 300), (400, 160)])
def test_trim_matches_librosa_for_other_framings(frame_length, hop_length):
    rng = np.random.default_rng(frame_length + hop_length)
    for _ in range(10):
        n = int(rng.integers(50, 30000))
        wav = (rng.standard_normal(n) * rng.uniform(0.001, 1)).astype(np.float32)
        wav[: n // 3] *= 0.001
        expected, _ = librosa.effects.trim(wav, top_db=30, frame_length=frame_length, hop_length=hop_length)
        np.testing.assert_array_equal(trim_silence(wav, 30, frame_length, hop_length), expected)


@pytest.mark.parametrize("n", [400, 401, 1600, 16000, 16159, 16160, 50001])
def test_chunked_log_mel_equals_the_whole_signal_stft(n):
    rng = np.random.default_rng(n)
    wav = rng.standard_normal(n).astype(np.float32) * 0.1
    whole = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=64,
                                                 f_min=20.0, power=2.0, center=True, pad_mode="reflect")
    with torch.no_grad():
        expected = torch.log(whole(torch.from_numpy(wav)) + LOG_EPS).numpy()
    for chunk in (1, 7, 6000):       # 1 and 7 are raised to the smallest chunk the reflection allows
        got = log_mel(wav, 16000, 400, 160, 64, 20.0, None, chunk_frames=chunk)
        assert got.shape == expected.shape == (64, 1 + n // 160)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("expected", [0, 10, 100_000, 10**12])
def test_sample_buffer_holds_exactly_what_was_decoded_whatever_the_header_said(expected):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32) for _ in range(200)]
    buf = _SampleBuffer(expected)
    for p in parts:
        buf.add(p)
    np.testing.assert_array_equal(buf.array(), np.concatenate(parts))
    assert len(buf.buf) <= max(_SampleBuffer.MAX_INITIAL, 2 * sum(map(len, parts)))


@pytest.mark.parametrize("right, inverted", [(-1.0, True), (-0.5, True), (1.0, False), (0.5, False), (None, False)])
def test_mixdown_decides_once_on_the_first_seconds_and_keeps_to_it(right, inverted):
    # 100 samples a second: the decision falls after 3,000 samples, inside the 10,000 fed
    rng = np.random.default_rng(1)
    left = rng.standard_normal(10_000).astype(np.float32)
    other = rng.standard_normal(10_000).astype(np.float32) if right is None else right * left
    mix = _Mixdown(expected=10_000, sample_rate=100)
    cuts = np.cumsum(rng.integers(1, 700, 40))
    for part in np.split(np.stack([left, other]), cuts[cuts < 10_000], axis=1):
        mix.add(part)
    got = mix.array()
    expected = 0.5 * (left - other) if inverted else 0.5 * (left + other)
    assert mix.inverted is inverted and mix.diff is None
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_mixdown_of_a_layout_that_changes_from_stereo_to_mono_keeps_every_sample():
    left = np.linspace(-1, 1, 500, dtype=np.float32)
    mix = _Mixdown(expected=100, sample_rate=100)
    mix.add(np.stack([left, -left]))
    mix.add(left[None, :200])
    assert mix.inverted
    np.testing.assert_allclose(mix.array(), np.concatenate([left, left[:200]]), atol=1e-6)


def test_every_window_of_a_file_hears_the_track_the_whole_file_would(tmp_path):
    from avemo.audio import is_silent, load_audio
    from mediagen import tone, write_tracks
    rate = 16000
    gated = tone(3.0, rate, freq=220.0)
    gated[:, rate:] = 0.0                               # a noise gate: sound in the first second only
    desktop = tone(3.0, rate, freq=880.0)
    unplugged = np.zeros_like(desktop)
    write_tracks(tmp_path / "gated.mka", [gated, desktop], rate)
    write_tracks(tmp_path / "unplugged.mka", [unplugged, desktop], rate)

    def pitch(wav):
        return np.argmax(np.abs(np.fft.rfft(wav))) * rate / len(wav)

    notes: list[str] = []
    assert pitch(load_audio(tmp_path / "gated.mka", rate, 0.0, 1.0, notes)) == pytest.approx(220, abs=5)
    assert is_silent(load_audio(tmp_path / "gated.mka", rate, 2.0, 3.0, notes)) and not notes   # the gate's pause
    for span in ((None, None), (0.0, 1.0), (2.0, 3.0)):
        notes = []
        assert pitch(load_audio(tmp_path / "unplugged.mka", rate, *span, notes)) == pytest.approx(880, abs=5)
        assert notes == ["track 1 is silent: used track 2 of 2"]
