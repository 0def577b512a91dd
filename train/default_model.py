"""``python -m train.default_model``: build, calibrate and measure the audio-visual model shipped as ``default``.

There is no audio-visual training set here, only speech corpora (RAVDESS, EmoDB, CREMA-D
samples) and a face-image corpus (FER2013). So the shipped model is two experts trained
apart and fused late (``fusion="product"``, see ``avemo.model.fusion.ProductOfExperts``):

- voice: the shipped audio front-end (``avemo/model/weights/audio_default.pt``), its head
  restricted to the seven basic emotions, its probabilities averaged with the voice head's
  (``avemo.model.voice``: the frozen speaker encoder's statistics and a regression fitted on
  the front-end's clips of the seven classes), as in every avemo-train speech model;
- face: the shipped face encoder's own classifier applied to every sampled frame, the logits
  averaged over the frames with a face (``video_stream="mean"``);
- each expert's logits are corrected for the class prior it was trained under (logit
  adjustment: subtract log prior) and divided by a temperature fitted on data it did not
  train on (temperature scaling, Guo et al. 2017), so that multiplying the two posteriors
  is the Bayes combination of two calibrated, independent witnesses. The voice head's
  regression (class-balanced: no prior to correct) gets its own temperature before the two
  voice probabilities are averaged.

Everything is measured on data the measured weights never saw: a twin of the speech
expert trained by the same recipe without ``--holdout-speakers`` gives the speech figures
and the audio temperature; FER2013's validation split gives the face temperature and its
test split the face figures; pseudo audio-visual pairs (a held-out utterance and a FER2013
test face of the same emotion) and the real CREMA-D clips give the fused figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import avemo
from avemo.checkpoint import CheckpointError
from avemo.encoders import FaceEncoder, load_encoder
from avemo.extraction import with_encoder_identity
from avemo.features import ExtractionSettings
from avemo.model import AVEmoNet, ModelConfig, load_model, save_model
from avemo.model.frontend import AUDIO_ARCH_FIELDS, AudioFrontend, load_frontend
from avemo.model.voice import VoiceHead
from train.audio.cli import load_corpora
from train.augment import AugmentConfig, voice_copies
from train.cli import _setup_logging
from train.data import CacheError, TrainingData, load_training_data
from train.face.data import read_image_folder, find_split
from train.loop import FeatureStore, TrainConfig, TrainError, fit, predict_outputs
from train.metrics import classification_metrics
from train.splits import SplitError, explicit_split

log = logging.getLogger("avemo.train")
VOICE_ENCODER = ("GE2E speaker encoder (Wan et al. 2018) in Resemblyzer 0.1.4's weights, Apache-2.0, frozen: "
                 "avemo/model/weights/voice_ge2e.npz")
BASIC = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
LICENCE = ("Research use only, non-commercial. The voice expert is the audio front-end trained on RAVDESS speech "
           "(Livingstone & Russo 2018, CC BY-NC-SA 4.0: non-commercial, share-alike), Berlin EmoDB (Burkhardt et al. "
           "2005, free for research use) and 12 CREMA-D clips (Cao et al. 2014, ODbL 1.0 / DbCL 1.0); the face "
           "expert is the face encoder trained on FER2013 (Goodfellow et al. 2013, released for research). The "
           "weights carry the most restrictive of these conditions. The voice expert's voice head reads a frozen "
           "GE2E speaker encoder (Resemblyzer 0.1.4's weights, Apache-2.0, shipped as "
           "avemo/model/weights/voice_ge2e.npz with its licence).")
CLASS_NOTE = ("Seven classes: angry, disgust, fear, happy, neutral, sad, surprise. The voice expert also learned "
              "RAVDESS's calm and EmoDB's boredom as classes of their own; here its answer is conditioned on the "
              "seven (those two logits are left out), so a calm or bored voice goes to the nearest of the seven, "
              "mostly neutral or sad.")
FUSION_NOTE = ("Late fusion by a product of calibrated experts: p(y | voice, face) is proportional to "
               "p(y | voice) p(y | face) / p(y) with a uniform p(y), each expert's logits corrected for its "
               "training prior and tempered on held-out data. A clip with only one modality is decided by that "
               "one. Chosen because no audio-visual pairs exist to train a joint fusion on: a product needs none, "
               "and is exact if voice and face are independent given the emotion. To fuse on real pairs, train "
               "your own model with avemo-train.")


# ---- calibration (pure functions of logits and labels) ----

def log_prior(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """log of the class frequencies a classifier was trained under (add-one smoothed)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (temperature scaling, Guo et al. 2017)."""
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibrated(logits: np.ndarray, prior: np.ndarray | None, temperature: float) -> np.ndarray:
    """log-probabilities of (logits - log prior) / T."""
    z = (logits - (prior if prior is not None else 0.0)) / temperature
    return torch.log_softmax(torch.as_tensor(z, dtype=torch.float64), -1).numpy()


def nll(logp: np.ndarray, labels: np.ndarray) -> float:
    return float(-logp[np.arange(len(labels)), labels].mean())


def scores(labels: np.ndarray, logp: np.ndarray) -> dict[str, Any]:
    m = classification_metrics(labels, logp.argmax(1), list(BASIC))
    return {"n": int(m["n"]), "uar": round(float(m["uar"]), 4), "war": round(float(m["accuracy"]), 4),
            "nll": round(nll(logp, labels), 4),
            "per_class_recall": {k: round(float(v), 4) for k, v in m["per_class_recall"].items()}}


def mean_std(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: {"mean": round(float(np.mean([r[k] for r in runs])), 4),
                "std": round(float(np.std([r[k] for r in runs])), 4)} for k in ("uar", "war")}


# ---- the two experts ----

@dataclasses.dataclass
class Expert:
    """One modality's classifier over the seven classes: a linear head and its calibration."""

    weight: torch.Tensor          # [7, D]
    bias: torch.Tensor            # [7]
    prior: np.ndarray | None      # log prior subtracted from the logits (None: no correction)
    temperature: float

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated head: ((W x + b) - log prior) / T as one linear layer."""
        shift = torch.as_tensor(self.prior if self.prior is not None else np.zeros(len(BASIC)), dtype=torch.float32)
        return self.weight / self.temperature, (self.bias - shift) / self.temperature


def basic_rows(classes: list[str]) -> list[int]:
    missing = [c for c in BASIC if c not in classes]
    if missing:
        raise ValueError(f"a classifier without the classes {', '.join(missing)} cannot be an expert here")
    return [classes.index(c) for c in BASIC]


def assemble(audio_state: dict[str, torch.Tensor], audio_cfg: ModelConfig, audio_classes: list[str],
             voice: Expert, face: Expert, feature_dim: int, voice_head: VoiceHead | None) -> AVEmoNet:
    """The late-fusion model: the audio stream of ``audio_state``, the two calibrated heads and the
    voice expert's fitted voice head (None: the FCN alone)."""
    cfg = ModelConfig(n_classes=len(BASIC), modalities="av", video_dim=feature_dim, video_stream="mean",
                      fusion="product", dropout=audio_cfg.dropout,
                      voice_head=voice_head.weight if voice_head is not None else 0.0,
                      voice_layers=voice_head.layers if voice_head is not None else ModelConfig.voice_layers,
                      **{k: getattr(audio_cfg, k) for k in AUDIO_ARCH_FIELDS})
    net = AVEmoNet(cfg)
    if voice_head is not None:
        net.voice.load_state_dict(voice_head.state_dict())
    net.audio.load_state_dict({k[len("audio."):]: v for k, v in audio_state.items() if k.startswith("audio.")})
    net.set_normalisation({k: audio_state[k] for k in ("mel_mean", "mel_std")})
    with torch.no_grad():
        for layer, expert in ((net.fusion.audio_head, voice), (net.fusion.video_head, face)):
            w, b = expert.head()
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return net.eval()


