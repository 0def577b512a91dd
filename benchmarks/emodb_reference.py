"""Reference points for benchmarks/emodb_loso.py: how far simpler, classic audio features get on the same data.

    python benchmarks/emodb_reference.py CACHE [--wav-dir DIR] [--groups 6]
    python benchmarks/emodb_reference.py CACHE [--wav-dir DIR] --fuse RUN_DIR... [--weights 0,0.35,0.5,1]

Each feature set goes through the same classifier, class-balanced L2 logistic regression on
features z-scored over the training part, under three protocols:

- ``LOSO``: leave one speaker out, as emodb_loso.py (speaker-independent).
- ``LOSO + speaker norm``: the same folds, but every speaker's features are first z-scored
  over that speaker's own clips, the test speaker's included (its labels are not used).
  This is the classic "speaker normalisation" of the SER literature; it is transductive (it
  needs a batch of unlabelled clips from the test speaker), so avemo does not use it.
- ``random groups``: clips dealt at random into K groups whatever the speaker
  (speaker-dependent): what the data allows when speakers are not the problem.

Feature sets: ``log-mel stats`` (per mel bin of the cache's spectrograms: mean, std, 10th
and 90th percentile, std and mean magnitude of the frame-to-frame difference), ``voice stats``
(the voice head's: mean and standard deviation over time of each layer of the shipped, frozen
GE2E speaker encoder, ``avemo.model.voice``), both from the cache alone, and, with ``--wav-dir``
and the ``opensmile`` package installed (research licence, not an avemo dependency), openSMILE's eGeMAPSv02 (88) and ComParE_2016 (6,373)
utterance functionals, the standard hand-crafted baselines of speech emotion recognition, and
eGeMAPS without its loudness and sound-level functionals (77, ``level-free``: as blind to the
recording gain as avemo's model is meant to be).

``--fuse``: late fusion instead. Each RUN_DIR holds speaker-fold runs of one seed (``fold*/`` with
``split.json`` and ``best.pt``, as ``speech_bench.py`` and ``avemo-train --folds`` write them); on
each fold's test clips the model's probabilities are averaged with those of each feature set's
regression fitted on that fold's training clips, ``(1 - w) p_model + w p_features``, for each
weight (0: the model alone, 1: the features alone). Whether the features know something the
model does not, measured; the weight is chosen on the test folds, so the best row is optimistic.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.model.voice import band_map, fit_logistic, voice_stats_batch  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402


def log_mel_stats(mel: np.ndarray) -> np.ndarray:
    """[n_mels, T] -> [6 * n_mels] utterance statistics."""
    d = np.diff(mel, axis=1)
    return np.concatenate([mel.mean(1), mel.std(1), np.percentile(mel, 10, axis=1), np.percentile(mel, 90, axis=1),
                           d.std(1), np.abs(d).mean(1)])


def opensmile_features(wav_dir: Path, clips: list[str]) -> dict[str, np.ndarray]:
    try:
        import opensmile
        import soundfile
    except ImportError:
        print("opensmile is not installed: eGeMAPS / ComParE rows skipped (pip install opensmile)")
        return {}
    signals = []
    for c in clips:                                 # any format soundfile reads (RAVDESS is flac), as mono
        y, sr = soundfile.read(str(wav_dir / c), dtype="float32")
        signals.append((y.mean(1) if y.ndim > 1 else y, sr))
    out = {}
    for name in ("eGeMAPSv02", "ComParE_2016"):
        smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, name),
                                feature_level=opensmile.FeatureLevel.Functionals)
        out[name] = np.nan_to_num(np.stack([smile.process_signal(y, sr).values[0] for y, sr in signals]))
        if name == "eGeMAPSv02":
            level = [("loudness" in n and "Peaks" not in n) or "equivalentSoundLevel" in n for n in smile.feature_names]
            out["eGeMAPS level-free"] = out[name][:, ~np.array(level)]
    return out


def zscore_by_group(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for g in np.unique(groups):
        i = groups == g
        out[i] = (x[i] - x[i].mean(0)) / (x[i].std(0) + 1e-6)
    return out


def logistic_regression(x_train, y_train, x_test, n_classes: int, l2: float) -> np.ndarray:
    """Predicted classes of ``x_test``."""
    return logistic_probabilities(x_train, y_train, x_test, n_classes, l2).argmax(1)


def logistic_probabilities(x_train, y_train, x_test, n_classes: int, l2: float) -> np.ndarray:
    """[len(x_test), n_classes] probabilities of a class-balanced L2 logistic regression on z-scored features
    (the voice head's, ``avemo.model.voice.fit_logistic``)."""
    mu, sd, w, b = fit_logistic(x_train, np.asarray(y_train), n_classes, l2)
    z = (x_test - mu) / sd @ w.T + b
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def folds_uar(x, y, folds: np.ndarray, classes: list[str], l2: float) -> tuple[list[float], float]:
    uars, wars = [], []
    for f in np.unique(folds):
        test = folds == f
        pred = logistic_regression(x[~test], y[~test], x[test], len(classes), l2)
        m = classification_metrics(y[test], pred, classes)
        uars.append(m["uar"])
        wars.append(m["accuracy"])
    return uars, float(np.mean(wars))


def late_fusion(data, sets: dict[str, np.ndarray], usable: list[int], run_dirs: list[Path],
                weights: list[float], l2: float) -> None:
    """Print, per feature set and weight, the UAR of the runs' models averaged with the features' regression."""
    from avemo.model import load_model
    from train.evaluate import model_logits
    row_of = {i: k for k, i in enumerate(usable)}
    folds = []                                           # (seed dir, test indices, train indices, probabilities)
    for run in run_dirs:
        for fold in sorted(run.glob("fold*")):
            split = json.loads((fold / "split.json").read_text())
            test = [i for i in split["test"] if i in row_of]
            train = [i for i in split["train"] + (split.get("val") or []) if i in row_of]
            net, ckpt = load_model(fold / "best.pt", map_location="cpu")
            if list(ckpt["classes"]) != list(data.classes):
                raise SystemExit(f"{fold}: the model's classes {ckpt['classes']} are not the cache's {data.classes}")
            logits = torch.as_tensor(model_logits(net.eval(), data, test, torch.device("cpu")))
            folds.append((run, test, train, torch.softmax(logits.float(), 1).numpy()))
    print(f"late fusion with {len(folds)} fold runs from {len(run_dirs)} run directories "
          "(UAR: mean over folds per directory, then mean +- std over directories)")
    print(f"{'features':<22}" + "".join(f"{'w ' + format(w, 'g'):>16}" for w in weights))
    for name, x in sets.items():
        per_w = {w: {} for w in weights}
        for run, test, train, p_model in folds:
            rows = lambda idx: [row_of[i] for i in idx]
            p_feat = logistic_probabilities(x[rows(train)], data.labels[train], x[rows(test)], len(data.classes), l2)
            for w in weights:
                pred = ((1 - w) * p_model + w * p_feat).argmax(1)
                per_w[w].setdefault(run, []).append(classification_metrics(data.labels[test], pred, data.classes)["uar"])
        cells = []
        for w in weights:
            seeds = [np.mean(u) for u in per_w[w].values()]
            cells.append(f"{np.mean(seeds):.3f} +-{np.std(seeds):.3f}")
        print(f"{name:<22}" + "".join(f"{c:>16}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path, help="avemo cache of the EmoDB clips (avemo-extract --label-from emodb)")
    p.add_argument("--wav-dir", type=Path, help="the wav files the cache was made from (for openSMILE features)")
    p.add_argument("--groups", type=int, default=6, help="groups for the speaker-dependent protocol")
    p.add_argument("--l2", type=float, default=1e-2)
    p.add_argument("--fuse", type=Path, nargs="+", metavar="RUN_DIR",
                   help="late fusion with the speaker-fold runs in each directory (fold*/split.json, best.pt)")
    p.add_argument("--weights", default="0,0.2,0.35,0.5,1", help="--fuse: the features' weights")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_training_data(args.cache)
    usable = [i for i, c in enumerate(data.clips) if c.has_audio and data.speakers[i]]
    y = data.labels[usable]
    speakers = np.array([data.speakers[i] for i in usable])
    groups = np.random.default_rng(0).integers(0, args.groups, len(usable))
    bands = band_map(data.settings)
    sets = {"log-mel stats": np.stack([log_mel_stats(data.clips[i].arrays["mel"]) for i in usable]),
            "voice stats": voice_stats_batch([torch.from_numpy(data.clips[i].arrays["mel"]) for i in usable],
                                             bands).numpy()}
    if args.wav_dir:
        sets |= opensmile_features(args.wav_dir, [data.clips[i].clip for i in usable])
    if args.fuse:
        late_fusion(data, sets, usable, args.fuse, [float(w) for w in args.weights.split(",")], args.l2)
        return
    print(f"{len(usable)} clips, {len(set(speakers))} speakers; class-balanced logistic regression, l2 {args.l2}")
    print(f"{'features':<16}{'dims':>6}  {'protocol':<22}{'UAR per fold':<44}{'UAR':>7}{'WAR':>7}")
    for name, x in sets.items():
        for protocol, feats, folds in (("LOSO", x, speakers),
                                       ("LOSO + speaker norm", zscore_by_group(x, speakers), speakers),
                                       (f"random groups ({args.groups})", x, groups)):
            uars, war = folds_uar(feats, y, folds, data.classes, args.l2)
            print(f"{name:<16}{x.shape[1]:>6}  {protocol:<22}{' '.join(f'{u:.3f}' for u in uars):<44}"
                  f"{np.mean(uars):>7.3f}{war:>7.3f}")


if __name__ == "__main__":
    main()
