"""The voice head (avemo.model.voice) on finished speaker-fold runs: what it adds to their FCNs.

    python benchmarks/voice_head.py CACHE RUN_DIR [RUN_DIR ...] [--weights 0,0.35,0.5,0.65] [--adapt]
                                    [--layers 2,3]

Each RUN_DIR holds the fold runs of one seed (``fold*/`` with ``split.json`` and ``best.pt``, as
``speech_bench.py`` and ``avemo-train --folds`` write them), trained with or without a voice head.
The head takes no part in training the FCN (it is fitted after it, on the same training clips), so
fitting it to a finished run's FCN, as ``avemo-train`` does at the end of a run, gives the model a
fresh run would: for each fold this fits it on the fold's training and validation clips
(``train.loop.fit_voice_head``) and scores it on
the fold's test speakers as ``avemo-evaluate`` does (``train.evaluate.model_logits``) at each weight;
with ``--adapt``, also adapted to each test speaker relative to the cache (``avemo-evaluate --adapt
speaker``). Weight 0 is the FCN alone; ``--layers`` picks the encoder layers the head reads and
``--voice-noise`` and ``--voice-band`` the noisy and band-limited copies of each training clip it also learns from (defaults: avemo-train's). The fitted model is kept as ``fold*/voice.pt``.
Prints UAR and WAR per weight: mean over folds per RUN_DIR, then mean +- std over RUN_DIRs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.model import AVEmoNet, ModelConfig, load_model, save_model  # noqa: E402
from train.augment import AugmentConfig  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.evaluate import cache_population, model_logits  # noqa: E402
from train.loop import fit_voice_head  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402

DEFAULT_WEIGHT = ModelConfig.voice_head


def with_voice_head(run: Path, data, layers: tuple[int, ...] = ModelConfig.voice_layers,
                    noise_copies: int = AugmentConfig.voice_noise, band_copies: int = AugmentConfig.voice_band) -> AVEmoNet:
    """``run``/best.pt with a voice head fitted on its split's training and validation clips, as avemo-train
    fits it at the end of a run (written to ``run``/voice.pt, so avemo-evaluate can score it too)."""
    net, ckpt = load_model(run / "best.pt")
    if net.cfg.modalities != "audio":
        raise SystemExit(f"{run}: the voice head is for audio-only models; this one reads {net.cfg.modalities}")
    model = AVEmoNet(type(net.cfg).from_dict(net.cfg.to_dict() | {"voice_head": DEFAULT_WEIGHT,
                                                                   "voice_layers": layers}))
    model.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("voice.")}, strict=False)
    split = json.loads((run / "split.json").read_text())
    fit_voice_head(model, data, split["train"] + (split.get("val") or []), noise_copies, band_copies)
    save_model(run / "voice.pt", model, data.classes, data.settings, ckpt.get("metrics"),
               {k: ckpt.get(k) for k in ("split", "train_config", "audio_init")})
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--weights", default="0,0.35,0.5,0.65", help="the voice head's weights (0: the FCN alone)")
    p.add_argument("--adapt", action="store_true", help="also score each model adapted to each test speaker")
    p.add_argument("--layers", default=",".join(map(str, ModelConfig.voice_layers)),
                   help="the speaker encoder's layers the head reads")
    p.add_argument("--voice-noise", type=int, default=AugmentConfig.voice_noise,
                   help="noisy copies of each training clip the head also learns from (avemo-train's --voice-noise)")
    p.add_argument("--voice-band", type=int, default=AugmentConfig.voice_band,
                   help="band-limited copies of each training clip the head also learns from (avemo-train's --voice-band)")
    args = p.parse_args()
    torch.set_num_threads(1)
    weights = [float(w) for w in args.weights.split(",")]
    data = load_training_data(args.cache)
    modes = (False, True) if args.adapt else (False,)
    rows = {(w, a): {} for a in modes for w in weights}
    device = torch.device("cpu")
    for seed_dir in args.runs:
        for run in sorted(seed_dir.glob("fold*")):
            t0 = time.perf_counter()
            model = with_voice_head(run, data, tuple(int(k) for k in args.layers.split(",")), args.voice_noise,
                                    args.voice_band)
            split = json.loads((run / "split.json").read_text())
            test = [i for i in split["test"] if data.clips[i].has_audio]
            population = cache_population(model, data) if args.adapt else None
            for adapt in modes:
                for w in weights:
                    model.voice.weight = w
                    groups = [data.speakers[i] for i in test] if adapt else None
                    logits = model_logits(model, data, test, device, groups=groups, population=population)
                    m = classification_metrics(data.labels[test], logits.argmax(1), data.classes)
                    rows[(w, adapt)].setdefault(seed_dir, []).append((m["uar"], m["accuracy"]))
                    print(f"{run} weight {w:g}{' adapted' if adapt else ''}: UAR {m['uar']:.3f} "
                          f"WAR {m['accuracy']:.3f}", flush=True)
            print(f"{run}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\n{'voice head weight':<26}{'UAR':>16}{'WAR':>16}  UAR per run dir")
    for (w, adapt), per in rows.items():
        u = [np.mean([x[0] for x in v]) for v in per.values()]
        a = [np.mean([x[1] for x in v]) for v in per.values()]
        label = f"{w:g}{' (FCN alone)' if w == 0 else ''}{', adapted' if adapt else ''}"
        print(f"{label:<26}{np.mean(u):>9.3f} +-{np.std(u):.3f}{np.mean(a):>9.3f} +-{np.std(a):.3f}  "
              + " ".join(f"{x:.3f}" for x in u))


if __name__ == "__main__":
    main()