def audio_logits(model: AVEmoNet, data: TrainingData, indices: list[int], rows: list[int]) -> np.ndarray:
    """The seven basic classes' logits of an audio(-only) model for the clips ``indices``."""
    store = FeatureStore(data, indices, 0, torch.device("cpu"), on_device=False)
    return predict_outputs(model, store, 64, amp=False)["logits"][:, rows]


def face_logits(encoder: FaceEncoder, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits over the seven classes, labels) of the encoder on one split of a class-folder image set."""
    images = read_image_folder(find_split(data_dir, split), encoder.input_size, encoder.grayscale, list(BASIC))
    logits = encoder.logits(images.pixels.permute(0, 2, 3, 1).contiguous()).numpy()
    return logits[:, basic_rows(encoder.classes)], images.labels.numpy()


def voice_heads(data: TrainingData, parts: list[tuple[list[int], np.ndarray]], weight: float,
                noise_copies: int = AugmentConfig.voice_noise,
                band_copies: int = AugmentConfig.voice_band) -> list[VoiceHead]:
    """The voice expert's voice head over the seven classes, fitted on each part's clips (labels in BASIC's
    order) as ``train.loop.fit_voice_head`` fits an avemo-train model's (noisy and band-limited copies
    included); each clip's statistics taken once."""
    heads = [VoiceHead(int(data.settings["n_mels"]), len(BASIC), weight, ModelConfig.voice_layers) for _ in parts]
    for head in heads:
        head.read_settings(data.settings)
    clips = sorted({i for indices, _ in parts for i in indices})
    row = {i: k for k, i in enumerate(clips)}
    mels, speakers = [data.clips[i].arrays["mel"] for i in clips], [data.speakers[i] for i in clips]
    x = heads[0].clip_stats(mels)
    noisy = [heads[0].clip_stats(copy)
             for copy in voice_copies(mels, speakers, data.settings, noise_copies, band_copies)]
    for head, (indices, labels) in zip(heads, parts):
        rows = [row[i] for i in indices]
        head.fit_stats(x[rows], labels, [data.speakers[i] for i in indices], len(BASIC),
                       np.stack([n[rows] for n in noisy]) if noisy else None)
    return heads


