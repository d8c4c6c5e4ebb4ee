"""MG-CLIP: Mind the Gap -- preserving and compensating for the modality gap in
CLIP-based class-incremental learning (ICCV 2025, arXiv 2507.09118).

One file, read top to bottom in the order of the method:
settings -> data -> model and LoRA -> gap measurement -> training with gap
preservation -> gap compensation -> evaluation -> main.

    python mgclip.py --dataset cifar100 --tasks 10      # the paper's CIFAR-100 B0 Inc10
    python mgclip.py --dataset synthetic --model tiny   # offline demo, CPU, < 1 minute
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import sys
import time
import typing
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

log = logging.getLogger("mgclip")


class UserError(ValueError):
    """A mistake in the command line or the data: reported as one line, never a traceback."""


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    dataset: str = arg("cifar100", "benchmark: cifar100 | synthetic")
    tasks: int | None = arg(None, "number of tasks T (default: per dataset, 10 for cifar100)")
    initial_increment: int = arg(0, "classes in the first task; 0 splits all classes evenly")
    model: str | None = arg(None, "open_clip model name, or 'tiny' (random-init toy CLIP); default per dataset: ViT-B-16 | tiny")
    pretrained: str | None = arg(None, "open_clip weight tag, a local checkpoint file, or 'none' (default: openai)")
    data_root: str = arg("data", "folder holding (or receiving) the datasets")
    download: bool = arg(True, "allow downloading CIFAR-100 when it is missing (also off when HF_HUB_OFFLINE=1)")
    epochs: int | None = arg(None, "epochs per task; default: found by gap preservation on task 1")
    alpha: float = arg(0.1, "gap preservation: stop when |S-(e) - S-(0)| / S-(0) exceeds this")
    max_epochs: int = arg(10, "gap preservation: most epochs searched on task 1")
    lr: float | None = arg(None, "Adam learning rate of LoRA (default: per dataset, 1e-3 for cifar100)")
    batch_size: int | None = arg(None, "training batch (default: per dataset, 128 for cifar100)")
    vis_lr: float | None = arg(None, "visual classifier learning rate (default: per dataset, 5e-4 for cifar100)")
    vis_batch_size: int | None = arg(None, "visual classifier batch (default: per dataset, 64 for cifar100)")
    vis_epochs: int = arg(3, "visual classifier epochs per task")
    text_weight: float = arg(1.0, "fusion weight of the text branch")
    visual_weight: float = arg(4.0, "fusion weight of the visual classifier")
    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(1.0, "LoRA alpha (delta W = alpha / r * B @ A)")
    prompt: str = arg("a good photo of a {}.", "prompt template for the class names")
    seed: int | None = arg(None, "random seed (default: per dataset, 42 for cifar100)")
    device: str = arg("auto", "auto | cuda | mps | cpu")
    workers: int = arg(4, "data-loader workers for datasets read from disk")
    eval_batch_size: int = arg(256, "batch for feature extraction and evaluation")
    syn_classes: int = arg(20, "synthetic: number of classes")
    syn_train: int = arg(48, "synthetic: training images per class")
    syn_test: int = arg(16, "synthetic: test images per class")
    syn_size: int = arg(32, "synthetic: image side in pixels")
    out: str | None = arg(None, "output folder (default: runs/<dataset>-T<tasks>-seed<seed>)")
    progress: bool = arg(True, "show progress bars")


# The authors' per-dataset settings (METHOD.md); flags override them.
DATASET_DEFAULTS = {
    "cifar100": dict(tasks=10, lr=1e-3, batch_size=128, vis_lr=5e-4, vis_batch_size=64, seed=42,
                     model="ViT-B-16"),
    "synthetic": dict(tasks=4, lr=1e-2, batch_size=16, vis_lr=5e-4, vis_batch_size=16, seed=0,
                      model="tiny"),
}


def parse_settings(argv=None) -> Settings:
    """Settings from the command line, one flag per dataclass field, then per-dataset defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None)) \
            if typing.get_args(hints[f.name]) else hints[f.name]
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(name, type=kind, default=f.default, help=f.metadata["help"])
    cfg = Settings(**vars(parser.parse_args(argv)))
    if cfg.dataset not in DATASET_DEFAULTS:
        raise UserError(f"unknown --dataset '{cfg.dataset}'; choose one of {', '.join(DATASET_DEFAULTS)}")
    for key, value in DATASET_DEFAULTS[cfg.dataset].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.pretrained is None:
        cfg.pretrained = "none" if cfg.model == "tiny" else "openai"
    if cfg.model == "tiny" and cfg.pretrained != "none":
        raise UserError("--model tiny is a random-init toy CLIP; drop --pretrained or pass --pretrained none")
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}-T{cfg.tasks}-seed{cfg.seed}"
    return cfg


