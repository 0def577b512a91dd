"""One clip -> emotion, class probabilities, and the attention that explains them.

``load_model(path)`` reads a trained checkpoint once (the fused model plus the extraction
settings it was trained on; with no path, the ``default`` model shipped in the package) and ``predict(path, model)`` runs the very same
``ClipExtractor`` that built the training cache, with those settings, then the model.
``predict_timeline`` slides a window over a long recording, decoding one window at a
time, so memory stays bounded however long the file is.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from avemo.batching import collate, to_device
from avemo.checkpoint import CheckpointError
from avemo.encoders import FaceEncoder, is_shipped_name
from avemo.extraction import ClipError, ClipExtractor, default_device
from avemo.features import ClipFeatures, ExtractionSettings
from avemo.io import display_name, shown_name
from avemo.media import Listing, is_media, list_folder
from avemo.model import DEFAULT_MODEL, resolve_model_path
from avemo.model import load_model as load_network
from avemo.model.adapt import PRIOR_CLIPS, AdaptError, adapt, adaptation_scope, check_adaptable, population_statistics
from avemo.model.frames import clip_face_pixels
from avemo.video import MediaError, media_duration, open_media, scan_duration

MIN_WINDOW_S = 0.1   # shortest --window / --hop: a few spectrogram frames; shorter only multiplies windows


@dataclass
class Prediction:
    """What the model says about one clip (or one window of it)."""

    clip: str
    emotion: str | None                       # None when nothing usable was found (see warnings)
    probabilities: dict[str, float]
    modalities: list[str]                     # the modalities the decision used
    face_coverage: float | None               # share of sampled frames with a face (None: no video)
    warnings: list[str] = field(default_factory=list)
    start: float | None = None                # window bounds, seconds (timeline predictions only)
    end: float | None = None
    # late-fusion models (the shipped default): what each modality says on its own
    modality_probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    # explanation: "video" [T_v] weight per sampled frame, "audio" [F', T'] weight per FCN cell, and
    # for stt over cells "video_cells" [T_v, h, w] weight per cell of each frame's feature map
    attention: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    features: ClipFeatures | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (attention as per-frame weights with their times)."""
        d: dict[str, Any] = {
            "clip": display_name(self.clip), "emotion": self.emotion,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "modalities": self.modalities,
            "face_coverage": None if self.face_coverage is None else round(self.face_coverage, 4),
            "warnings": self.warnings,
        }
        if self.modality_probabilities:
            d["modality_probabilities"] = {m: {k: round(float(v), 6) for k, v in p.items()}
                                           for m, p in self.modality_probabilities.items()}
        if self.start is not None:
            d["start"], d["end"] = round(self.start, 3), round(self.end, 3)
        if "video" in self.attention and self.features is not None:
            times = self.features.arrays["frame_times"]
            d["frame_attention"] = [[round(float(t), 3), round(float(w), 4)]
                                    for t, w in zip(times, self.attention["video"])]
        if "video_cells" in self.attention and self.features is not None:
            times = self.features.arrays["frame_times"]
            d["cell_attention"] = [[round(float(t), 3), np.round(g, 4).tolist()]
                                   for t, g in zip(times, self.attention["video_cells"])]
        return d


