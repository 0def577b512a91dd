"""avemo.audio.trim_silence follows librosa.effects.trim's rule exactly (it replaces it for speed)."""
import librosa
import numpy as np
import pytest

from avemo.audio import trim_silence


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