def pick_device(name: str) -> torch.device:
    """The fastest available device: cuda, then mps, then cpu (or the one named)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} is not available here; use --device auto")
    return torch.device(name)


def seed_everything(seed: int):
    """One seed for Python, NumPy (through torch) and torch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# Data: class orders, task splits, benchmarks
# ----------------------------------------------------------------------------
@dataclass
class Split:
    """Images of one split as uint8 (N, 3, H, W) and labels as positions in the class order."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):  # idx: a list of indices, so one call returns a whole batch
        return self.images[idx], self.labels[idx]


@dataclass
class Benchmark:
    train: Split
    test: Split
    classnames: list[str]  # in class-order positions: task 1 holds classnames[:n1], ...


def split_tasks(num_classes: int, tasks: int, initial_increment: int = 0) -> list[range]:
    """Cut the class order (positions 0..C-1) into T tasks: B classes first, the rest evenly."""
    if tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {tasks}")
    if initial_increment < 0 or initial_increment > num_classes:
        raise UserError(f"--initial-increment {initial_increment} must be between 0 and the {num_classes} classes")
    if initial_increment:
        rest, later = num_classes - initial_increment, tasks - 1
        if later == 0 and rest or later and (rest == 0 or rest % later):
            raise UserError(f"the {rest} classes after --initial-increment {initial_increment} do not divide "
                            f"into {later} tasks; change --tasks or --initial-increment")
        sizes = [initial_increment] + [rest // later] * later
    else:
        if tasks > num_classes or num_classes % tasks:
            raise UserError(f"{num_classes} classes do not divide into {tasks} tasks; pick --tasks from "
                            f"{[d for d in range(1, num_classes + 1) if num_classes % d == 0]} "
                            f"or set --initial-increment")
        sizes = [num_classes // tasks] * tasks
    bounds = [0] + [sum(sizes[: i + 1]) for i in range(tasks)]
    return [range(bounds[i], bounds[i + 1]) for i in range(tasks)]


def reorder(images, labels, order) -> Split:
    """Relabel class ids by their position in the class order, so every task is a contiguous range."""
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.as_tensor(order)] = torch.arange(len(order))
    return Split(images, position[torch.as_tensor(labels, dtype=torch.long)])


def downloads_allowed(cfg: Settings) -> bool:
    return cfg.download and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0")


def load_cifar100(cfg: Settings) -> Benchmark:
    """CIFAR-100 in torchvision's on-disk format under --data-root, downloaded only if missing."""
    folder = Path(cfg.data_root) / "cifar-100-python"
    files = [folder / name for name in ("train", "test", "meta")]
    if not all(f.is_file() for f in files):
        if not downloads_allowed(cfg):
            raise UserError(f"CIFAR-100 not found in {folder}; put torchvision's cifar-100-python folder under "
                            f"--data-root, or allow the download (no --no-download, HF_HUB_OFFLINE unset)")
        import torchvision
        try:
            torchvision.datasets.CIFAR100(cfg.data_root, download=True)
        except Exception as e:
            raise UserError(f"could not download CIFAR-100 into --data-root {cfg.data_root} ({e}); "
                            f"copy torchvision's cifar-100-python folder there instead") from None

    def unpickle(path):
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh, encoding="latin1")
        except Exception as e:
            raise UserError(f"corrupt CIFAR-100 file {path} ({type(e).__name__}); delete it and download again") from None

    meta = unpickle(files[2])
    splits = []
    for f in files[:2]:
        d = unpickle(f)
        images = torch.from_numpy(d["data"]).reshape(-1, 3, 32, 32)
        splits.append(reorder(images, d["fine_labels"], CIFAR100_ORDER))
    names = [meta["fine_label_names"][i] for i in CIFAR100_ORDER]
    return Benchmark(splits[0], splits[1], names)