class EmotionRecognizer:
    """A trained model, loaded once, with the extractor configured as in training."""

    def __init__(self, path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
                 face_encoder: str | None = None):
        self.path = resolve_model_path(path)
        self._encoder_refusal: str | None = None
        self.device = torch.device(device or default_device())
        self.network, ckpt = load_network(path, map_location="cpu")
        self.network.to(self.device)
        self.cfg = self.network.cfg
        self.classes: list[str] = list(ckpt["classes"])
        self.metrics: dict[str, Any] = ckpt.get("metrics", {})
        self.about: dict[str, Any] = ckpt.get("about", {})     # shipped models: data, commands, licence
        self._record = {k: ckpt.get(k) for k in ("audio_init", "train_config", "about")}   # for adaptation_scope
        self._trained = self.network        # what each adapt_to starts from: adaptations never compound
        try:
            settings = ExtractionSettings.from_dict(ckpt["extraction_settings"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: its extraction settings cannot be read: {e}") from None
        if face_encoder is not None:
            # same encoder (the hash is checked on load), another place on this machine
            settings = dataclasses.replace(settings, encoder=face_encoder)
        elif self.cfg.uses_video and self.cfg.frame_encoder is None and not is_shipped_name(settings.encoder):
            # a checkpoint is data from elsewhere: the files it names are not opened on its word
            self._encoder_refusal = (
                f"{self.path}: this model was trained with the face encoder file '{settings.encoder}'; avemo "
                "opens only encoders shipped with it by name, or a file you name yourself: pass "
                "--face-encoder PATH (its sha256 must match the one the model was trained with)")
        # crops are kept so that an explanation can show the faces, and feature maps are made when the
        # model reads them (a cache may have gained them after its settings were written); neither
        # changes the cache identity
        self.settings = dataclasses.replace(settings, keep_crops=True,
                                            feature_maps=settings.feature_maps or self.cfg.uses_maps)
        self._extractor: ClipExtractor | None = None

    @property
    def extractor(self) -> ClipExtractor:
        """The training-time extraction, set up on first use (an audio-only model loads no face models)."""
        if self._extractor is None:
            if self._encoder_refusal:
                raise CheckpointError(self._encoder_refusal)
            try:
                self._extractor = ClipExtractor(self.settings, str(self.device), with_video=self.cfg.uses_video,
                                                encoder=self._own_encoder())
            except (ValueError, FileNotFoundError, CheckpointError) as e:
                raise CheckpointError(
                    f"{self.path}: cannot set up the extraction this model was trained with: {e} "
                    "(pass --face-encoder PATH if the encoder file lives elsewhere)") from None
        return self._extractor

    def _own_encoder(self) -> FaceEncoder | None:
        """A model trained end to end carries its face encoder: extraction embeds with a copy of it,
        so the file it started from is not needed (not even present) where the model is used."""
        spec = self.cfg.frame_encoder if self.cfg.uses_video else None
        if spec is None:
            return None
        start = spec.get("started_from", {})
        return FaceEncoder(copy.deepcopy(self.network.frame_encoder.net), name=f"{start.get('name', 'encoder')} "
                           "(fine-tuned in this model)", sha256=start.get("sha256", ""),
                           classes=[str(i) for i in range(spec["n_classes"])], input_size=spec["input_size"],
                           grayscale=spec["grayscale"], mean=spec["mean"], std=spec["std"], arch=spec["arch"],
                           arch_cfg=spec["arch_cfg"], device=self.device)

    def adapt_to(self, paths: list[str | os.PathLike], prior_clips: float = PRIOR_CLIPS,
                 corpus: list[str | os.PathLike] | None = None) -> tuple[int, list[str]]:
        """Adapt the voice side to the audio of ``paths``, clips of one speaker or one recording set-up
        (``avemo.model.adapt``: no labels; the model's own statistics weigh as ``prior_clips`` clips; every
        later prediction uses the adapted model). Returns how many clips it adapted to and, for each file
        that gave no audio, why (a corpus file's reason starts with "corpus: ").

        Without ``corpus`` the clips' statistics replace the model's, which needs a model whose statistics are
        those of the clips it learned from (``adaptation_scope``: not a frozen front-end's, not several
        corpora's; ``AdaptError`` otherwise). With ``corpus``, clips of the corpus the speaker belongs to
        (several speakers recorded alike; the speaker's own clips may be among them), the speaker is adapted
        relative to it: their deviation from that corpus is removed and the corpus's offset from the model
        kept, which suits any model that reads audio, the shipped default included. Raises ``AdaptError``
        when no clip (or no corpus clip) has usable audio, or when the model reads no audio."""
        check_adaptable(self._trained)
        scope = "all" if corpus is not None else adaptation_scope(self._record)
        audio = ClipExtractor(self.settings, str(self.device), with_video=False)
        read: dict[str, tuple[np.ndarray | None, str | None]] = {}     # a file in both lists is decoded once
        mels, problems = self._audio(paths, audio, read)
        population = None
        if corpus is not None:
            corpus_mels, corpus_problems = self._audio(corpus, audio, read)
            problems += [f"corpus: {p}" for p in corpus_problems]
            if not corpus_mels:
                raise AdaptError("none of the corpus files has usable audio")
            population = population_statistics(self._trained, corpus_mels)
        self.network = adapt(self._trained, mels, prior_clips, scope, population)
        return len(mels), problems

    @staticmethod
    def _audio(paths: list[str | os.PathLike], audio: ClipExtractor,
               read: dict[str, tuple[np.ndarray | None, str | None]]) -> tuple[list[np.ndarray], list[str]]:
        """The log-mel spectrograms of the files with usable audio, and why each other file has none; ``read``
        holds each file's outcome by its real path, so that a file met again is not decoded again."""
        mels, problems = [], []
        for path in paths:
            key = os.path.realpath(path)
            if key not in read:
                try:
                    feats = audio.extract(path)
                    read[key] = ((feats.arrays["mel"], None) if feats.has_audio
                                 else (None, "; ".join(feats.warnings) or "no usable audio"))
                except ClipError as e:
                    read[key] = (None, str(e))
            mel, why = read[key]
            if mel is not None:
                mels.append(mel)
            else:
                problems.append(f"{shown_name(path)}: {why}")
        return mels, problems

    def predict(self, path: str | os.PathLike, clip_id: str | None = None,
                start: float | None = None, end: float | None = None) -> Prediction:
        """Extract ``path`` (or its [start, end) seconds) and classify it. Raises ``ClipError``."""
        try:
            feats = self.extractor.extract(path, clip_id=clip_id or str(path), start=start, end=end)
        except ClipError as e:
            if self.cfg.uses_video:
                raise
            raise ClipError(f"this model needs audio, and the clip has none usable ({e})") from None
        pred = self.predict_features(feats)
        pred.start, pred.end = start, end
        return pred

    @torch.inference_mode()
    def predict_features(self, feats: ClipFeatures) -> Prediction:
        """Classify already-extracted features (from a cache or from ``extract``)."""
        uses = {"audio": self.cfg.uses_audio, "video": self.cfg.uses_video}
        present = {"audio": feats.has_audio, "video": feats.has_video}
        used = [m for m in ("audio", "video") if uses[m] and present[m]]
        warnings = list(feats.warnings)
        if not used:
            needs = " and ".join(m for m in ("audio", "video") if uses[m])
            raise ClipError(f"this model needs {needs}, and the clip has none usable"
                            + (f" ({'; '.join(warnings)})" if warnings else ""))
        for m in ("audio", "video"):
            if uses[m] and not present[m]:
                warnings.append(f"model: no usable {m}; decided from {' and '.join(used)} alone")
        batch = collate([feats], self.cfg.n_mels, self.cfg.video_dim if self.cfg.uses_video else 0,
                        self.cfg.map_cells)
        spec = self.cfg.frame_encoder if self.cfg.uses_video else None
        if spec is not None:
            # trained end to end: the checkpoint's own fine-tuned encoder reads the face crops (kept by
            # self.settings); the frozen features the extractor also computed are not used
            try:
                batch["faces"] = clip_face_pixels(feats, spec["input_size"], spec["grayscale"])
            except ValueError as e:
                raise ClipError(str(e)) from None
        out = self.network(to_device(batch, self.device))
        probs = torch.softmax(out["logits"].float(), dim=-1)[0].cpu().numpy()
        if not np.isfinite(probs).all():
            raise ClipError("the model gave NaN or infinite probabilities for this clip (its features hold "
                            "non-finite values)")
        by_modality = {m: dict(zip(self.classes, torch.softmax(out[f"{m}_logits"][0].float(), -1).tolist()))
                       for m in used if f"{m}_logits" in out}
        attention = {}
        if "video" in used:
            attention["video"] = out["video_attention"][0].float().cpu().numpy()
            if "video_cell_attention" in out:
                grid = feats.arrays["feature_maps"].shape[1:3]
                attention["video_cells"] = out["video_cell_attention"][0].float().cpu().numpy().reshape(-1, *grid)
        if "audio" in used:
            attention["audio"] = out["audio_attention"][0].float().cpu().numpy()
        return Prediction(
            clip=feats.clip, emotion=self.classes[int(np.argmax(probs))],
            probabilities={c: float(p) for c, p in zip(self.classes, probs)}, modalities=used,
            face_coverage=feats.face_coverage if feats.frames_sampled else None,
            warnings=warnings, modality_probabilities=by_modality, attention=attention, features=feats)

    def predict_timeline(self, path: str | os.PathLike, window: float, hop: float | None = None,
                         clip_id: str | None = None) -> Iterator[Prediction]:
        """One prediction per window of ``window`` seconds every ``hop`` seconds, decoded lazily."""
        hop = window if hop is None else hop
        for name, v in (("window", window), ("hop", hop)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= MIN_WINDOW_S):
                raise ValueError(f"{name} must be at least {MIN_WINDOW_S} s, got {v}")
        clip_id = clip_id or str(path)
        duration = clip_duration(path)
        start = 0.0
        while start < duration - 1e-6:
            end = min(start + window, duration)
            try:
                yield self.predict(path, clip_id, start, end)
            except ClipError as e:
                # a window with nothing usable (a pause, the speaker off screen) is part of the timeline
                yield Prediction(clip=clip_id, emotion=None, probabilities={}, modalities=[],
                                 face_coverage=None, warnings=[str(e)], start=start, end=end)
            start += hop


def clip_duration(path: str | os.PathLike) -> float:
    """Duration of a media file in seconds; ``ClipError`` if it cannot be told."""
    try:
        with open_media(path) as c:
            d = media_duration(c)
    except MediaError as e:
        raise ClipError(str(e)) from None
    d = d or scan_duration(path, "video") or scan_duration(path, "audio")
    if not d:
        raise ClipError("the file gives no duration and has no timestamps")
    return float(d)


def load_model(path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
               face_encoder: str | None = None) -> EmotionRecognizer:
    """Load a trained checkpoint, or a shipped model by name (``default``), for repeated predictions
    (refuses files that would run code)."""
    return EmotionRecognizer(path, device, face_encoder)


def predict(path: str | os.PathLike, model: EmotionRecognizer | str | os.PathLike = DEFAULT_MODEL) -> Prediction:
    """The emotion in one clip. ``model`` is a loaded model, a checkpoint path or a shipped model's name."""
    if not isinstance(model, EmotionRecognizer):
        model = load_model(model)
    return model.predict(path)


def predict_timeline(path: str | os.PathLike, model: EmotionRecognizer | str | os.PathLike = DEFAULT_MODEL,
                     window: float = 2.0, hop: float | None = None) -> list[Prediction]:
    """Predictions over a long recording, window by window."""
    if not isinstance(model, EmotionRecognizer):
        model = load_model(model)
    return list(model.predict_timeline(path, window, hop))


def media_files(paths: list[str | os.PathLike]) -> Listing:
    """Expand folders (recursively, sorted) into their media files, skipping hidden entries as
    avemo-extract does and naming folders that cannot be listed; files named directly are kept
    as given."""
    out = Listing([], 0)
    for p in map(Path, paths):
        if p.is_dir():
            found = list_folder(p)
            for f in found.files:
                (out.files if is_media(f) else out.others).append(f)
            out.hidden += found.hidden
            out.unlisted.update(found.unlisted)
        else:
            out.files.append(p)
    return out
