"""``avemo-evaluate CACHE``: how well a model does on a labelled cache, before or after training.

The model is a run's checkpoint (``RUN/best.pt``), a model shipped with avemo (``default``)
or, with ``--frontend``, an audio front-end on its own (``avemo-train-audio``'s file, or a
shipped one by name), so a user can see what the shipped weights do on their speakers
before deciding to train. The cache is an ``avemo-extract`` cache with labels, made with
the settings the model was trained on (checked, with the differing settings named).

Classes are matched by name. A model scores the clips whose class it knows, choosing among
the cache's classes only (a model cannot be right about a class it never saw, and should
not lose a clip to one the cache does not have); clips of other classes, and clips missing
the only modality a model reads, are counted and left out, with the reason.

Speaker independence is the user's to keep: ``--speakers`` restricts the score to some
speakers, and a warning names the cache's speakers that the model trained or chose its
epoch on (a run), or that share an id with a speaker of the model's training corpora (a
front-end or a shipped model: ids repeat across corpora, so this is only a hint).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from avemo.checkpoint import CheckpointError
from avemo.cpu import reuse_freed_memory, set_torch_threads
from avemo.encoders import shipped_encoder_with
from avemo.extraction import default_device
from avemo.features import AUDIO_SETTING_KEYS, settings_differences
from avemo.io import NoSpaceError, atomic_path, write_json_atomic
from avemo.model import DEFAULT_MODEL, load_model
from avemo.model.adapt import PRIOR_CLIPS, adapt, adaptation_scope, population_statistics
from avemo.model.frontend import load_frontend
from train.data import CacheError, TrainingData, load_training_data
from train.finetune import CropBank, FinetuneError, require_crops
from train.loop import FeatureStore, predict_outputs
from train.metrics import classification_metrics, write_confusion

log = logging.getLogger("avemo.evaluate")


class EvaluationError(ValueError):
    """A model and a cache that cannot be scored together, with the reason and the fix in words."""


@dataclasses.dataclass
class Scorer:
    """A network with what evaluating it needs: its classes, its extraction settings, whom it heard."""

    name: str
    network: torch.nn.Module
    classes: list[str]
    settings: dict[str, Any]
    compared: tuple[str, ...] | None     # the settings that must match the cache's (None: all but additive ones)
    heard: dict[str, list[str]]          # where it learned -> speaker ids (a run: "train", "val")
    same_ids: bool                       # the ids are the cache's own (a run) or only maybe (other corpora)
    trained_on_all: bool = False         # a run with --no-split: every clip of its cache was training data
    record: dict = dataclasses.field(default_factory=dict)   # how its audio side was trained (adaptation_scope)


def load_scorer(model: str | None = None, frontend: str | None = None) -> Scorer:
    """A trained or shipped model (``model``), or an audio front-end (``frontend``), ready to score."""
    if frontend is not None:
        front = load_frontend(frontend)
        heard = {d.get("name", "?"): [str(s) for s in d.get("speaker_ids", [])] for d in front.info.get("data", [])}
        return Scorer(f"front-end {front.name}", front.model(), front.classes, front.audio_settings,
                      AUDIO_SETTING_KEYS, heard, same_ids=False, record={"data": front.info.get("data")})
    network, ckpt = load_model(model or DEFAULT_MODEL, map_location="cpu")
    split = ckpt.get("split") or {}
    if split:
        spk = split.get("speakers", {})
        heard = {part: [str(s) for s in spk.get(part, [])] for part in ("train", "val") if spk.get(part)}
        same_ids = True
    else:    # a shipped model: its data record names the corpora and their speakers
        about = (ckpt.get("about") or {}).get("data", {})
        parts = [d for v in about.values() for d in (v if isinstance(v, list) else [v]) if isinstance(d, dict)]
        heard = {d.get("name", "?"): [str(s) for s in d.get("speaker_ids", [])] for d in parts}
        same_ids = False
    cfg = network.cfg
    return Scorer(str(model or DEFAULT_MODEL), network, list(ckpt["classes"]), ckpt["extraction_settings"],
                  None if cfg.uses_video else AUDIO_SETTING_KEYS, heard, same_ids,
                  trained_on_all=split.get("method") == "none",
                  record={k: ckpt.get(k) for k in ("audio_init", "train_config", "about")})


def check_settings(scorer: Scorer, cache_settings: dict[str, Any], cache: str) -> None:
    """Refuse a cache whose features were made differently from the ones the model learned from."""
    diff = [f"{k} {ours!r} (model: {theirs!r})"
            for k, ours, theirs in settings_differences(scorer.settings, cache_settings, scorer.compared)]
    if diff:
        earlier = shipped_encoder_with(cache_settings.get("encoder_sha256") or "")
        if earlier and earlier != cache_settings.get("encoder"):
            diff.append(f"the cache's faces were embedded by the shipped encoder '{earlier}', which an earlier "
                        f"release shipped as '{cache_settings.get('encoder')}'")
        raise EvaluationError(
            f"{cache} was extracted with other settings than {scorer.name} was trained on: {'; '.join(diff)}. "
            f"Extract the clips again into a new cache with the model's settings "
            f"(avemo-extract VIDEO_DIR --out NEW_CACHE and the options that set these)")


def scoreable(scorer: Scorer, data: TrainingData, speakers: list[str] | None) -> tuple[list[int], dict[str, int]]:
    """The clips to score, and how many of the others were left out for which reason."""
    cfg = scorer.network.cfg
    left: dict[str, int] = {}
    keep = []
    for i, clip in enumerate(data.clips):
        label = data.classes[data.labels[i]]
        if speakers is not None and data.speakers[i] not in speakers:
            continue
        reason = None
        if label not in scorer.classes:
            reason = f"class '{label}', which the model does not know"
        elif not ((cfg.uses_audio and clip.has_audio) or (cfg.uses_video and clip.has_video)):
            reason = f"no usable {'audio' if cfg.uses_audio else 'face'}, the only thing the model reads"
        if reason:
            left[reason] = left.get(reason, 0) + 1
        else:
            keep.append(i)
    return keep, left


def shared_class_metrics(scores: np.ndarray, model_classes: list[str], data: TrainingData,
                         indices: list[int] | None = None) -> tuple[dict, np.ndarray, list[int]]:
    """Metrics on the classes both the model and the data have, from [N, model classes] ``scores`` of the clips
    ``indices`` (default: all): clips of other classes are left out, and the prediction is the best of the
    shared classes. Returns (metrics, [kept, shared] probabilities among them, the kept clips)."""
    indices = list(range(len(data))) if indices is None else list(indices)
    shared = [c for c in data.classes if c in model_classes]
    rows = [k for k, i in enumerate(indices) if data.classes[data.labels[i]] in shared]
    kept = [indices[k] for k in rows]
    restricted = torch.from_numpy(np.asarray(scores, np.float32)[rows][:, [model_classes.index(c) for c in shared]])
    probs = torch.softmax(restricted, dim=1).numpy()
    truth = np.array([shared.index(data.classes[data.labels[i]]) for i in kept], np.int64)
    return classification_metrics(truth, probs.argmax(1), shared), probs, kept


def model_logits(net: torch.nn.Module, data: TrainingData, indices: list[int] | None, device: torch.device,
                 batch_size: int = 64, groups: list | None = None, prior_clips: float = PRIOR_CLIPS,
                 scope: str = "all", population: list[dict] | None = None) -> np.ndarray:
    """[N, model classes] logits of ``net`` for the clips ``indices`` (a model trained end to end reads the
    cache's face crops, as it was trained). With ``groups`` (one key per clip of ``indices``), the clips of
    each group are scored by the model adapted to that group (``adapted_to``, with ``prior_clips``, ``scope``
    and ``population``)."""
    cfg = net.cfg
    indices = list(range(len(data))) if indices is None else list(indices)
    net.to(device)
    if groups is not None:
        out = np.zeros((len(indices), cfg.n_classes), np.float32)
        for key in dict.fromkeys(groups):
            rows = [k for k, g in enumerate(groups) if g == key]
            members = [indices[k] for k in rows]
            out[rows] = model_logits(adapted_to(net, data, members, prior_clips, scope, population), data, members,
                                     device, batch_size)
        return out
    crops = None
    if cfg.uses_video and cfg.frame_encoder is not None:
        require_crops(data, indices)
        crops = CropBank(data, indices, cfg.frame_encoder).place(device, on_device=False)
    store = FeatureStore(data, indices, cfg.video_dim if cfg.uses_video else 0, device, on_device=False,
                         video_cells=0 if crops is not None else cfg.map_cells if cfg.uses_video else 0, crops=crops)
    return predict_outputs(net, store, batch_size, amp=True)["logits"]


def adapted_to(net: torch.nn.Module, data: TrainingData, indices: list[int],
               prior_clips: float = PRIOR_CLIPS, scope: str = "all",
               population: list[dict] | None = None) -> torch.nn.Module:
    """``net`` adapted (``avemo.model.adapt``) to the audio of the clips ``indices``; as it is when none has any."""
    mels = [data.clips[i].arrays["mel"] for i in indices if data.clips[i].has_audio]
    return adapt(net, mels, prior_clips, scope, population) if mels else net


def cache_population(net: torch.nn.Module, data: TrainingData) -> list[dict]:
    """``population_statistics`` of every labelled clip of the cache that has audio: the corpus its
    speakers are adapted relative to."""
    return population_statistics(net, [c.arrays["mel"] for c in data.clips if c.has_audio])


def heard_speakers(scorer: Scorer, speakers: set[str]) -> str | None:
    """A warning naming the scored speakers the model may have heard in training, or None."""
    if scorer.trained_on_all:
        return (f"{scorer.name} was trained on every clip of its cache (--no-split): if this is that cache, these "
                "are training-set figures, not an accuracy estimate")
    hits = {where: sorted(speakers & set(ids)) for where, ids in scorer.heard.items()}
    hits = {k: v for k, v in hits.items() if v}
    unnamed = [where for where, ids in scorer.heard.items() if not ids]
    if not hits:
        return (f"{scorer.name} was trained on {', '.join(unnamed)}, whose speakers it does not name: if this cache "
                "holds any of them, its figures are not speaker-independent") if unnamed else None
    named = "; ".join(f"{where}: {', '.join(v)}" for where, v in hits.items())
    if scorer.same_ids:
        return (f"{scorer.name} trained on (train) or chose its epoch by (val) speakers that are scored here "
                f"({named}): their figures are not speaker-independent; pass --speakers with the others")
    return (f"speaker ids scored here also name speakers of {scorer.name}'s training corpora ({named}); if this "
            "cache is one of those corpora, its figures are not speaker-independent (ids repeat across corpora, "
            "so this may be a coincidence)")


def per_speaker_uar(data: TrainingData, indices: list[int], truth: np.ndarray, pred: np.ndarray,
                    classes: list[str]) -> dict[str, dict]:
    out = {}
    for spk in sorted({str(data.speakers[i]) for i in indices}):
        rows = [k for k, i in enumerate(indices) if str(data.speakers[i]) == spk]
        m = classification_metrics(truth[rows], pred[rows], classes)
        out[spk] = {"n": m["n"], "uar": m["uar"], "accuracy": m["accuracy"]}
    return out


def evaluate_cache(cache: str | Path, model: str | None = None, frontend: str | None = None,
                   speakers: list[str] | None = None, labels: str | Path | None = None,
                   device: str | None = None, out: str | Path | None = None, adapt_to: str | None = None,
                   adapt_prior: float = PRIOR_CLIPS) -> dict:
    """Score a model (or front-end) on a labelled cache; returns the report (also written to ``out``).
    ``adapt_to``: "speaker" scores each speaker's clips with the model adapted to them (``adapted_to``),
    "all" with the model adapted to all the scored clips at once; ``adapt_prior``: how many clips the model's
    own statistics weigh against a group's (``avemo.model.adapt``)."""
    scorer = load_scorer(model, frontend)
    cfg = scorer.network.cfg
    data = load_training_data(cache, labels, with_maps=bool(cfg.uses_video and cfg.uses_maps))
    check_settings(scorer, data.settings, str(cache))
    if speakers is not None:
        unknown = sorted(set(speakers) - {s for s in data.speakers if s})
        if unknown:
            raise EvaluationError(f"--speakers names {unknown}, who have no labelled clip in {cache} "
                                  f"(speakers: {', '.join(sorted({s for s in data.speakers if s}))})")
    indices, left_out = scoreable(scorer, data, speakers)
    if not indices:
        why = "; ".join(f"{n} with {r}" for r, n in left_out.items()) or "none selected"
        raise EvaluationError(f"no clip of {cache} can be scored by {scorer.name} ({why}); its classes: "
                              f"{', '.join(scorer.classes)}")
    dev = torch.device(device or default_device())
    groups = adapt_groups(adapt_to, data, indices)
    # each speaker relative to the whole cache (any model); the whole set at once as avemo-predict --adapt
    # adapts a folder, where the model's record allows it (adaptation_scope)
    scope = adaptation_scope(scorer.record) if adapt_to == "all" else "all"
    population = cache_population(scorer.network.to(dev), data) if adapt_to == "speaker" else None
    logits = model_logits(scorer.network.to(dev), data, indices, dev, groups=groups, prior_clips=adapt_prior,
                          scope=scope, population=population)
    metrics, probs, _ = shared_class_metrics(logits, scorer.classes, data, indices)
    shared = [c for c in data.classes if c in scorer.classes]
    truth = np.array([shared.index(data.classes[data.labels[i]]) for i in indices])
    pred = probs.argmax(1)
    scored_speakers = {str(data.speakers[i]) for i in indices if data.speakers[i]}
    warnings = [w for w in (heard_speakers(scorer, scored_speakers),) if w]
    adapted = None
    if groups is not None:
        sizes = {str(g): groups.count(g) for g in dict.fromkeys(groups)}
        adapted = {"to": adapt_to, "clips": sizes, "prior_clips": adapt_prior, "scope": scope,
                   "relative_to_clips": sum(c.has_audio for c in data.clips) if population is not None else None}
        if population is not None and len({s for s in data.speakers if s}) < 2:
            warnings.append("--adapt speaker adapts each speaker relative to the whole cache, and this cache holds "
                            "one speaker: nothing changes; --adapt all adapts the model to the cache itself")
    report = {
        "model": scorer.name, "cache": str(cache), "classes": shared,
        "speakers": sorted(scored_speakers), "left_out": left_out,
        "per_speaker": per_speaker_uar(data, indices, truth, pred, shared) if scored_speakers else {},
        "adapted": adapted, "warnings": warnings, **metrics,
    }
    if out is not None:
        write_outputs(Path(out), report, data, indices, probs, shared)
    return report


def adapt_groups(adapt_to: str | None, data: TrainingData, indices: list[int]) -> list[str] | None:
    """The group of each scored clip for ``adapt_to`` (None: no adaptation)."""
    if adapt_to is None:
        return None
    if adapt_to == "all":
        return ["all"] * len(indices)
    if adapt_to != "speaker":
        raise EvaluationError(f"--adapt takes speaker or all, not '{adapt_to}'")
    missing = sum(1 for i in indices if not data.speakers[i])
    if missing:
        raise EvaluationError(f"--adapt speaker needs every scored clip's speaker, and {missing} have none: give "
                              "them in a --labels CSV (clip,label,speaker), or pass --adapt all to adapt to "
                              "all the scored clips as one group")
    return [str(data.speakers[i]) for i in indices]


def write_outputs(out: Path, report: dict, data: TrainingData, indices: list[int], probs: np.ndarray,
                  classes: list[str]) -> None:
    """report.json, predictions.csv (one row per scored clip) and confusion.csv/.png, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame({"clip": [data.clips[i].clip for i in indices],
                         "speaker": [data.speakers[i] or "" for i in indices],
                         "label": [data.classes[data.labels[i]] for i in indices],
                         "predicted": [classes[k] for k in probs.argmax(1)]})
    for k, c in enumerate(classes):
        rows[f"p_{c}"] = probs[:, k].round(6)
    with atomic_path(out / "predictions.csv") as tmp:
        rows.to_csv(tmp, index=False)
    write_json_atomic(out / "report.json", report)
    write_confusion(out, report["confusion"], classes,
                    f"{report['model']}: {report['n']} clips, UAR {report['uar']:.3f} WAR {report['accuracy']:.3f}")


def format_report(r: dict) -> str:
    lines = [f"{r['model']} on {r['cache']}: {r['n']} clips of {len(r['speakers'])} speakers, "
             f"classes {', '.join(r['classes'])}"]
    lines += [f"  left out: {n} clips with {why}" for why, n in r["left_out"].items()]
    if r.get("adapted"):
        lines.append(f"adapted to each {'speaker' if r['adapted']['to'] == 'speaker' else 'the whole set'}: "
                     + ", ".join(f"{g} ({n} clips)" for g, n in r["adapted"]["clips"].items())
                     + f"; the model's own statistics weighing as {r['adapted'].get('prior_clips', 0):g} clips"
                     + ("; BatchNorm statistics only (the mel normalisation is its front-end's)"
                        if r["adapted"].get("scope") == "batchnorm" else "")
                     + (f"; relative to the cache's {r['adapted']['relative_to_clips']} clips"
                        if r["adapted"].get("relative_to_clips") else ""))
    lines.append(f"UAR {r['uar']:.3f}  WAR {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}")
    width = max(len(c) for c in r["classes"])
    lines.append("recall per class: " + ", ".join(f"{c} {v:.2f} ({r['support'][c]})"
                                                  for c, v in r["per_class_recall"].items()))
    lines.append("confusion (rows: true class, columns: predicted)")
    lines.append(" " * (width + 2) + " ".join(f"{c[:5]:>5}" for c in r["classes"]))
    for c, row in zip(r["classes"], r["confusion"]):
        lines.append(f"  {c:<{width}}" + " ".join(f"{v:>5}" for v in row))
    if len(r["per_speaker"]) > 1:
        lines.append("UAR per speaker: " + ", ".join(f"{s} {v['uar']:.3f} ({v['n']})"
                                                     for s, v in r["per_speaker"].items()))
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avemo-evaluate",
        description="Score a trained model, a shipped one or an audio front-end on a labelled avemo cache: UAR, "
                    "WAR, macro-F1, per-class recall, the confusion matrix and UAR per speaker.")
    p.add_argument("cache", help="a labelled cache written by avemo-extract")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="CKPT|NAME",
                       help=f"a trained checkpoint (RUN/best.pt) or a shipped model's name (default: {DEFAULT_MODEL})")
    which.add_argument("--frontend", metavar="NAME|PATH",
                       help="score an audio front-end on its own instead (avemo-train-audio's frontend.pt, or a "
                            "shipped one by name: default)")
    p.add_argument("--speakers", help="comma-separated speakers to score (default: every speaker)")
    p.add_argument("--labels", help="CSV with clip,label[,speaker] columns (default: the cache's own labels)")
    p.add_argument("--adapt", choices=("speaker", "all"),
                   help="adapt the model's audio normalisation (mel and BatchNorm statistics, no labels used) to "
                        "each speaker's clips, relative to the whole cache, before scoring them (speaker; any model), "
                        "or to all scored clips at once (all; models trained on one corpus)")
    p.add_argument("--adapt-prior", type=float, default=PRIOR_CLIPS, metavar="CLIPS",
                   help="with --adapt, the model's own statistics weigh as much as this many of a group's clips "
                        f"(default {PRIOR_CLIPS:g}; 0: the group's statistics alone, plain AdaBN)"),
    p.add_argument("--out", help="folder for report.json, predictions.csv and confusion.csv/.png")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the CPUs this process may use)")
    return p


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    set_torch_threads(1, args.threads)
    reuse_freed_memory()
    speakers = [s.strip() for s in args.speakers.split(",") if s.strip()] if args.speakers else None
    try:
        report = evaluate_cache(args.cache, args.model, args.frontend, speakers, args.labels, args.device, args.out,
                                args.adapt, args.adapt_prior)
    except (EvaluationError, CacheError, CheckpointError, FinetuneError, ValueError) as e:
        print(f"avemo-evaluate: error: {e}", file=sys.stderr)
        return 2
    except NoSpaceError as e:
        print(f"avemo-evaluate: error: {e.strerror}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