def mixed(fcn_logp: np.ndarray, voice_logp: np.ndarray | None, weight: float) -> np.ndarray:
    """log((1 - w) p_FCN + w p_voice): the voice expert's answer, as ``VoiceHead.mix`` gives it."""
    if voice_logp is None:
        return fcn_logp
    return np.log((1 - weight) * np.exp(fcn_logp) + weight * np.exp(voice_logp))


def seven_class(data: TrainingData, indices: list[int]) -> tuple[list[int], np.ndarray]:
    """The clips of ``indices`` labelled with one of the seven classes, and their labels in BASIC's order."""
    keep = [i for i in indices if data.classes[data.labels[i]] in BASIC]
    return keep, np.array([BASIC.index(data.classes[data.labels[i]]) for i in keep], np.int64)


# ---- the recipe ----

def build(caches: list[str], names: list[str] | None, fer: Path, holdout: str, out: Path, work: Path,
          av_cache: str | None = None, frontend: str = "default", encoder_name: str = "default",
          seeds: int = 5, prior_correction: bool = True, voice_weight: float = ModelConfig.voice_head,
          command: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    front: AudioFrontend = load_frontend(frontend)
    encoder = load_encoder(encoder_name)
    data, described = load_corpora(caches, names)
    if data.classes != front.classes:
        raise CacheError(f"the speech caches have the classes {data.classes}, the front-end {front.classes}: "
                         "pass the caches the front-end was trained on")
    front.check_settings(data.settings)

    # the speech twin: the front-end's recipe without the held-out speakers
    split = explicit_split(data.speakers, None, holdout)
    recorded = front.info.get("training", {}).get("train_config", {})
    cfg = TrainConfig(audio_init="none", progress=False)
    differs = {k: (recorded[k], v) for k, v in cfg.to_dict().items()
               if k in recorded and recorded[k] != v and k not in ("progress", "features_on_device", "amp")}
    if differs:
        log.warning("the front-end was trained with other settings than today's defaults: %s", differs)
    model_cfg = {**{k: v for k, v in front.config.to_dict().items()}, "n_classes": len(data.classes)}
    log.info("speech twin: training on %d clips without %s (resumes from %s)", len(split.train), holdout, work)
    fit(data, split, model_cfg, cfg, work / "speech-twin", resume=(work / "speech-twin").exists())
    twin, _ = load_model(work / "speech-twin" / "best.pt")
    rows = basic_rows(data.classes)

    held, held_y = seven_class(data, split.test)
    trained, trained_y = seven_class(data, split.train)
    twin_z = audio_logits(twin, data, held, rows)
    a_prior = log_prior(trained_y, len(BASIC)) if prior_correction else None
    a_temp = fit_temperature(twin_z - (a_prior if a_prior is not None else 0.0), held_y)
    # the voice head: the twin's fitted on the twin's clips and tempered on the held-out speakers; the
    # shipped one fitted on every clip of the seven classes, with the twin's temperature
    twin_head = head = None
    v_z, v_temp = None, 1.0
    everything, everything_y = seven_class(data, split.train + split.test)
    if voice_weight > 0:
        t1 = time.perf_counter()
        twin_head, head = voice_heads(data, [(trained, trained_y), (everything, everything_y)], voice_weight)
        v_z = twin_head.logits(twin_head.clip_stats([data.clips[i].arrays["mel"] for i in held]))
        v_temp = fit_temperature(v_z, held_y)
        for h in (twin_head, head):
            h.temper(v_temp)
        log.info("voice heads fitted on %d and %d clips (%.0fs), temperature %.2f", len(trained), len(everything),
                 time.perf_counter() - t1, v_temp)

    # face: the encoder's prior is FER2013's training split; temperature on validation, figures on test
    f_counts = {c: sum(1 for f in (find_split(fer, "train") / c).iterdir() if f.is_file()) for c in BASIC}
    f_prior = log_prior(np.repeat(np.arange(len(BASIC)), list(f_counts.values())), len(BASIC)) \
        if prior_correction else None
    val_z, val_y = face_logits(encoder, fer, "validation")
    f_temp = fit_temperature(val_z - (f_prior if f_prior is not None else 0.0), val_y)
    test_z, test_y = face_logits(encoder, fer, "test")

    fc, f_rows = encoder.model.fc, basic_rows(encoder.classes)
    face = Expert(fc.weight.detach()[f_rows].clone(), fc.bias.detach()[f_rows].clone(), f_prior, f_temp)
    twin_voice = Expert(twin.classifier.weight.detach()[rows].clone(), twin.classifier.bias.detach()[rows].clone(),
                        a_prior, a_temp)
    voice = Expert(front.state["classifier.weight"][rows].clone(), front.state["classifier.bias"][rows].clone(),
                   a_prior, a_temp)

    v_logp = calibrated(v_z, None, v_temp) if v_z is not None else None
    metrics = measure(data, held, held_y, twin_z, a_prior, a_temp, v_logp, voice_weight, test_z, test_y, val_z,
                      val_y, f_prior, f_temp, seeds)
    metrics["speech_heldout"]["speakers"] = split.speakers["test"]
    if av_cache:
        twin_model = assemble(twin.state_dict(), twin.cfg, data.classes, twin_voice, face, encoder.feature_dim,
                              twin_head)
        metrics["real_av"] = measure_real_av(twin_model, av_cache, holdout)
    model = assemble(front.state, front.config, front.classes, voice, face, encoder.feature_dim, head)
    settings = with_encoder_identity(ExtractionSettings(encoder=encoder_name), encoder)
    front.check_settings(settings.to_dict())
    about = {
        "name": out.stem,
        "licence": LICENCE,
        "classes": CLASS_NOTE,
        "fusion": FUSION_NOTE,
        "data": {"voice": [{k: d[k] for k in ("name", "clips", "speakers", "speaker_ids", "classes") if k in d}
                           for d in front.info["data"]],
                 "face": {"name": "FER2013", "train_images": f_counts,
                          "encoder": {"name": encoder.name, "sha256": encoder.sha256,
                                      "test": encoder.metrics.get("test", {}).get("accuracy")}}},
        "commands": {"voice": front.info.get("command", ""), "face": encoder.training.get("command", ""),
                     "model": command},
        "parts": {"audio_frontend": front.describe(), "face_encoder": {"name": encoder.name,
                                                                        "sha256": encoder.sha256}},
        "calibration": {"voice": {"temperature": round(a_temp, 4), "prior_correction": prior_correction},
                        "face": {"temperature": round(f_temp, 4), "prior_correction": prior_correction},
                        "voice_head": ({"weight": voice_weight, "layers": list(head.layers),
                                        "temperature": round(v_temp, 4), "clips": len(everything),
                                        "encoder": VOICE_ENCODER} if head is not None else None)},
        "built": {"seconds": round(time.perf_counter() - t0, 1), "torch": str(torch.__version__),
                  "avemo": avemo.__version__},
    }
    save_model(out, model, list(BASIC), settings.to_dict(), metrics, extra={"about": about})
    log.info("wrote %s", out)
    return {"metrics": metrics, "about": about}


def measure(data, held, held_y, twin_z, a_prior, a_temp, v_logp, voice_weight, test_z, test_y, val_z, val_y,
            f_prior, f_temp, seeds: int) -> dict[str, Any]:
    """Speech (held-out speakers), face (FER2013 test) and pseudo audio-visual figures, with ablations."""
    corpora = np.array([(data.speakers[i] or "?:").split(":", 1)[0] for i in held])
    fcn_logp = calibrated(twin_z, a_prior, a_temp)
    a_logp = mixed(fcn_logp, v_logp, voice_weight)
    f_logp = calibrated(test_z, f_prior, f_temp)
    speech = {"all": scores(held_y, a_logp),
              "per_corpus": {c: scores(held_y[corpora == c], a_logp[corpora == c]) for c in sorted(set(corpora))},
              "uncalibrated": scores(held_y, mixed(calibrated(twin_z, None, 1.0), v_logp, voice_weight))}
    if v_logp is not None:
        speech["fcn_alone"] = scores(held_y, fcn_logp)
        speech["voice_head_alone"] = scores(held_y, v_logp)
    face = {"test": scores(test_y, f_logp), "uncalibrated": scores(test_y, calibrated(test_z, None, 1.0)),
            "validation": scores(val_y, calibrated(val_z, f_prior, f_temp))}
    # pseudo audio-visual pairs: every held-out utterance with a FER2013 test face of its emotion
    rng_runs: dict[str, list] = {"voice": [], "face": [], "product": [], "mean_probability": [],
                                 "product_uncalibrated": []}
    a_raw, f_raw = mixed(calibrated(twin_z, None, 1.0), v_logp, voice_weight), calibrated(test_z, None, 1.0)
    if v_logp is not None:
        rng_runs["product_fcn_alone"] = []
    by_class = {c: np.flatnonzero(test_y == c) for c in range(len(BASIC))}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        faces = np.array([rng.choice(by_class[c]) for c in held_y])
        fa, ff = a_logp, f_logp[faces]
        rng_runs["voice"].append(scores(held_y, fa))
        rng_runs["face"].append(scores(held_y, ff))
        rng_runs["product"].append(scores(held_y, fa + ff))
        rng_runs["mean_probability"].append(scores(held_y, np.log((np.exp(fa) + np.exp(ff)) / 2)))
        rng_runs["product_uncalibrated"].append(scores(held_y, a_raw + f_raw[faces]))
        if v_logp is not None:
            rng_runs["product_fcn_alone"].append(scores(held_y, fcn_logp + ff))
    pseudo = {k: mean_std(v) for k, v in rng_runs.items()}
    pseudo["pairs"], pseudo["seeds"] = len(held_y), seeds
    return {"speech_heldout": speech, "face_fer2013": face, "pseudo_av": pseudo}


def measure_real_av(model: AVEmoNet, cache: str, holdout: str) -> dict[str, Any]:
    """The fused model (voice expert from the speech twin) on a labelled audio-visual cache."""
    data = load_training_data(cache)
    idx, y = seven_class(data, list(range(len(data))))
    store = FeatureStore(data, idx, model.cfg.video_dim, torch.device("cpu"), on_device=False)
    out = predict_outputs(model, store, 64, False, ("logits", "audio_logits", "video_logits"))
    has_v = np.array([data.clips[i].has_video for i in idx])
    res = {"clips": len(idx), "with_video": int(has_v.sum()), "fused": scores(y, out["logits"]),
           "note": f"voice expert: the twin trained without {holdout}"}
    if has_v.any():
        res["av_clips"] = {k: scores(y[has_v], out[key][has_v]) for k, key in
                           (("fused", "logits"), ("voice", "audio_logits"), ("face", "video_logits"))}
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("caches", nargs="+", metavar="CACHE", help="the speech caches the audio front-end was trained on")
    p.add_argument("--names", help="comma-separated corpus names, one per cache (as given to avemo-train-audio)")
    p.add_argument("--fer", required=True, type=Path, help="FER2013 in class folders (train/validation/test)")
    p.add_argument("--holdout-speakers", required=True, metavar="NAME:SPK,...",
                   help="speakers the speech twin does not train on (figures and the voice temperature)")
    p.add_argument("--av-cache", help="a labelled audio-visual cache to measure the fused model on (e.g. CREMA-D)")
    p.add_argument("--frontend", default="default", help="audio front-end (name or file)")
    p.add_argument("--encoder", default="default", help="face encoder (name or file)")
    p.add_argument("--no-prior-correction", action="store_true", help="ablation: keep each expert's training prior")
    p.add_argument("--voice-head", type=float, default=ModelConfig.voice_head,
                   help="weight of the voice head in the voice expert's probabilities (0: the front-end alone)")
    p.add_argument("--seeds", type=int, default=5, help="pairings of the pseudo audio-visual set")
    p.add_argument("--work", type=Path, required=True, help="folder for the speech twin's run (resumed)")
    p.add_argument("--out", type=Path, required=True, help="the model file (e.g. avemo/model/weights/default.pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.work, True)
    command = "python -m train.default_model " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        build(args.caches, args.names.split(",") if args.names else None, args.fer, args.holdout_speakers,
              args.out, args.work, args.av_cache, args.frontend, args.encoder, args.seeds,
              not args.no_prior_correction, args.voice_head, command)
    except (CacheError, SplitError, TrainError, CheckpointError, ValueError) as e:
        log.error("train.default_model: error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