def synthetic_benchmark(cfg: Settings) -> Benchmark:
    """A deterministic toy benchmark: each class is a coarse colour layout plus noise, with a made-up name."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, size = cfg.syn_classes, cfg.syn_size
    layouts = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")

    def sample(per_class):
        labels = torch.arange(n).repeat_interleave(per_class)
        x = layouts[labels] + 0.1 * torch.randn(len(labels), 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

    syllables = ["ka", "lo", "mi", "zu", "ter", "vin", "sol", "pra", "dex", "nu", "ri", "bo", "fen", "gla", "tor"]
    names = set()
    while len(names) < n:
        names.add("".join(syllables[i] for i in torch.randint(len(syllables), (3,), generator=g)))
    names = sorted(names)
    order = torch.randperm(n, generator=g).tolist()
    train, test = sample(cfg.syn_train), sample(cfg.syn_test)
    return Benchmark(reorder(*train, order), reorder(*test, order), [names[i] for i in order])


def load_benchmark(cfg: Settings) -> Benchmark:
    """The benchmark named by --dataset, labels already in class-order positions."""
    return {"cifar100": load_cifar100, "synthetic": synthetic_benchmark}[cfg.dataset](cfg)


def batches(split: Split, classes: range, batch_size: int, shuffle: bool, device, seed: int = 0):
    """Batches of (uint8 images, labels) of the given classes; pinned for fast copies on CUDA."""
    idx = torch.nonzero((split.labels >= classes.start) & (split.labels < classes.stop)).squeeze(1)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    sampler = torch.utils.data.BatchSampler(idx.tolist(), batch_size, drop_last=False)
    return torch.utils.data.DataLoader(split, sampler=sampler, batch_size=None,
                                       pin_memory=device.type == "cuda")


def to_model_input(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """CLIP's test-time transform on a uint8 batch: bicubic resize, center crop, mean/std normalisation."""
    x = x.float()
    if x.shape[-2:] != (size, size):
        h, w = x.shape[-2:]
        short = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        # antialiased bicubic matches PIL's filter, which open_clip's transform uses; round as PIL does
        x = F.interpolate(x, size=short, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top: top + size, left: left + size].round().clamp(0, 255)
    return (x / 255 - mean) / std


# ----------------------------------------------------------------------------
# Model: CLIP, and LoRA on the attention keys and values of both towers
# ----------------------------------------------------------------------------
# A CLIP small enough to train on a CPU in seconds, built from open_clip's own config classes.
TINY_CLIP = dict(embed_dim=64,
                 vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=16, width=64, heads=2, layers=2))


@dataclass
class Clip:
    model: nn.Module
    tokenize: typing.Callable
    image_size: int
    mean: torch.Tensor  # (1, 3, 1, 1), on the device
    std: torch.Tensor

    def input(self, x):
        return to_model_input(x.to(self.mean.device, non_blocking=True), self.image_size, self.mean, self.std)


