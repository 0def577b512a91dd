"""How much does a model lose when the same speech is recorded louder or quieter, or in noise? Prints a table.

    python benchmarks/gain_robustness.py CACHE [NAME=]RUN[,RUN...] [[NAME=]RUN...] [--db -20,-10,-6,0,6,10]
    python benchmarks/gain_robustness.py CACHE default --frontend --speakers 08,12
    python benchmarks/gain_robustness.py CACHE RUN... --db "" --snr 20,10,5 --noise white,babble --wav-dir DIR
    python benchmarks/gain_robustness.py CACHE RUN... --db "" --reverb 0.3,0.6,1.0 --wav-dir DIR
    python benchmarks/gain_robustness.py CACHE RUN... --db "" --band 300-3400,0-4000 --wav-dir DIR

Each argument after CACHE is one row: finished avemo-train runs (a directory with best.pt and
split.json, scored on its test speakers; a directory holding such runs, e.g. a
``benchmarks/speech_bench.py`` output, stands for all of them) or model files, comma-separated,
optionally named ``NAME=``. With ``--frontend`` the files are audio front-ends
(``avemo-train-audio``'s, or ``default``). ``--speakers`` scores those speakers instead of each
run's test speakers (needed for files).

A recording gain g multiplies every mel power by g^2. The cache's spectrograms are
``log(power + 1e-6)`` (``avemo.audio.log_mel``), so each test clip is replayed at every gain
exactly, the silence floor included (``avemo.audio.at_gain``). UAR per run on the
classes it shares with the cache, then the mean over the row's runs; "worst" is the lowest UAR
over the conditions and the drop is from the clips as cached (0 dB).

Noise (``--snr``, with ``--wav-dir``: the folder the cache was extracted from) is added to the
waveform, so each test clip is decoded and trimmed again as avemo-extract does, mixed with noise
at each signal-to-noise ratio (the trimmed speech's mean power over the noise's), and turned into a
log-mel again. ``white``: Gaussian; ``babble``: six clips of speakers outside the test set, each
at one level, summed (a room of other talkers). The noise of a clip is the same for every row
(seeded by the clip). ``--reverb``: each clip convolved with a synthetic room impulse response of
that reverberation time (RT60, seconds: a direct path and a Gaussian tail decaying by 60 dB over
it, the classic statistical model of a room's late reverberation, the tail as strong as the direct
sound: ``DRR_DB``). ``--band LO-HI``: everything outside that band of the waveform taken out (a
brick wall in the Fourier domain): 300-3400 Hz is a telephone line, 0-4000 Hz audio recorded at
8 kHz (a phone's voice recorder, VoIP). A cache extracted from other files than ``--wav-dir``'s,
or by an older avemo whose spectrograms differ, is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.audio import at_gain, load_audio, log_mel, trim_silence  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.evaluate import load_scorer, model_logits, shared_class_metrics  # noqa: E402


def expand(spec: str) -> tuple[str, list[Path]]:
    """``[NAME=]PATH[,PATH...]`` -> (name, runs or files); a directory of runs stands for every run in it."""
    name, _, paths = spec.rpartition("=")
    out = []
    for p in map(Path, paths.split(",")):
        if p.is_dir() and not (p / "best.pt").is_file():
            out += sorted(d.parent for d in p.rglob("best.pt") if (d.parent / "split.json").is_file())
        else:
            out.append(p)
    return name or paths, out


BABBLE_TALKERS = 6
DRR_DB = 0.0            # --reverb: direct-to-reverberant energy ratio (a talker about a metre from the microphone)


def decoded(path: Path, s: dict) -> np.ndarray:
    """A clip's speech as avemo-extract keeps it (decoded at the cache's rate, silence trimmed)."""
    wav = load_audio(path, s["sample_rate"])
    if s.get("trim_silence"):
        trimmed = trim_silence(wav, s["trim_top_db"])
        wav = trimmed if len(trimmed) >= s["n_fft"] else wav
    return wav


class Noisy:
    """Test clips' log-mels with noise mixed into their waveforms (see the module's docstring)."""

    def __init__(self, data, wav_dir: Path, test: set[str]):
        self.data, self.dir, self.s = data, wav_dir, data.settings
        self.others = [i for i, c in enumerate(data.clips) if c.has_audio and str(data.speakers[i]) not in test]
        self.wavs: dict[int, np.ndarray] = {}

    def wav(self, i: int) -> np.ndarray:
        if i not in self.wavs:
            self.wavs[i] = decoded(self.dir / self.data.clips[i].clip, self.s)
        return self.wavs[i]

    def check(self, i: int) -> None:
        s = self.s
        again = log_mel(self.wav(i), s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])
        cached = self.data.clips[i].arrays["mel"]
        if again.shape != cached.shape or float(np.abs(again - cached).max()) > 1e-2:
            sys.exit(f"{self.dir / self.data.clips[i].clip} does not give the cache's spectrogram of that clip: "
                     "--wav-dir must be the folder the cache was extracted from, by this version of avemo")

    def reverberant(self, i: int, rt60: float) -> np.ndarray:
        s, wav = self.s, self.wav(i)
        rng = np.random.default_rng(i)
        t = np.arange(int(rt60 * s["sample_rate"])) / s["sample_rate"]
        rir = rng.standard_normal(len(t)) * np.exp(-np.log(1000.0) * t / rt60)
        rir *= 10 ** (-DRR_DB / 20) / np.sqrt(np.sum(rir ** 2))
        rir[0] = 1.0                                                          # the direct path
        n = len(wav) + len(rir) - 1
        wet = np.fft.irfft(np.fft.rfft(wav, n) * np.fft.rfft(rir, n), n)[:len(wav)].astype(np.float32)
        return log_mel(wet, s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])

    def band(self, i: int, lo: float, hi: float) -> np.ndarray:
        s, wav = self.s, self.wav(i)
        spectrum = np.fft.rfft(wav)
        freqs = np.fft.rfftfreq(len(wav), 1.0 / s["sample_rate"])
        spectrum[(freqs < lo) | (freqs > hi)] = 0.0
        passed = np.fft.irfft(spectrum, len(wav)).astype(np.float32)
        return log_mel(passed, s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])

    def mel(self, i: int, kind: str, snr_db: float) -> np.ndarray:
        s, wav = self.s, self.wav(i)
        rng = np.random.default_rng(i)
        if kind == "white":
            noise = rng.standard_normal(len(wav))
        else:
            noise = np.zeros(len(wav))
            if not self.others:
                sys.exit("babble needs clips of speakers outside the test set")
            for j in rng.choice(self.others, min(BABBLE_TALKERS, len(self.others)), replace=False):
                talker = np.resize(self.wav(int(j)), len(wav))
                noise += talker / max(float(np.sqrt(np.mean(talker ** 2))), 1e-8)
        gain = np.sqrt(np.mean(wav ** 2) / max(float(np.mean(noise ** 2)), 1e-12) / 10 ** (snr_db / 10))
        mixed = (wav + gain * noise).astype(np.float32)
        return log_mel(mixed, s["sample_rate"], s["n_fft"], s["hop_length"], s["n_mels"], s["f_min"], s["f_max"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("rows", nargs="+", help="[NAME=]RUN[,RUN...]: one row each")
    p.add_argument("--db", default="-20,-10,-6,0,6,10", help="comma-separated gains in decibels")
    p.add_argument("--snr", default="", help="comma-separated signal-to-noise ratios in decibels (needs --wav-dir)")
    p.add_argument("--noise", default="white,babble", help="noises for --snr: white, babble")
    p.add_argument("--reverb", default="", help="comma-separated reverberation times in seconds (needs --wav-dir)")
    p.add_argument("--band", default="", help="comma-separated pass bands LO-HI in Hz, e.g. 300-3400 (needs --wav-dir)")
    p.add_argument("--wav-dir", type=Path, help="the folder the cache was extracted from (for --snr, --reverb, --band)")
    p.add_argument("--frontend", action="store_true", help="the files are audio front-ends")
    p.add_argument("--speakers", help="comma-separated speakers to score (default: each run's test speakers)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dbs = [float(d) for d in args.db.split(",") if d]
    if 0.0 not in dbs:
        dbs.insert(0, 0.0)
    # a condition: its column's name and how it makes a test clip's log-mel from the cached one
    conditions = [(f"{d:+g} dB", (lambda d: lambda i, mel: at_gain(torch.from_numpy(mel), d).numpy() if d else mel)(d))
                  for d in dbs]
    noises = [n for n in args.noise.split(",") if n] if args.snr else []
    rt60s = [float(r) for r in args.reverb.split(",") if r]
    try:
        bands = [tuple(float(f) for f in b.split("-")) for b in args.band.split(",") if b]
    except ValueError:
        sys.exit(f"--band: {args.band!r} is not LO-HI[,LO-HI...] in Hz")
    if any(len(b) != 2 or not 0 <= b[0] < b[1] for b in bands):
        sys.exit(f"--band: {args.band!r} is not LO-HI[,LO-HI...] in Hz with LO < HI")
    if (noises or rt60s or bands) and not args.wav_dir:
        sys.exit("--snr, --reverb and --band need --wav-dir: they change the waveforms the cache was extracted from")
    if set(noises) - {"white", "babble"}:
        sys.exit(f"--noise: unknown {sorted(set(noises) - {'white', 'babble'})} (white, babble)")
    data = load_training_data(args.cache)
    original = {i: c.arrays["mel"] for i, c in enumerate(data.clips) if c.has_audio}
    speakers = args.speakers.split(",") if args.speakers else None
    table = []
    for spec in args.rows:
        name, runs = expand(spec)
        if not runs:
            sys.exit(f"{spec}: no finished run (best.pt with split.json) found")
        uar: dict[str, list[float]] = {}
        for run in runs:
            if run.is_dir():
                scorer = load_scorer(str(run / "best.pt"))
                test = speakers or json.loads((run / "split.json").read_text())["speakers"]["test"]
            else:
                if speakers is None:
                    sys.exit(f"{run} is a file: name the speakers to score with --speakers")
                scorer = load_scorer(None, str(run)) if args.frontend else load_scorer(str(run))
                test = speakers
            test = {str(s) for s in test}
            idx = [i for i in original if str(data.speakers[i]) in test]
            if not idx:
                sys.exit(f"{run}: none of the speakers {sorted(test)} has a clip with audio in {args.cache}")
            noisy = Noisy(data, args.wav_dir, test) if noises or rt60s or bands else None
            if noisy:
                noisy.check(idx[0])
            for label, make in conditions + [(f"{n} {snr:g}", (lambda n, snr: lambda i, mel: noisy.mel(i, n, snr))(n, snr))
                                             for n in noises for snr in map(float, args.snr.split(","))] + [
                    (f"reverb {r:g}s", (lambda r: lambda i, mel: noisy.reverberant(i, r))(r)) for r in rt60s] + [
                    (f"{lo:g}-{hi:g} Hz", (lambda lo, hi: lambda i, mel: noisy.band(i, lo, hi))(lo, hi)) for lo, hi in bands]:
                for i in idx:
                    data.clips[i].arrays["mel"] = make(i, original[i])
                logits = model_logits(scorer.network, data, idx, torch.device("cpu"))
                uar.setdefault(label, []).append(shared_class_metrics(logits, scorer.classes, data, idx)[0]["uar"])
            for i in idx:
                data.clips[i].arrays["mel"] = original[i]
            print(f"{name}: {run}: " + " ".join(f"{c} {v[-1]:.3f}" for c, v in uar.items()), flush=True)
        means = {c: float(np.mean(v)) for c, v in uar.items()}
        table.append((name, len(runs), means))
    width = max(len(r[0]) for r in table) + 2
    columns = list(table[0][2])
    cell = max(9, max(len(c) for c in columns) + 2)
    print(f"\n{'':<{width}}{'runs':>5}" + "".join(f"{c:>{cell}}" for c in columns) + f"{'worst (drop)':>18}")
    for name, n, means in table:
        worst = min(means.values())
        print(f"{name:<{width}}{n:>5}" + "".join(f"{means[c]:>{cell}.3f}" for c in columns)
              + f"{worst:>9.3f} ({worst - means['+0 dB']:+.3f})")
    print("(UAR on each run's test speakers, the same clips replayed louder or quieter, or with noise at a "
          "signal-to-noise ratio in dB; mean over the row's runs)")


if __name__ == "__main__":
    main()
