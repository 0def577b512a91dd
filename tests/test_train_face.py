"""avemo-train-face: class-folder reading, losses, augmentation, a real short run, resume, --evaluate."""
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avemo.encoders import build_encoder, export_encoder, load_encoder
from train.face import trainer as trainer_mod
from train.face.augment import AugmentConfig, augment
from train.face.cli import evaluate, main
from train.face.data import DataError, read_dataset, read_image_folder
from train.metrics import classification_metrics
from train.face.trainer import (LabelDistributionGenerator, TrainConfig, distribution_cross_entropy,
                                label_distribution_loss, lr_at,
                                make_targets, run_training)

torch.set_num_threads(1)
CLASSES = ["down", "left", "ring"]
TINY = {"stages_repeats": [1, 1, 1], "stages_out_channels": [8, 16, 32, 64, 32]}


def face_like(kind: str, size: int, rng) -> np.ndarray:
    """A synthetic 'expression': where the bright part sits tells the class; noise and jitter on top."""
    img = rng.normal(90, 25, (size, size)).clip(0, 255)
    h = size // 2 + int(rng.integers(-3, 4))
    if kind == "down":
        img[h:] += 110
    elif kind == "left":
        img[:, :h] += 110
    else:
        yy, xx = np.mgrid[:size, :size]
        r = np.hypot(yy - size / 2, xx - size / 2)
        img[(r > size / 5) & (r < size / 3)] += 110
    return img.clip(0, 255).astype(np.uint8)


def make_dataset(root, per_class=(24, 8, 8), rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    for split, n in zip(("train", "validation", "test"), per_class):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                size = int(rng.integers(36, 64))
                img = face_like(c, size, rng)
                if i % 3 == 0:              # colour files and grey files, JPEG and PNG
                    img = cv2.merge([img, img, (img * 0.8).astype(np.uint8)])
                cv2.imwrite(str(d / f"{i}.{'png' if i % 2 else 'jpg'}"), img)
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def quick_config(data, **kw):
    base = dict(data_dir=str(data), arch="efficientface", arch_cfg=TINY, input_size=32, epochs=6, batch_size=12,
                optimizer="adamw", lr=5e-3, weight_decay=1e-4, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


# ---- losses, schedule, metrics, augmentation ----

def test_distribution_loss_is_cross_entropy_for_one_hot_targets():
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 4, 3, 2, 2])
    torch.testing.assert_close(distribution_cross_entropy(logits, make_targets(y, 5, 0.0)), F.cross_entropy(logits, y))
    torch.testing.assert_close(distribution_cross_entropy(logits, make_targets(y, 5, 0.1)),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    soft = torch.softmax(torch.randn(6, 5), -1)
    expected = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(distribution_cross_entropy(logits, soft), expected)


def test_ldg_loss_is_the_papers_mean_over_images_and_classes():
    # EfficientFace: L = -1/(N c) sum_i sum_j d_ij log p_ij (official code: torch.mean(-d * log p))
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]], requires_grad=True)
    d = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # by hand: p_1 = (1/3, 1/3, 1/3) -> -sum d log p = log 3; p_2 = (1/2, 1/4, 1/4) -> log 2; N = 2, c = 3
    loss = label_distribution_loss(logits, d)
    assert loss.item() == pytest.approx((math.log(3) + math.log(2)) / (2 * 3))
    loss.backward()
    p = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]])
    torch.testing.assert_close(logits.grad, (p - d) / 6)          # dL/dz = (p - d) / (N c)
    # the hard-label path stays the standard cross-entropy, c times larger
    y = torch.tensor([0, 0])
    torch.testing.assert_close(distribution_cross_entropy(logits.detach(), make_targets(y, 3, 0.0)),
                               F.cross_entropy(logits.detach(), y))


def test_arch_cfg_presets_by_name_resolve_into_the_recorded_settings(dataset, capsys):
    cfg = TrainConfig(arch="transfer", arch_cfg="paper", input_size=112, grayscale=False)
    resolved = cfg.model_cfg()
    assert resolved["stem_depth"] == [3, 4, 14] and resolved["embed_dim"] == 768 and resolved["in_chans"] == 3
    assert TrainConfig(arch="efficientface").model_cfg() == {"stem_stride": 1, "in_chans": 1}
    assert TrainConfig(arch="efficientface", arch_cfg={"stem_pool": False}).model_cfg() == \
        {"stem_stride": 1, "stem_pool": False, "in_chans": 1}
    # an unknown name is refused before any data is read, with the choices
    assert main([str(dataset), "--out", str(dataset.parent / "run"), "--arch", "transfer", "--arch-cfg", "big"]) == 2
    assert "unknown preset 'big' for 'transfer' (choose from small, paper" in capsys.readouterr().err
    assert not (dataset.parent / "run" / "last.pt").exists()


