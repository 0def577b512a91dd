"""avemo-evaluate: a model, a shipped one or a front-end scored on a labelled cache."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from _synthetic_cache import make_cache
from avemo.features import ExtractionSettings
from test_audio_frontend import TINY, quick   # the same tiny network and quick recipe
from train.audio.cli import train_frontend
from train.cli import SplitOptions, run_training
from train.evaluate import EvaluationError, cli, evaluate_cache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    cache = make_cache(root / "cache", per_class=3)
    run_training(cache, root / "run", {"modalities": "av", **TINY}, quick(audio_init="none"),
                 SplitOptions(val_speakers="s3", test_speakers="s4"))
    return cache, root / "run"


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    root = tmp_path_factory.mktemp("fe")
    a = make_cache(root / "a", classes=("ang", "hap", "sad"), video=False, per_class=3)
    b = make_cache(root / "b", classes=("ang", "neu"), speakers=("s1", "s9"), video=False, per_class=3, seed=1)
    train_frontend([a, b], root / "run", ["a", "b"], dict(TINY), quick(audio_init="none"),
                   licence="research use only (test)", command="avemo-train-audio test")
    return root / "run" / "frontend.pt"


def test_a_run_scored_on_its_test_speaker_reproduces_its_own_report(run):
    cache, out = run
    own = json.loads((out / "report.json").read_text())
    r = evaluate_cache(cache, model=str(out / "best.pt"), speakers=["s4"], device="cpu")
    assert r["n"] == own["n"] == 9 and r["speakers"] == ["s4"]
    assert r["uar"] == pytest.approx(own["uar"]) and r["confusion"] == own["confusion"]
    assert r["warnings"] == [] and r["left_out"] == {}
    assert r["per_speaker"]["s4"]["uar"] == pytest.approx(r["uar"])


def test_speakers_it_trained_or_chose_its_epoch_on_are_named(run):
    cache, out = run
    r = evaluate_cache(cache, model=str(out / "best.pt"), device="cpu")
    assert r["n"] == 36 and set(r["per_speaker"]) == {"s1", "s2", "s3", "s4"}
    (warning,) = r["warnings"]
    assert "train: s1, s2" in warning and "val: s3" in warning and "s4" not in warning
    with pytest.raises(EvaluationError, match=r"--speakers names \['s7'\]"):
        evaluate_cache(cache, model=str(out / "best.pt"), speakers=["s7"], device="cpu")


def test_a_run_trained_on_every_clip_says_its_figures_are_training_figures(tmp_path):
    cache = make_cache(tmp_path / "c", video=False, per_class=2, speakers=("s1", "s2"))
    run_training(cache, tmp_path / "run", {"modalities": "audio", **TINY}, quick(audio_init="none", epochs=2),
                 SplitOptions(no_split=True))
    (warning,) = evaluate_cache(cache, model=str(tmp_path / "run" / "best.pt"), device="cpu")["warnings"]
    assert "every clip of its cache (--no-split)" in warning


def test_a_frontend_chooses_among_the_caches_classes_and_leaves_out_the_ones_it_never_learned(frontend, tmp_path):
    # the front-end knows ang, hap, neu, sad; this cache has ang, hap and a class of its own
    cache = make_cache(tmp_path / "c", classes=("ang", "hap", "xyz"), video=False, speakers=("s1", "s9"),
                       per_class=3, seed=2)
    r = evaluate_cache(cache, frontend=str(frontend), device="cpu", out=tmp_path / "out")
    assert r["classes"] == ["ang", "hap"] and r["n"] == 12
    assert r["left_out"] == {"class 'xyz', which the model does not know": 6}
    assert r["uar"] > 0.5                                      # the bands it learned are this cache's
    # it heard "a:s1" and "b:s1", "b:s9": the ids are named as a hint
    assert "a: s1" in r["warnings"][0] and "b: s1, s9" in r["warnings"][0]
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 12 and set(rows["predicted"]) <= {"ang", "hap"}
    np.testing.assert_allclose(rows[["p_ang", "p_hap"]].sum(axis=1), 1.0, atol=1e-5)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["uar"] == r["uar"] and (tmp_path / "out" / "confusion.png").stat().st_size > 0
    assert (rows["label"] == rows["predicted"]).mean() == pytest.approx(r["accuracy"])


def test_a_cache_made_otherwise_or_without_what_the_model_reads_is_refused_with_the_reason(frontend, run, tmp_path):
    other = make_cache(tmp_path / "mels20", video=False, settings=ExtractionSettings(n_mels=20, feature_dim=8))
    with pytest.raises(EvaluationError, match=r"n_mels 20 \(model: 16\)"):
        evaluate_cache(other, frontend=str(frontend), device="cpu")
    # an av model takes every setting into account, the face ones too
    faces = make_cache(tmp_path / "faces", settings=ExtractionSettings(n_mels=16, feature_dim=8, frames=8))
    with pytest.raises(EvaluationError, match=r"frames 8 \(model: 16\)"):
        evaluate_cache(faces, model=str(run[1] / "best.pt"), device="cpu")
    silent = make_cache(tmp_path / "silent", audio=False, classes=("ang", "hap"))
    with pytest.raises(EvaluationError, match="32 with no usable audio, the only thing the model reads"):
        evaluate_cache(silent, frontend=str(frontend), device="cpu")


def test_the_command_prints_the_table_or_json_and_says_what_is_wrong(run, tmp_path, capsys):
    cache, out = run
    assert cli([str(cache), "--model", str(out / "best.pt"), "--speakers", "s4", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "UAR" in text and "confusion (rows: true class, columns: predicted)" in text and "9 clips" in text
    assert cli([str(cache), "--model", str(out / "best.pt"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 36
    assert cli([str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no manifest.csv" in capsys.readouterr().err


def test_a_cache_embedded_by_an_earlier_default_encoder_is_refused_and_named():
    from avemo.encoders import WEIGHTS_DIR, file_sha256
    from train.evaluate import check_settings, load_scorer
    scorer = load_scorer()                               # the shipped default model reads faces
    old = {**scorer.settings, "encoder_sha256": file_sha256(WEIGHTS_DIR / "default-v1.pt")}
    with pytest.raises(EvaluationError, match="encoder_sha256.*shipped encoder 'default-v1'.*as 'default'"):
        check_settings(scorer, old, "CACHE")
    check_settings(scorer, dict(scorer.settings), "CACHE")


def _speaker_with_a_voice_of_its_own(cache, speaker: str, offset: np.ndarray) -> None:
    """Every clip of ``speaker`` gets the same per-bin offset: a timbre (or microphone) no training speaker has."""
    from avemo.features import ClipFeatures
    manifest = pd.read_csv(cache / "manifest.csv", dtype=str)
    for name in manifest.loc[manifest.speaker == speaker, "feature_file"]:
        clip = ClipFeatures.load(cache / name)
        clip.arrays["mel"] = (clip.arrays["mel"] + offset[:, None]).astype(np.float32)
        clip.save(cache / name)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """An audio model trained on three speakers; a fourth whose voice lights the first class's band and dims
    every other band in every clip, so that to the model all their clips sound like the first class.

    The model standardises mels globally: the test is about adaptation undoing a per-bin offset. Under the
    loudness step (``level``) this toy offset is not one: with 16 bins and one band a class, it changes each
    class's loudness by a different amount (up to 1.3 nats), which the step then subtracts clip by clip
    (``level`` and adaptation are tested together in test_model)."""
    root = tmp_path_factory.mktemp("adapt")
    cache = make_cache(root / "cache", video=False, per_class=8)
    offset = np.zeros(16, np.float32)
    offset[0:4] = 2.0                           # class "ang" lights bins 0-3 by 1.5, "hap" 4-7, "sad" 8-11
    offset[4:16] = -1.5
    _speaker_with_a_voice_of_its_own(cache, "s4", offset)
    run_training(cache, root / "run", {"modalities": "audio", "audio_norm": "global", **TINY},
                 quick(audio_init="none", epochs=12), SplitOptions(test_speakers="s4"))
    return cache, root / "run" / "best.pt"


def test_adapting_to_a_new_speakers_clips_undoes_the_shift_of_their_voice(shifted, tmp_path):
    # 10 seeds of the fixture's fit (2026-11-25): plain 0.333 each; s4 alone, its statistics only, 1.000 each;
    # relative to the cache, its statistics only, 0.833-1.000; with the model's own blended in, 0.750-1.000
    # and 0.417-0.875 (a quarter to a half of the shift stays, and where the fit drew its boundary decides)
    cache, model = shifted
    plain = evaluate_cache(cache, str(model), speakers=["s4"])
    assert plain["uar"] < 0.4
    # s4 alone, its own statistics replacing the model's: the whole shift goes
    whole = evaluate_cache(cache, str(model), speakers=["s4"], adapt_to="all", adapt_prior=0)
    assert whole["uar"] >= 0.95 and whole["adapted"]["relative_to_clips"] is None
    # relative to the whole cache, of which s4 is a quarter: three quarters of its shift go
    relative = evaluate_cache(cache, str(model), speakers=["s4"], adapt_to="speaker", adapt_prior=0)
    assert relative["uar"] >= 0.75
    # the defaults blend the model's own statistics in as 10 clips: less of the shift goes, never none of it
    adapted = evaluate_cache(cache, str(model), speakers=["s4"], adapt_to="speaker", out=tmp_path / "ev")
    assert adapted["uar"] >= plain["uar"]
    assert evaluate_cache(cache, str(model), speakers=["s4"], adapt_to="all")["uar"] >= plain["uar"] + 0.3
    assert adapted["adapted"] == {"to": "speaker", "clips": {"s4": 24}, "prior_clips": 10, "scope": "all",
                                  "relative_to_clips": 96}
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["uar"] == adapted["uar"]
    # the training speakers' own statistics are what the model already has: adapting to them changes little
    assert evaluate_cache(cache, str(model), speakers=["s1"], adapt_to="speaker")["uar"] >= 0.8


def test_the_command_adapts_per_speaker_and_says_so(shifted, tmp_path, capsys):
    cache, model = shifted
    assert cli([str(cache), "--model", str(model), "--speakers", "s3,s4", "--adapt", "speaker"]) == 0
    out = capsys.readouterr().out
    assert "adapted to each speaker: s3 (24 clips), s4 (24 clips); the model's own statistics weighing as 10" in out
    # a speaker of three clips is adapted to without a warning (they weigh 3 against the model's 10), and
    # --adapt-prior sets that weight (0: the clips' statistics alone), recorded in the report
    few = pd.read_csv(cache / "manifest.csv", dtype=str)
    few = few[few.speaker.isin(["s1", "s2", "s3"]) | few["clip"].str.contains("_0")]
    few[["clip", "label", "speaker"]].to_csv(tmp_path / "few.csv", index=False)
    report = evaluate_cache(cache, str(model), labels=tmp_path / "few.csv", speakers=["s4"], adapt_to="speaker")
    assert report["adapted"]["clips"] == {"s4": 3} and not report["warnings"]
    assert cli([str(cache), "--model", str(model), "--labels", str(tmp_path / "few.csv"), "--speakers", "s4",
                "--adapt", "speaker", "--adapt-prior", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapted"]["prior_clips"] == 0
    # clips without a speaker cannot be grouped by speaker
    from types import SimpleNamespace
    from train.evaluate import adapt_groups
    data = SimpleNamespace(speakers=["a", None, "b"])
    assert adapt_groups("speaker", data, [0, 2]) == ["a", "b"] and adapt_groups("all", data, [0, 1]) == ["all"] * 2
    with pytest.raises(EvaluationError, match="1 have none.*--adapt all"):
        adapt_groups("speaker", data, [0, 1, 2])