def load_clip(cfg: Settings, device) -> Clip:
    """CLIP from open_clip (weights by tag, local file or none), or the tiny random-init one."""
    import open_clip
    if cfg.model == "tiny":
        torch.manual_seed(cfg.seed)
        model = open_clip.CLIP(**TINY_CLIP, init_logit_scale=math.log(100))
        tokenize = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
    else:
        if cfg.model not in open_clip.list_models():
            raise UserError(f"unknown --model '{cfg.model}'; pick one of open_clip.list_models() or 'tiny'")
        pretrained = None if cfg.pretrained == "none" else cfg.pretrained
        if pretrained and not os.path.isfile(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(cfg.model):
            raise UserError(f"--pretrained '{pretrained}' is neither a file nor an open_clip tag of {cfg.model} "
                            f"({', '.join(open_clip.list_pretrained_tags_by_model(cfg.model))})")
        logging.disable(logging.CRITICAL)  # open_clip and the hub log each retry; we report one line
        try:
            model = open_clip.create_model(cfg.model, pretrained=pretrained)
        except Exception as e:
            raise UserError(f"could not load --pretrained {cfg.pretrained} for {cfg.model}: "
                            f"{str(e).splitlines()[0][:200]}. Pass --pretrained PATH to a local checkpoint "
                            f"or run where the weights download") from None
        finally:
            logging.disable(logging.NOTSET)
        tokenize = open_clip.get_tokenizer(cfg.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    as_tensor = lambda v: torch.tensor(v, device=device).view(1, 3, 1, 1)
    return Clip(model.to(device).eval(), tokenize, size, as_tensor(mean), as_tensor(std))


class LoRAKeyValue(nn.Module):
    """Adds (alpha / r) * B @ A to the key and value rows of a packed q/k/v projection weight."""

    def __init__(self, dim: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(2, rank, dim))  # [key, value]
        self.B = nn.Parameter(torch.zeros(2, dim, rank))  # zero: the model is unchanged at start
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, qkv_weight):
        dim = qkv_weight.shape[1]
        delta = (self.B @ self.A).reshape(2 * dim, dim) * self.scale
        return torch.cat([qkv_weight[:dim], qkv_weight[dim:] + delta.to(qkv_weight.dtype)])


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 1.0) -> list[nn.Parameter]:
    """Freeze CLIP and put LoRA on W_k and W_v of every self-attention block of both towers."""
    model.requires_grad_(False)
    blocks = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim]
    if not blocks:
        raise UserError("this model has no packed nn.MultiheadAttention blocks for LoRA; use a ViT CLIP from open_clip")
    for attn in blocks:
        w = attn.in_proj_weight
        parametrize.register_parametrization(
            attn, "in_proj_weight", LoRAKeyValue(w.shape[1], rank, alpha).to(w.device))
    return [p for p in model.parameters() if p.requires_grad]