def test_label_distribution_generator_targets_are_its_softmax(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("efficientface", 3, in_chans=1, stem_stride=1, **TINY).eval()
    export_encoder(tmp_path / "ldg.pt", model, "efficientface", dict(in_chans=1, stem_stride=1, **TINY),
                   CLASSES, 32, True, [0.4], [0.2])
    ldg = LabelDistributionGenerator(load_encoder(tmp_path / "ldg.pt"), CLASSES)
    images = torch.randint(0, 256, (4, 1, 32, 32)).float()
    target = ldg(images)
    expected = model((images / 255 - 0.4) / 0.2).softmax(-1)
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be the same"):
        LabelDistributionGenerator(load_encoder(tmp_path / "ldg.pt"), ["x", "y", "z"])
    # the generator's distributions are the targets: a smoothing setting would be silently dropped, so it is refused
    with pytest.raises(ValueError, match="leave --label-smoothing out"):
        TrainConfig(ldg=str(tmp_path / "ldg.pt"), label_smoothing=0.1)


def test_schedule_warms_up_then_anneals_to_zero():
    assert lr_at(0.0, 0, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(0.0, 9, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(0.5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(1.0, 200, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_classification_report_counts_and_subsets():
    y_true = torch.tensor([0, 0, 1, 1, 1, 2])
    y_pred = torch.tensor([0, 1, 1, 1, 0, 2])
    r = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert r["n"] == 6 and r["accuracy"] == pytest.approx(4 / 6)
    assert r["uar"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert r["confusion"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    # two true classes out of a 4-class model, listed in another order
    sub = classification_metrics(torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2]), ["d", "c"], ["c", "x", "y", "d"])
    assert sub["per_class_recall"] == {"d": 1.0, "c": 0.5} and sub["accuracy"] == pytest.approx(2 / 3)


def test_augmentation_is_a_pure_mirror_when_everything_else_is_off():
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    cfg = AugmentConfig(flip=1.0, rotate=0, scale=0, shift=0, brightness=0, contrast=0, erase=0)
    torch.testing.assert_close(augment(x, cfg), x.flip(-1).float(), atol=1e-3, rtol=0)
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255


# ---- bad input ----

def test_unreadable_files_are_skipped_counted_and_named(dataset):
    cls = dataset / "train" / "down"
    (cls / "notes.txt").write_text("not an image")
    (cls / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (cls / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\).*(broken\.jpg|empty\.png|notes\.txt)") as rec:
        images = read_image_folder(dataset / "train", 32, True)
    message = str(rec[0].message)
    assert all(name in message for name in ("notes.txt", "broken.jpg", "empty.png"))
    assert len(images.skipped) == 3 and len(images) == 3 * 24
    assert images.pixels.shape == (72, 1, 32, 32) and images.classes == CLASSES


def test_empty_class_is_an_error(dataset):
    (dataset / "validation" / "left").joinpath("x.txt").write_text("no")
    for f in (dataset / "validation" / "left").glob("*.*g"):
        f.unlink()
    with pytest.raises(DataError, match="class 'left' has no readable images"):
        read_dataset(dataset, 32, True)
    (dataset / "test" / "extra").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        read_image_folder(dataset / "test", 32, True)


def test_missing_split_and_empty_folder_are_errors(dataset, tmp_path):
    import shutil
    shutil.rmtree(dataset / "validation")
    with pytest.raises(DataError, match="missing the 'validation' split"):
        read_dataset(dataset, 32, True)
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        read_image_folder(tmp_path / "blank", 32, True)
    with pytest.raises(DataError, match="no such data directory"):
        read_dataset(tmp_path / "nowhere", 32, True)


def test_class_missing_from_training_is_an_error(dataset):
    (dataset / "test" / "extra").mkdir()
    cv2.imwrite(str(dataset / "test" / "extra" / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="extra not among the known classes"):
        read_dataset(dataset, 32, True)


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "no such data directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--epochs", "3"])          # neither data nor --evaluate


# ---- a real short run ----

def test_short_run_beats_chance_and_exports_an_encoder(dataset, tmp_path):
    out = tmp_path / "run"
    report = run_training(quick_config(dataset), out, log=lambda m: None)
    assert report["test"]["accuracy"] > 0.75           # chance is 1/3
    for name in ("last.pt", "best.pt", "encoder.pt", "log.txt", "history.json", "test_report.json"):
        assert (out / name).is_file(), name
    enc = load_encoder(out / "encoder.pt")
    assert enc.classes == CLASSES and enc.metrics["test"]["accuracy"] == report["test"]["accuracy"]
    assert enc.training["epochs"] == 6 and len(enc.training["history"]) == 6
    # --evaluate on the test split agrees with the run's own test report
    r = evaluate(dataset / "test", str(out / "encoder.pt"))
    assert r["n"] == 24 and r["accuracy"] == pytest.approx(report["test"]["accuracy"])


def test_resume_continues_from_the_saved_epoch(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = quick_config(dataset, epochs=3, arch_cfg={"stages_repeats": [1, 1, 1],
                                                    "stages_out_channels": [4, 8, 16, 16, 16]})
    original = trainer_mod.Trainer.save_state

    def save_then_die(self, progress):
        original(self, progress)
        if progress["epoch"] == 2:
            raise KeyboardInterrupt          # killed right after epoch 2 was saved

    monkeypatch.setattr(trainer_mod.Trainer, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, out, log=lambda m: None)
    monkeypatch.setattr(trainer_mod.Trainer, "save_state", original)
    first = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in first] == [1, 2]

    with pytest.raises(FileExistsError, match="--resume"):
        run_training(cfg, out, log=lambda m: None)
    with pytest.raises(ValueError, match="lr: run has 0.005, asked for 0.1"):
        run_training(cfg, out, resume=True, explicit={"lr": 0.1}, log=lambda m: None)

    logged = []
    run_training(cfg, out, resume=True, log=logged.append)
    assert any("resuming after epoch 2/3" in m for m in logged)
    assert sum(m.startswith("epoch ") for m in logged) == 1       # only epoch 3 was trained
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == first                                     # the finished epochs were kept, not redone
    assert len(load_encoder(out / "encoder.pt").training["resumed_with"]) == 1


def test_ldg_run_and_time_budget(dataset, tmp_path):
    teacher = tmp_path / "teacher"
    run_training(quick_config(dataset, epochs=1), teacher, log=lambda m: None)
    logged = []
    cfg = quick_config(dataset, epochs=50, ldg=str(teacher / "encoder.pt"), time_budget=0.05)
    report = run_training(cfg, tmp_path / "student", log=logged.append)
    assert any("label distribution training" in m for m in logged)
    assert any("time budget of 0.05 min spent" in m for m in logged)
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert len(history) < 50 and math.isfinite(history[-1]["train_loss"])
    assert 0 <= report["test"]["accuracy"] <= 1
    # the generator is named by its hash in the exported file, and a resume refuses another one
    generator = load_encoder(teacher / "encoder.pt")
    student = load_encoder(tmp_path / "student" / "encoder.pt")
    assert student.training["ldg_generator"]["sha256"] == generator.sha256
    assert student.training["ldg_generator"]["test"] == generator.metrics["test"]["accuracy"]
    other = tmp_path / "other"               # a generator trained again at the same path
    run_training(quick_config(dataset, epochs=1, seed=1), other, log=lambda m: None)
    (teacher / "encoder.pt").write_bytes((other / "encoder.pt").read_bytes())
    with pytest.raises(ValueError, match="generator the run began with"):
        run_training(cfg, tmp_path / "student", resume=True, log=lambda m: None)


def test_cli_evaluate_json_on_a_class_subset(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(dataset), "--out", str(out), "--arch-cfg", json.dumps(TINY), "--input-size", "32",
                 "--epochs", "1", "--batch-size", "12", "--optimizer", "adamw", "--lr", "0.003",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    import shutil
    shutil.rmtree(dataset / "test" / "ring")                      # a subset of the encoder's classes
    assert main(["--evaluate", str(dataset / "test"), "--encoder", str(out / "encoder.pt"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 16 and set(r["per_class_recall"]) == {"down", "left"}
    assert {"accuracy", "uar", "n", "per_class_recall"} <= set(r)
    (dataset / "test" / "smile").mkdir()
    cv2.imwrite(str(dataset / "test" / "smile" / "a.png"), np.zeros((8, 8), np.uint8))
    assert main(["--evaluate", str(dataset / "test"), "--encoder", str(out / "encoder.pt"), "--json"]) == 2
    assert "smile are not classes of encoder" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_short_run_on_cuda_with_autocast_beats_chance(dataset, tmp_path):
    report = run_training(quick_config(dataset), tmp_path / "run", device="cuda", log=lambda m: None)
    assert report["test"]["accuracy"] > 0.6
    enc = load_encoder(tmp_path / "run" / "encoder.pt", device="cuda")
    assert enc.embed(np.zeros((2, 112, 112, 3), np.uint8)).device.type == "cpu"


def test_transfer_trains_exports_and_loads(dataset, tmp_path):
    cfg = quick_config(dataset, arch="transfer", epochs=1,
                       arch_cfg={"stem_channels": [8, 16, 32], "embed_dim": 32, "heads": 2, "depth": 1})
    report = run_training(cfg, tmp_path / "run", log=lambda m: None)
    enc = load_encoder(tmp_path / "run" / "encoder.pt")
    assert enc.arch == "transfer" and enc.feature_dim == 32 and enc.arch_cfg["embed_dim"] == 32
    assert enc.classify(np.zeros((2, 40, 40, 3), np.uint8)).shape == (2, 3)
    assert report["test"]["n"] == 24
