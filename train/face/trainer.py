"""Training an expression encoder on a class-folder dataset, with resume and a test report.

Run folder (``--out RUN``):

- ``last.pt``    training state after the latest finished epoch (for ``--resume``)
- ``best.pt``    encoder file (avemo-face-encoder) of the best epoch on validation
- ``encoder.pt`` the final encoder: best weights + test metrics + how it was trained
- ``log.txt``, ``history.json``, ``test_report.json``
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import avemo
from avemo.checkpoint import load_checkpoint, save_checkpoint
from avemo.encoders import (FaceEncoder, build_encoder, export_encoder, load_encoder, normalize,
                            resolve_arch_cfg)
from avemo.io import write_json_atomic
from train.face.augment import AugmentConfig, augment
from train.face.data import ImageSet, read_dataset
from train.metrics import classification_metrics

STATE_FORMAT = "avemo-face-train-state"
STATE_VERSION = 1

@dataclass
class TrainConfig:
    data_dir: str = ""
    arch: str = "efficientface"
    arch_cfg: dict | str = field(default_factory=dict)   # a preset name, or settings over the default preset
    input_size: int = 48
    grayscale: bool = True
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"             # sgd (nesterov) | adamw
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0         # linear warm-up, then cosine decay to 0, stepped per batch
    time_budget: float | None = None   # minutes for all epochs (validation included); the schedule follows the clock
    label_smoothing: float = 0.0
    ldg: str | None = None             # label-distribution generator: an encoder name or file
    seed: int = 0
    augment: dict = field(default_factory=lambda: dataclasses.asdict(AugmentConfig()))

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch size must be >= 2 (batch norm needs it), got {self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ldg and self.label_smoothing:
            raise ValueError("label smoothing applies to hard labels; with --ldg the targets are the generator's "
                             "distributions, so leave --label-smoothing out")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time budget must be > 0 minutes, got {self.time_budget}")
        if self.input_size < 16:
            raise ValueError(f"input size must be >= 16 pixels, got {self.input_size}")

    def model_cfg(self) -> dict:
        """The resolved settings the network is built with (and its encoder file records)."""
        return {**resolve_arch_cfg(self.arch, self.arch_cfg), "in_chans": 1 if self.grayscale else 3}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def distribution_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution, -sum_j t_j log p_j, averaged over the batch.

    With one-hot ``target`` it is exactly the usual cross-entropy (label smoothing: smoothed one-hot).
    """
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def label_distribution_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EfficientFace's label-distribution loss at the paper's scale:

        L = -1/(N c) sum_i sum_j d_ij log p_ij

    with N images, c classes, d the generator's distribution and p the student's softmax. The
    official training code computes the same, ``torch.mean(-d * torch.log(p))`` over all N*c
    entries, with SGD at lr 0.1; so at the same ``--lr`` an LDG run steps 1/c as far as a
    hard-label run, as the paper's does.
    """
    return distribution_cross_entropy(logits, target) / logits.shape[-1]


class LabelDistributionGenerator:
    """A trained encoder whose softmax output on the same augmented image is the target."""

    def __init__(self, encoder: FaceEncoder, classes: list[str]):
        if encoder.classes != list(classes):
            raise ValueError(f"label-distribution generator '{encoder.name}' has classes {encoder.classes}, "
                             f"the data has {list(classes)}: they must be the same, in the same order")
        self.encoder = encoder

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # images: float 0..255 [B, C, S, S] in the student's contract -> [B, K] probabilities
        crops = images.round().to(torch.uint8).permute(0, 2, 3, 1)      # [B, S, S, C]
        # clone: classify runs in inference mode, and its tensors cannot enter the autograd graph
        return self.encoder.classify(crops).to(images.device).clone()


def make_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    onehot = F.one_hot(labels, num_classes).float()
    return onehot * (1 - smoothing) + smoothing / num_classes


def lr_at(progress: float, step: int, warmup_steps: int, base: float) -> float:
    """Cosine decay over ``progress`` in [0, 1], times a linear warm-up over the first steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on biases and norm parameters (1-d tensors)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def predict_probs(model: nn.Module, pixels: torch.Tensor, mean, std, device: torch.device,
                  batch_size: int = 512, flip_tta: bool = False) -> torch.Tensor:
    """[N, K] softmax probabilities for uint8 pixels already in the model's contract."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = normalize(pixels[i:i + batch_size].to(device), mean, std)
        with _autocast(device):
            p = model(x).float().softmax(-1)
            if flip_tta:
                p = (p + model(x.flip(-1)).float().softmax(-1)) / 2
        out.append(p.cpu())
    return torch.cat(out)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, device: str = "cpu", log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.generator: dict | None = None     # --ldg: the generator's identity, recorded with the run
        self.device = torch.device(device)
        build_encoder(cfg.arch, 2, **cfg.model_cfg())   # fail on bad architecture settings before decoding data

    # ---- data ----
    def load_data(self) -> None:
        t = time.time()
        self.data = read_dataset(self.cfg.data_dir, self.cfg.input_size, self.cfg.grayscale)
        self.classes = self.data["train"].classes
        train = self.data["train"].pixels
        if len(train) < 2:
            raise ValueError(f"{self.cfg.data_dir}: the training split needs at least 2 images")
        flat = train.transpose(0, 1).reshape(train.shape[1], -1).float() / 255
        self.mean = flat.mean(1).tolist()
        self.std = flat.std(1).clamp(min=1e-3).tolist()
        sizes = ", ".join(f"{s} {len(d)}" for s, d in self.data.items())
        self.log(f"data: {sizes} images, {len(self.classes)} classes ({', '.join(self.classes)}), "
                 f"decoded in {time.time() - t:.1f}s")

    # ---- state ----
    def fresh_state(self) -> dict:
        torch.manual_seed(self.cfg.seed)
        self.model = build_encoder(self.cfg.arch, len(self.classes), **self.cfg.model_cfg()).to(self.device)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        return {"epoch": 0, "step": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "history": [], "train_seconds": 0.0}

    def restore(self, state: dict) -> dict:
        self.model = build_encoder(self.cfg.arch, len(self.classes), **self.cfg.model_cfg()).to(self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen = torch.Generator()
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state["progress"]

    def save_state(self, progress: dict) -> None:
        payload = {
            "config": self.cfg.to_dict(), "classes": self.classes, "mean": self.mean, "std": self.std,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "progress": progress,
        }
        save_checkpoint(self.out / "last.pt", payload, STATE_FORMAT, STATE_VERSION)

    # ---- loop ----
    def fit(self, progress: dict, ldg: LabelDistributionGenerator | None = None) -> dict:
        cfg, train = self.cfg, self.data["train"]
        batch = min(cfg.batch_size, len(train))
        steps_per_epoch = len(train) // batch          # drop the ragged last batch: batch norm needs > 1 sample
        total, warmup = steps_per_epoch * cfg.epochs, int(steps_per_epoch * cfg.warmup_epochs)
        budget = cfg.time_budget * 60 if cfg.time_budget else math.inf
        aug = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.augment.items()})
        pixels, labels = train.pixels.to(self.device), train.labels.to(self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        channels_last = self.device.type == "cpu"     # measured: depth-wise convs run ~1.5x faster on CPU
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        for epoch in range(progress["epoch"], cfg.epochs):
            if progress.get("budget_spent"):
                break
            t0 = time.time()
            self.model.train()
            order = torch.randperm(len(train), generator=self.gen)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            for b in range(steps_per_epoch):
                # with a time budget the schedule follows the clock, so it ends annealed whatever the speed
                frac = max(progress["step"] / total, (progress["train_seconds"] + time.time() - t0) / budget)
                if frac >= 1 and b > 0:
                    progress["budget_spent"] = True
                    break
                idx = order[b * batch:(b + 1) * batch].to(self.device)
                images = augment(pixels[idx], aug, self.gen)          # float 0..255 [B, C, S, S]
                y = labels[idx]
                target = ldg(images) if ldg else make_targets(y, len(self.classes), cfg.label_smoothing)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr_at(frac, progress["step"], warmup, cfg.lr)
                x = normalize(images, self.mean, self.std)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(self.device):
                    logits = self.model(x)
                # LDG targets take the paper's 1/(N c) scale; hard labels the standard cross-entropy
                loss = (label_distribution_loss if ldg else distribution_cross_entropy)(logits, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {b}: "
                                             "lower --lr or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(self.optimizer)
                scaler.update()
                progress["step"] += 1
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(-1) == y).sum().item()
                seen += len(y)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if bar is not None:
                bar.close()
            val = self.evaluate("validation")
            seconds = time.time() - t0
            progress["train_seconds"] += seconds
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                   "train_accuracy": correct / seen, "val_accuracy": val["accuracy"], "val_uar": val["uar"],
                   "seconds": round(seconds, 1)}
            progress["history"].append(row)
            progress["epoch"] = epoch + 1
            improved = val["accuracy"] > progress["best_val_accuracy"]
            if improved:
                progress["best_val_accuracy"], progress["best_epoch"] = val["accuracy"], epoch + 1
                self.export(self.out / "best.pt", metrics={"validation": _brief(val), "epoch": epoch + 1})
            write_json_atomic(self.out / "history.json", progress["history"])
            self.save_state(progress)        # last: a crash before it redoes this epoch, never loses best.pt
            self.log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc "
                     f"{row['train_accuracy']:.4f}  val acc {val['accuracy']:.4f}  val UAR {val['uar']:.4f}  "
                     f"lr {row['lr']:.4g}  {seconds:.0f}s{'  *best' if improved else ''}")
            if progress.get("budget_spent"):
                self.log(f"time budget of {cfg.time_budget:g} min spent after {b} batches of epoch {epoch + 1}")
        return progress

    def evaluate(self, split: str, flip_tta: bool = False) -> dict:
        d: ImageSet = self.data[split]
        probs = predict_probs(self.model, d.pixels, self.mean, self.std, self.device, flip_tta=flip_tta)
        return classification_metrics(d.labels, probs.argmax(-1), self.classes)

    def export(self, path: Path, metrics: dict, training: dict | None = None) -> None:
        export_encoder(path, self.model, self.cfg.arch, self.cfg.model_cfg(), self.classes, self.cfg.input_size,
                       self.cfg.grayscale, self.mean, self.std, metrics=metrics, training=training)


def run_training(cfg: TrainConfig, out: str | Path, resume: bool = False, device: str = "cpu",
                 explicit: dict | None = None, command: str = "", log=print) -> dict:
    """Train (or continue) a run; returns the final test report. ``explicit``: user-set config values."""
    out = Path(out)
    state_path = out / "last.pt"
    state = None
    if state_path.exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it "
                                  "or choose another --out")
        state = load_checkpoint(state_path, STATE_FORMAT, (STATE_VERSION,))
        saved = state["config"]
        clash = {k: (saved.get(k), v) for k, v in (explicit or {}).items() if saved.get(k) != v}
        if clash:
            detail = "; ".join(f"{k}: run has {a!r}, asked for {b!r}" for k, (a, b) in clash.items())
            raise ValueError(f"{out}: --resume continues the saved run with its own settings; {detail}")
        cfg = TrainConfig(**saved)
    elif resume:
        log(f"{out}: nothing to resume (no last.pt); starting a new run")
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out, device=device, log=lambda m: _log_line(out, m, log))
    ldg = None
    if cfg.ldg:
        ldg_encoder = load_encoder(cfg.ldg, device=device)
        # the path alone names nothing once the run is copied elsewhere: the file's hash and figures do
        trainer.generator = {"name": ldg_encoder.name, "sha256": ldg_encoder.sha256, "arch": ldg_encoder.arch,
                             "test": (ldg_encoder.metrics or {}).get("test", {}).get("accuracy")}
        began = (state or {}).get("progress", {}).get("generator", trainer.generator)["sha256"]
        if began != ldg_encoder.sha256:
            raise ValueError(f"{out}: --resume needs the generator the run began with; {cfg.ldg} is another file "
                             f"(sha256 {ldg_encoder.sha256[:12]}... vs {began[:12]}...)")
        trainer.log(f"label distribution training: targets from '{ldg_encoder.name}' ({ldg_encoder.arch})")
    trainer.load_data()
    if cfg.ldg:
        ldg = LabelDistributionGenerator(ldg_encoder, trainer.classes)
    if state is not None:
        if state["classes"] != trainer.classes:
            raise ValueError(f"{out}: the run was trained on classes {state['classes']}, "
                             f"the data now has {trainer.classes}")
        trainer.mean, trainer.std = state["mean"], state["std"]
        progress = trainer.restore(state)
        trainer.log(f"resuming after epoch {progress['epoch']}/{cfg.epochs}")
    else:
        write_json_atomic(out / "config.json", cfg.to_dict())
        progress = trainer.fresh_state()
        n_params = sum(p.numel() for p in trainer.model.parameters())
        trainer.log(f"{cfg.arch} {trainer.model.feature_dim}-d features, {n_params / 1e6:.2f}M parameters, "
                    f"input {cfg.input_size}px {'grey' if cfg.grayscale else 'RGB'}, device {trainer.device}")
    progress.setdefault("commands", []).append(command)
    if trainer.generator:
        progress["generator"] = trainer.generator
    if progress["epoch"] < cfg.epochs and not progress.get("budget_spent"):
        progress = trainer.fit(progress, ldg)
    return finish(trainer, progress)


def finish(trainer: Trainer, progress: dict) -> dict:
    """Best-on-validation weights -> test report (plain and mirror-averaged) -> encoder.pt."""
    best = load_checkpoint(trainer.out / "best.pt", "avemo-face-encoder", (1,))
    trainer.model.load_state_dict(best["state_dict"])
    test = trainer.evaluate("test")
    test_tta = trainer.evaluate("test", flip_tta=True)
    val = trainer.evaluate("validation")
    report = {"test": test, "test_flip_tta": _brief(test_tta), "validation": _brief(val),
              "best_epoch": progress["best_epoch"], "epochs": trainer.cfg.epochs}
    write_json_atomic(trainer.out / "test_report.json", report)
    training = {
        # the invocations that made it: the first one, then any --resume
        "command": progress["commands"][0], "resumed_with": progress["commands"][1:],
        "config": trainer.cfg.to_dict(), "epochs": trainer.cfg.epochs, "epochs_run": progress["epoch"],
        "best_epoch": progress["best_epoch"], "train_seconds": round(progress["train_seconds"], 1),
        "history": progress["history"], "data": {s: len(d) for s, d in trainer.data.items()},
        "hardware": _hardware(trainer.device), "avemo_version": avemo.__version__, "torch": str(torch.__version__),
    }
    if progress.get("generator"):
        training["ldg_generator"] = progress["generator"]
    metrics = {"test": _brief(test) | {"confusion": test["confusion"]}, "test_flip_tta": _brief(test_tta),
               "validation": _brief(val)}
    trainer.export(trainer.out / "encoder.pt", metrics=metrics, training=training)
    trainer.log(f"test: accuracy {test['accuracy']:.4f}  UAR {test['uar']:.4f}  (mirror TTA: accuracy "
                f"{test_tta['accuracy']:.4f}  UAR {test_tta['uar']:.4f})  best epoch {progress['best_epoch']}")
    trainer.log("test confusion (rows true, cols predicted; " + ", ".join(trainer.classes) + "):\n"
                + "\n".join("  " + " ".join(f"{v:5d}" for v in row) for row in test["confusion"]))
    trainer.log(f"encoder written to {trainer.out / 'encoder.pt'}")
    return report


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("n", "accuracy", "uar", "per_class_recall")}


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, {os.cpu_count()} cores visible"


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _progress(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _log_line(out: Path, message: str, log) -> None:
    log(message)
    with open(out / "log.txt", "a", encoding="utf-8") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