def autocast(device):
    """bf16 autocast for the towers on CUDA; LoRA weights, classifier and optimiser stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def text_features(clip: Clip, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text features t_c of the given prompts (chunked for 1000-class datasets)."""
    device = clip.mean.device
    with autocast(device), parametrize.cached():
        out = [clip.model.encode_text(t.to(device)) for t in tokens.split(500)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def image_features(clip: Clip, split: Split, classes: range, cfg: Settings, desc: str):
    """L2-normalised image features v_i and labels of one split's images of the given classes (one pass)."""
    device = clip.mean.device
    feats, labels = [], []
    for x, y in tqdm(batches(split, classes, cfg.eval_batch_size, False, device), desc=desc,
                     leave=False, disable=not cfg.progress):
        with autocast(device), parametrize.cached():
            feats.append(clip.model.encode_image(clip.input(x)))
        labels.append(y.to(device, non_blocking=True))
    return F.normalize(torch.cat(feats).float(), dim=-1), torch.cat(labels)


# ----------------------------------------------------------------------------
# The modality gap
# ----------------------------------------------------------------------------
def modality_gap(image_features, text_features, labels, logit_scale: float):
    """S+ (matching pairs), S- (non-matching pairs), both s * cos, and the centroid gap ||mean v - mean t||."""
    v = F.normalize(image_features.float(), dim=-1)
    t = F.normalize(text_features.float(), dim=-1)
    pos = logit_scale * (v * t[labels]).sum(-1)
    every = logit_scale * v @ t.sum(0)  # sum over all classes without the (N, C) matrix
    s_minus = ((every - pos) / (len(t) - 1)).mean() if len(t) > 1 else torch.tensor(float("nan"))
    centroid = (v.mean(0) - t.mean(0)).norm()
    return pos.mean().item(), s_minus.item(), centroid.item()


# ----------------------------------------------------------------------------
# Training with gap preservation
# ----------------------------------------------------------------------------
def train_task(clip: Clip, lora, split: Split, tokens, classes: range, epochs: int, cfg: Settings, seed: int):
    """Fine-tune LoRA on one task with cross-entropy over its own classes; yields after each epoch."""
    device = clip.mean.device
    opt = torch.optim.Adam(lora, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.01 * cfg.lr)
    scale = clip.model.logit_scale.exp().detach()
    task_tokens = tokens[classes.start: classes.stop].to(device)  # the loss reads only these columns
    for epoch in range(1, epochs + 1):
        loss_sum, steps = torch.zeros((), device=device), 0
        data = batches(split, classes, cfg.batch_size, True, device, seed=seed * 1000 + epoch)
        for x, y in tqdm(data, desc=f"train t{classes.start}-{classes.stop - 1} ep{epoch}", leave=False,
                         disable=not cfg.progress):
            with autocast(device), parametrize.cached():
                v = clip.model.encode_image(clip.input(x))
                t = clip.model.encode_text(task_tokens)
            logits = scale * F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
            loss = F.cross_entropy(logits, y.to(device, non_blocking=True) - classes.start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()  # no host sync inside the loop
            steps += 1
        sched.step()
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"non-finite loss in classes {classes.start}-{classes.stop - 1}, epoch {epoch}; "
                               f"lower --lr")
        log.info(f"  epoch {epoch}/{epochs}  loss {loss_sum.item() / max(steps, 1):.4f}  "
                 f"lr {sched.get_last_lr()[0]:.2e}")
        yield epoch


def search_epochs(epochs, measure_s_minus, s_minus_0: float, alpha: float) -> tuple[int, bool]:
    """Gap preservation: E* = max(e - 1, 1) at the first epoch e whose S- drifts by more than alpha.

    `epochs` runs one training epoch per step and yields its number; returns (E*, drifted)."""
    last = 0
    for last in epochs:
        drift = abs(measure_s_minus() - s_minus_0) / abs(s_minus_0)
        log.info(f"  gap search: epoch {last}  relative S- drift {drift:.3f} (alpha {alpha})")
        if drift > alpha:
            return max(last - 1, 1), True
    return last, False


# ----------------------------------------------------------------------------
# Gap compensation: the cosine visual classifier
# ----------------------------------------------------------------------------
def train_visual_classifier(weights, feats, labels, classes: range, cfg: Settings, seed: int):
    """Grow W by the task's class means of v, then train the new rows on cos(v, w_c) for its own classes."""
    means = torch.stack([feats[labels == c].mean(0) for c in classes])
    new = nn.Parameter(means.clone())
    steps_per_epoch = math.ceil(len(labels) / cfg.vis_batch_size)
    opt = torch.optim.Adam([new], lr=cfg.vis_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.vis_epochs * steps_per_epoch,
                                                       eta_min=0.01 * cfg.vis_lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.vis_epochs):
        for idx in torch.randperm(len(labels), generator=g).to(feats.device).split(cfg.vis_batch_size):
            logits = F.normalize(feats[idx], dim=-1) @ F.normalize(new, dim=-1).T
            loss = F.cross_entropy(logits, labels[idx] - classes.start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return torch.cat([weights, new.detach()])


def fuse_scores(text_logits, visual_logits, weights=(1.0, 4.0)):
    """The authors' fusion: (w_t * softmax(softmax(s cos(v, t))) + w_v * softmax(cos(v, w))) / (w_t + w_v)."""
    p_text = text_logits.float().softmax(-1).softmax(-1)  # double softmax, as in the authors' code
    p_vis = visual_logits.float().softmax(-1)
    return (weights[0] * p_text + weights[1] * p_vis) / (weights[0] + weights[1])


# ----------------------------------------------------------------------------
# Evaluation and continual-learning metrics
# ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(clip: Clip, split: Split, text_feats, classifier, cfg: Settings):
    """Per-class correct counts of the fused, text-only and visual-only predictions on all seen classes."""
    device = clip.mean.device
    seen = len(text_feats)
    scale = clip.model.logit_scale.exp().float()
    w = F.normalize(classifier, dim=-1)
    correct = torch.zeros(3, seen, device=device)
    count = torch.zeros(seen, device=device)
    for x, y in tqdm(batches(split, range(seen), cfg.eval_batch_size, False, device), desc="evaluate",
                     leave=False, disable=not cfg.progress):
        y = y.to(device, non_blocking=True)
        with autocast(device), parametrize.cached():
            v = F.normalize(clip.model.encode_image(clip.input(x)).float(), dim=-1)
        text_logits, vis_logits = scale * v @ text_feats.T, v @ w.T
        fused = fuse_scores(text_logits, vis_logits, (cfg.text_weight, cfg.visual_weight))
        preds = torch.stack([fused.argmax(-1), text_logits.argmax(-1), vis_logits.argmax(-1)])
        correct.index_add_(1, y, (preds == y).float())
        count.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    return correct.cpu(), count.cpu()


def accuracy(correct, count, classes: range) -> float:
    """Top-1 accuracy (%) over the test images of the given classes."""
    return 100.0 * correct[classes.start: classes.stop].sum().item() / max(count[classes.start: classes.stop].sum().item(), 1)


def continual_metrics(acc: list[float], matrix: list[list[float]]) -> dict:
    """Avg (mean of acc_t), Last (acc_T), forgetting and backward transfer from a[t][j] (j <= t)."""
    T = len(acc)
    old = range(T - 1)
    forgetting = sum(max(matrix[t][j] for t in range(j, T - 1)) - matrix[T - 1][j] for j in old) / (T - 1) if T > 1 else None
    bwt = sum(matrix[T - 1][j] - matrix[j][j] for j in old) / (T - 1) if T > 1 else None
    return dict(avg=sum(acc) / T, last=acc[-1], forgetting=forgetting, bwt=bwt)


# ----------------------------------------------------------------------------
# Main: tasks one after another
# ----------------------------------------------------------------------------
class Clock:
    """Seconds and images per phase (device-synchronised), for summary.json."""

    def __init__(self, device):
        self.device, self.seconds, self.images = device, defaultdict(float), defaultdict(int)

    @contextmanager
    def __call__(self, phase: str, images: int = 0):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.seconds[phase] += time.perf_counter() - start
        self.images[phase] += images

    def report(self):
        return {p: dict(seconds=round(s, 3), images_per_second=round(self.images[p] / s, 1) if s else None)
                for p, s in self.seconds.items()}


def write_json(path: Path, obj, mode="w"):
    """Write (or append one line of) JSON atomically: a temporary file, then a rename."""
    text = json.dumps(obj) + "\n" if mode == "a" else json.dumps(obj, indent=2)
    old = path.read_text() if mode == "a" and path.exists() else ""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(old + text)
    os.replace(tmp, path)


def setup_logging(out: Path):
    """Log lines to the terminal (between progress bars) and to OUT/log.txt."""
    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record))
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in (TqdmHandler(), logging.FileHandler(out / "log.txt", mode="w")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def run(cfg: Settings) -> dict:
    """MG-CLIP over all tasks: train with preserved gap, compensate, evaluate; writes metrics and summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    data = load_benchmark(cfg)
    tasks = split_tasks(len(data.classnames), cfg.tasks, cfg.initial_increment)
    clip = load_clip(cfg, device)
    lora = add_lora(clip.model, cfg.lora_rank, cfg.lora_alpha)
    untouched = [p.detach().clone() for p in lora]
    tokens = clip.tokenize([cfg.prompt.format(name) for name in data.classnames])
    scale = clip.model.logit_scale.exp().item()
    log.info(f"MG-CLIP on {cfg.dataset}: {len(data.classnames)} classes in {len(tasks)} tasks, {cfg.model} "
             f"({cfg.pretrained}) on {device}, {sum(p.numel() for p in lora):,} LoRA parameters, logit scale {scale:.1f}")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    clock, epochs, searched = Clock(device), cfg.epochs, None
    classifier = None  # cosine classifier W: one row per seen class, grown task by task
    acc, matrix, rows = [], [], []
    for t, classes in enumerate(tasks):
        seen = range(0, classes.stop)
        n_train = int(((data.train.labels >= classes.start) & (data.train.labels < classes.stop)).sum())
        log.info(f"task {t + 1}/{len(tasks)}: classes {classes.start}-{classes.stop - 1} ({n_train} images)")
        with clock("gap", n_train):
            feats, labels = image_features(clip, data.train, classes, cfg, "gap before")
            before = modality_gap(feats, text_features(clip, tokens[: seen.stop]), labels, scale)
        trained = False
        if epochs is None:  # gap preservation, on task 1 only; E* then serves every task
            def s_minus():
                f, y = image_features(clip, data.train, classes, cfg, "gap search")
                return modality_gap(f, text_features(clip, tokens[: seen.stop]), y, scale)[1]
            with clock("search", n_train * 2 * cfg.max_epochs):
                epochs, drifted = search_epochs(
                    train_task(clip, lora, data.train, tokens, classes, cfg.max_epochs, cfg, cfg.seed + t),
                    s_minus, before[1], cfg.alpha)
            searched = epochs
            # The probe ran its cosine schedule over max_epochs; unless it ran them all, start over.
            trained = not drifted
            if drifted:
                with torch.no_grad():
                    for p, p0 in zip(lora, untouched):
                        p.copy_(p0)
            log.info(f"  gap preservation: E* = {epochs} epochs per task")
        if not trained:
            with clock("train", n_train * epochs):
                for _ in train_task(clip, lora, data.train, tokens, classes, epochs, cfg, cfg.seed + t):
                    pass
        with clock("features", n_train):
            feats, labels = image_features(clip, data.train, classes, cfg, "features")
            text_seen = text_features(clip, tokens[: seen.stop])
            after = modality_gap(feats, text_seen, labels, scale)
        if classifier is None:
            classifier = feats.new_zeros(0, feats.shape[1])
        with clock("classifier", n_train * cfg.vis_epochs):
            classifier = train_visual_classifier(classifier, feats, labels, classes, cfg, cfg.seed + t)
        n_test = int((data.test.labels < seen.stop).sum())
        with clock("eval", n_test):
            correct, count = evaluate(clip, data.test, text_seen, classifier, cfg)
        acc.append(accuracy(correct[0], count, seen))
        matrix.append([accuracy(correct[0], count, tasks[j]) for j in range(t + 1)])
        row = dict(task=t + 1, classes=[classes.start, classes.stop], epochs=epochs, acc=acc[-1],
                   acc_text=accuracy(correct[1], count, seen), acc_visual=accuracy(correct[2], count, seen),
                   acc_per_task=matrix[-1],
                   gap_before=dict(zip(("s_plus", "s_minus", "centroid"), before)),
                   gap_after=dict(zip(("s_plus", "s_minus", "centroid"), after)))
        rows.append(row)
        write_json(out / "metrics.jsonl", row, mode="a")
        log.info(f"  acc {row['acc']:.2f}  (text {row['acc_text']:.2f}, visual {row['acc_visual']:.2f})  "
                 f"S+ {before[0]:.2f}->{after[0]:.2f}  S- {before[1]:.2f}->{after[1]:.2f}")
    summary = dict(config=dataclasses.asdict(cfg), device=str(device), epochs_star=epochs,
                   epochs_searched=searched is not None, lora_parameters=sum(p.numel() for p in lora),
                   **continual_metrics(acc, matrix), acc=acc, acc_matrix=matrix,
                   acc_text=[r["acc_text"] for r in rows], acc_visual=[r["acc_visual"] for r in rows],
                   gap=[dict(task=r["task"], before=r["gap_before"], after=r["gap_after"]) for r in rows],
                   phases=clock.report(), seconds_total=round(sum(clock.seconds.values()), 3),
                   peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3)
                   if device.type == "cuda" else None)
    write_json(out / "summary.json", summary)
    print_table(rows, summary)
    return summary


def print_table(rows, summary):
    """The run at a glance: accuracy per branch and the gap per task, then Avg / Last / forgetting."""
    lines = [f"{'task':>4} {'classes':>9} {'acc':>6} {'text':>6} {'visual':>6} {'S+ before>after':>16} "
             f"{'S- before>after':>16} {'gap after':>9}"]
    for r in rows:
        b, a = r["gap_before"], r["gap_after"]
        lines.append(f"{r['task']:>4} {r['classes'][0]:>4}-{r['classes'][1] - 1:<4} {r['acc']:6.2f} "
                     f"{r['acc_text']:6.2f} {r['acc_visual']:6.2f} {b['s_plus']:7.2f}>{a['s_plus']:<8.2f} "
                     f"{b['s_minus']:7.2f}>{a['s_minus']:<8.2f} {a['centroid']:9.3f}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines.append(f"Avg {summary['avg']:.2f}  Last {summary['last']:.2f}  forgetting {fmt(summary['forgetting'])}  "
                 f"E* {summary['epochs_star']}  {summary['seconds_total']:.1f}s  -> {summary['config']['out']}")
    log.info("\n".join(lines))


def main(argv=None):
    try:
        run(parse_settings(argv))
    except UserError as e:
        sys.exit(f"mgclip: error: {e}")
    except KeyboardInterrupt:
        sys.exit("mgclip: interrupted")


# ----------------------------------------------------------------------------
# Class orders (data/class_orders.json of the authors' setup)
# ----------------------------------------------------------------------------
CIFAR100_ORDER = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24,
                  32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20,
                  80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70,
                  90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54,
                  26, 35, 39]

if __name__ == "__main__":
    main()
