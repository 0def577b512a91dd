"""Peak memory of long recordings: avemo-extract and avemo-predict against whole-signal baselines.

    python benchmarks/bench_memory.py [--minutes 1,10,60] [--out bench-out/memory] [--no-predict]

For each length, a speech-like WAV (16 kHz mono: a tone switched on and off) is written
once, then each contender runs in its own process and its peak resident memory is read
from the kernel (``wait4``):

- ``avemo-extract``: the real command on a folder holding that one file.
- ``baseline``: what research code usually does, the whole signal at once: librosa.load,
  librosa.effects.trim, then one torchaudio MelSpectrogram over everything.

Both hold the result, the log-mel spectrogram (92 MB an hour at 64 bins and a 10 ms hop),
and avemo also the decoded waveform (230 MB an hour); anything above that is overhead.

A second table runs ``avemo-predict`` with the shipped model on the same file:

- ``avemo-predict``: the real command (the audio FCN evaluates a long spectrogram in chunks).
- ``one pass``: the same command with the FCN's evaluation budget lifted, so the whole
  spectrogram goes through it at once, as it did before the chunks (and as most research
  code does).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

BASELINE = """
import sys, librosa, torch, torchaudio
wav, sr = librosa.load(sys.argv[1], sr=16000)
wav, _ = librosa.effects.trim(wav, top_db=40)
mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=64, f_min=20.0)
with torch.no_grad():
    out = torch.log(mel(torch.from_numpy(wav)) + 1e-6)
print(tuple(out.shape))
"""


ONE_PASS = """
import sys
from avemo.model.audio import FCNAudioStream
FCNAudioStream.eval_frames = 1 << 62
from avemo.predict_cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_long_wav(path: Path, minutes: float, sr: int = 16000) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        for start in range(0, int(minutes * 60), 60):          # a minute at a time
            t = np.arange(start * sr, min(start + 60, minutes * 60) * sr) / sr
            x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
            w.writeframes((x * 32767).astype(np.int16).tobytes())
    tmp.rename(path)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode(errors='replace')}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", default="1,10,60", help="comma-separated recording lengths")
    p.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    p.add_argument("--no-predict", action="store_true", help="only the extraction table")
    args = p.parse_args()
    exe = shutil.which("avemo-extract") or str(Path(sys.executable).parent / "avemo-extract")
    predict = shutil.which("avemo-predict") or str(Path(sys.executable).parent / "avemo-predict")
    rows, predict_rows = [], []
    for minutes in (float(m) for m in args.minutes.split(",")):
        folder = args.out / f"{minutes:g}min"
        write_long_wav(folder / "recording.wav", minutes)
        cache = args.out / f"cache-{minutes:g}min"
        shutil.rmtree(cache, ignore_errors=True)
        ours = peak_rss([exe, str(folder), "--out", str(cache), "--quiet"])
        base = peak_rss([sys.executable, "-c", BASELINE, str(folder / "recording.wav")])
        rows.append((minutes, ours, base))
        if not args.no_predict:
            wav = str(folder / "recording.wav")
            predict_rows.append((minutes, peak_rss([predict, wav]),
                                 peak_rss([sys.executable, "-c", ONE_PASS, wav])))
        print(f"{minutes:g} min done", file=sys.stderr)
    print_table(rows, "avemo-extract", "baseline")
    if predict_rows:
        print()
        print_table(predict_rows, "avemo-predict", "one pass")


def print_table(rows: list, ours: str, base: str) -> None:
    print(f"{'recording':>10}  {ours + ' MB':>17}{'s':>7}  {base + ' MB':>12}{'s':>7}  {'memory vs ' + base:>19}")
    for minutes, (om, os_), (bm, bs) in rows:
        print(f"{minutes:>7g} min  {om:>17.0f}{os_:>7.1f}  {bm:>12.0f}{bs:>7.1f}  {om / bm:>18.2f}x")
    if len(rows) > 1:
        (m0, (o0, _), (b0, _)), (m1, (o1, _), (b1, _)) = rows[0], rows[-1]
        per_hour = 60 / (m1 - m0)
        print(f"growth per hour of audio: {ours} {(o1 - o0) * per_hour:.0f} MB, {base} {(b1 - b0) * per_hour:.0f} MB")


if __name__ == "__main__":
    main()
