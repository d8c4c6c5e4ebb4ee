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
import socket
import sys
import time
import typing
import urllib.parse
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
import PIL.Image
import torchvision
import torchvision.transforms.v2.functional as TF
from tqdm.auto import tqdm

log = logging.getLogger("mgclip")


class UserError(ValueError):
    """A mistake in the command line or the data: reported as one line, never a traceback."""


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def arg(default, help):
    """A settings field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Every knob of a run; each field is a command-line flag (--tasks, --vis-lr, ...)."""
    dataset: str = arg("cifar100", "benchmark: cifar100 | imagenet100 | imagenet-r | imagenet | folder | synthetic")
    tasks: int | None = arg(None, "number of tasks T (default: per dataset, 10 for cifar100)")
    initial_increment: int = arg(0, "classes in the first task; 0 splits all classes evenly")
    model: str | None = arg(None, "open_clip model name, or 'tiny' (random-init toy CLIP); default: ViT-B-16, "
                                  "tiny for synthetic")
    pretrained: str | None = arg(None, "open_clip weight tag, a local checkpoint file, or 'none' (default: openai; "
                                       "OpenAI weights from a file need --model ViT-B-16-quickgelu)")
    data_root: str = arg("data", "cifar100: folder holding (or receiving) cifar-100-python/; others: the folder "
                                 "holding train/ and val/ (or test/)")
    class_order: str | None = arg(None, "file of class indices giving the class order (default: the published "
                                        "order, or a permutation drawn from --seed)")
    download: bool = arg(True, "allow downloading weights, CIFAR-100 and Food-101 when missing (off as well when "
                               "HF_HUB_OFFLINE=1)")
    epochs: int | None = arg(None, "epochs per task; default: found by gap preservation on task 1")
    alpha: float = arg(0.1, "gap preservation: stop when |S-(e) - S-(0)| / S-(0) exceeds this")
    max_epochs: int = arg(10, "gap preservation: most epochs searched on task 1")
    lr: float | None = arg(None, "Adam learning rate of LoRA (default: per dataset, 1e-3 for cifar100)")
    batch_size: int | None = arg(None, "training batch (default: per dataset, 128 for cifar100)")
    vis_lr: float | None = arg(None, "visual classifier learning rate (default: per dataset, 5e-4 for cifar100)")
    vis_batch_size: int | None = arg(None, "visual classifier batch (default: per dataset, 64 for cifar100)")
    vis_epochs: int | None = arg(None, "visual classifier epochs per task (default: per dataset, 3 for cifar100)")
    text_weight: float = arg(1.0, "fusion weight of the text branch")
    visual_weight: float = arg(4.0, "fusion weight of the visual classifier")
    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(1.0, "LoRA alpha (delta W = alpha / r * B @ A)")
    prompt: str = arg("a good photo of a {}.", "prompt template for the class names")
    seed: int | None = arg(None, "random seed (default: per dataset, 42 for cifar100)")
    device: str = arg("auto", "auto | cuda | mps | cpu")
    workers: int = arg(4, "data-loader worker processes that decode and resize images")
    eval_batch_size: int = arg(256, "batch for feature extraction and evaluation")
    gpu_preprocess: bool = arg(False, "cifar100/synthetic: resize and normalise the uint8 images on the device "
                                      "instead of in the loader workers")
    syn_classes: int = arg(20, "synthetic: number of classes")
    syn_train: int = arg(48, "synthetic: training images per class")
    syn_test: int = arg(16, "synthetic: test images per class")
    syn_size: int = arg(32, "synthetic: image side in pixels")
    preservation: bool = arg(True, "gap preservation: find E* on task 1 (--no-preservation: --max-epochs every task)")
    compensation: bool = arg(True, "gap compensation: fuse the visual classifier (--no-compensation: text branch only)")
    zeroshot_eval: str | None = arg(None, "also measure zero-shot accuracy on this dataset's test split before and "
                                          "after the run (food101, cifar100, folder, ...)")
    zeroshot_root: str | None = arg(None, "--data-root of the --zeroshot-eval dataset")
    plot: bool = arg(False, "draw OUT/mgclip.png (accuracy and S+ / S- per task; needs matplotlib)")
    out: str | None = arg(None, "output folder (default: runs/<dataset>-T<tasks>-seed<seed>[-variant])")
    resume: str | None = arg(None, "continue the run in this output folder after its last finished task")
    speed: bool = arg(False, "only time a training step and an evaluation batch against the bare image tower "
                             "(random images), write OUT/speed.json and exit")
    progress: bool = arg(True, "show progress bars")


# The authors' per-dataset settings (METHOD.md's table; imagenet from their imagenet1000_100-100.yaml).
# Flags override them.
DATASET_DEFAULTS = {
    name: dict(zip(("tasks", "lr", "batch_size", "vis_lr", "vis_batch_size", "vis_epochs", "seed", "model"), row))
    for name, row in {
        "cifar100":    (10, 1e-3, 128, 5e-4, 64, 3, 42, "ViT-B-16"),
        "imagenet100": (10, 5e-4, 128, 1e-3, 128, 3, 0, "ViT-B-16"),
        "imagenet-r":  (10, 1e-3, 64, 5e-4, 32, 3, 0, "ViT-B-16"),
        "imagenet":    (10, 5e-4, 80, 5e-4, 64, 2, 0, "ViT-B-16"),
        "folder":      (10, 1e-3, 128, 5e-4, 64, 3, 0, "ViT-B-16"),
        "synthetic":   (4, 1e-2, 16, 2e-3, 16, 3, 0, "tiny"),
    }.items()
}


# What a resumed run must share with its checkpoint: everything that changes the numbers.
RESUME_KEYS = ("dataset", "tasks", "initial_increment", "class_order", "model", "pretrained", "epochs", "alpha",
               "max_epochs", "lr", "batch_size", "vis_lr", "vis_batch_size", "vis_epochs", "text_weight",
               "visual_weight", "lora_rank", "lora_alpha", "prompt", "seed", "syn_classes", "syn_train", "syn_test",
               "syn_size", "preservation", "compensation", "zeroshot_eval")


def parse_settings(argv=None) -> Settings:
    """Settings from the command line (one flag per field), then per-dataset defaults or the resumed run's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None)) \
            if typing.get_args(hints[f.name]) else hints[f.name]
        text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, metavar=f.name.upper(), help=text)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    if "resume" in given:
        saved = load_checkpoint(given["resume"])["settings"]
        for key in RESUME_KEYS:
            if key in given and given[key] != saved[key]:
                raise UserError(f"--{key.replace('_', '-')} {given[key]} differs from {saved[key]} in the checkpoint "
                                f"of {given['resume']}; resume with the run's own settings or start a new --out")
        return Settings(**{**saved, **given, "out": given["resume"]})
    cfg = Settings(**given)
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
        cfg.out = f"runs/{cfg.dataset}-T{cfg.tasks}-seed{cfg.seed}" + ("" if variant(cfg) == "mgclip" else
                                                                        "-" + variant(cfg))
    return cfg


def variant(cfg: Settings) -> str:
    """The paper's row this run reproduces: mgclip, or its ablations without preservation and/or compensation."""
    off = [name for name in ("preservation", "compensation") if not getattr(cfg, name)]
    return "-".join("no-" + name for name in off) or "mgclip"


def pick_device(name: str) -> torch.device:
    """The fastest available device: cuda, then mps, then cpu (or the one named)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} is not available here; use --device auto")
    return torch.device(name)


def seed_everything(seed: int):
    """One seed for Python's and torch's random generators (torch's covers every device)."""
    random.seed(seed)
    torch.manual_seed(seed)


def start_device(cfg: Settings) -> torch.device:
    """The run's device, seeded, with TF32 matmuls and a fresh peak-memory count on CUDA."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    return device


# ----------------------------------------------------------------------------
# Data: class orders, task splits, benchmarks
# ----------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def prepare(x: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's test-time geometry on a uint8 tensor batch (any device): bicubic resize of the short side, crop."""
    if x.shape[-2:] == (size, size):
        return x
    x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size])


def prepare_pil(image: PIL.Image.Image, size: int | None) -> torch.Tensor:
    """open_clip's own test transform up to normalisation (PIL bicubic resize, center crop) as uint8 (3, S, S)."""
    if size is not None:
        image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size])
    return TF.pil_to_tensor(image)


def read_image(path: str, size: int | None) -> torch.Tensor:
    """One image file, decoded by PIL as RGB and prepared like open_clip does."""
    try:
        with PIL.Image.open(path) as image:
            image = image.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); delete or replace the file") from None
    return prepare_pil(image, size)


@dataclass
class Split(torch.utils.data.Dataset):
    """One split: labels as class-order positions, images as a uint8 (N, 3, H, W) tensor or as files."""
    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[str] | None = None
    size: int | None = None  # resize + crop to this side in the loader workers; None: as stored

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):  # idx: a list of indices, so one call returns a whole batch
        if self.files is not None:
            x = torch.stack([read_image(self.files[i], self.size) for i in idx])
        elif self.size is not None:
            x = torch.stack([prepare_pil(PIL.Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), self.size)
                             for i in idx])
        else:  # as stored: the device finishes the transform (--gpu-preprocess)
            x = self.images[idx]
        return x, self.labels[idx]


@dataclass
class Benchmark:
    """A class-incremental benchmark: train and test splits and the class names in class order."""
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


def class_order(cfg: Settings, num_classes: int, default=None) -> list[int]:
    """The class at each position: --class-order FILE, else the dataset's published order, else seeded."""
    if cfg.class_order:
        try:
            order = [int(c) for c in Path(cfg.class_order).read_text().replace(",", " ").strip("[] \n").split()]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --class-order {cfg.class_order} ({type(e).__name__}); "
                            f"give a file of class indices separated by spaces, commas or new lines") from None
        if sorted(order) != list(range(num_classes)):
            raise UserError(f"--class-order {cfg.class_order} must list each of the {num_classes} class indices "
                            f"0..{num_classes - 1} exactly once")
        return order
    if default is not None:
        return list(default)
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(cfg.seed)).tolist()


def positions(order: list[int]) -> torch.Tensor:
    """Inverse of the class order: the position of each original class id."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.as_tensor(order)] = torch.arange(len(order))
    return inverse


def downloads_allowed(cfg: Settings) -> bool:
    """Downloads happen unless --no-download or HF_HUB_OFFLINE=1 says this machine is offline."""
    return cfg.download and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0")


def settle_offline(cfg: Settings):
    """Treat the machine as offline (HF_HUB_OFFLINE=1, read when huggingface_hub is imported) on --no-download or
    when the hub does not answer within 3 s: weights then come from the cache or fail at once, never a retry loop."""
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))  # or a mirror
    if downloads_allowed(cfg):
        try:
            socket.create_connection((hub.hostname, hub.port or (443 if hub.scheme == "https" else 80)), 3).close()
            return
        except OSError:
            pass
    os.environ["HF_HUB_OFFLINE"] = "1"


def load_cifar100(cfg: Settings) -> Benchmark:
    """CIFAR-100 in torchvision's on-disk format under --data-root, downloaded only if missing."""
    folder = Path(cfg.data_root) / "cifar-100-python"
    files = [folder / name for name in ("train", "test", "meta")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        if not downloads_allowed(cfg):
            raise UserError(f"CIFAR-100 is missing {missing[0]}; put torchvision's cifar-100-python folder under "
                            f"--data-root, or run where it downloads (network, no --no-download, "
                            f"no HF_HUB_OFFLINE=1)")
        try:
            torchvision.datasets.CIFAR100(cfg.data_root, download=True)
        except Exception as e:
            raise UserError(f"could not download CIFAR-100 into --data-root {cfg.data_root} ({e}); "
                            f"copy torchvision's cifar-100-python folder there instead") from None

    def unpickle(path, *keys):
        try:
            with open(path, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")
            return [d[k] for k in keys]
        except Exception as e:
            raise UserError(f"corrupt CIFAR-100 file {path} ({type(e).__name__}); delete it and download "
                            f"again") from None

    order = class_order(cfg, 100, CIFAR100_ORDER)
    where, splits = positions(order), []
    for f in files[:2]:
        pixels, labels = unpickle(f, "data", "fine_labels")
        splits.append(Split(where[torch.as_tensor(labels)], torch.from_numpy(pixels).reshape(-1, 3, 32, 32)))
    names = unpickle(files[2], "fine_label_names")[0]
    return Benchmark(*splits, [names[i] for i in order])


def listed_classes(text: str) -> tuple[list[str], list[str]]:
    """WordNet ids and names from a "wnid name; wnid name; ..." list."""
    pairs = [" ".join(entry.split()).split(" ", 1) for entry in text.split(";")]
    return [w for w, _ in pairs], [n for _, n in pairs]


def image_folders(root: Path) -> list[str]:
    """The class folders (sorted names) directly under root."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def folder_split(folder: Path, classes: list[str]) -> Split:
    """Every image of folder/<class>/ for the classes in class order, labelled by position."""
    files, labels = [], []
    for pos, name in enumerate(classes):
        images = sorted(str(p) for p in (folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)}) or is missing")
        files += images
        labels += [pos] * len(images)
    return Split(torch.tensor(labels), files=files)


def split_raw_imagenet_r(root: Path, classes: list[str], seed: int) -> tuple[Split, Split]:
    """The raw ImageNet-R download (ROOT/<wnid>/, no split): 80% train / 20% test per class, fixed by the seed."""
    whole = folder_split(root, classes)
    train, test = [], []
    for pos in range(len(classes)):
        idx = torch.nonzero(whole.labels == pos).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 1000 + pos))]
        cut = int(0.8 * len(idx))
        train += idx[:cut].tolist()
        test += idx[cut:].tolist()
    pick = lambda ids: Split(whole.labels[ids], files=[whole.files[i] for i in ids])
    return pick(sorted(train)), pick(sorted(test))


def load_image_folders(cfg: Settings) -> Benchmark:
    """ImageNet-100, ImageNet-R, ImageNet-1K or any ROOT/train/<class>/ + ROOT/val|test/<class>/ tree."""
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root} does not exist; point it at the folder holding train/ and val/ (or test/)")
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    raw = cfg.dataset == "imagenet-r" and not (root / "train").is_dir()
    if not raw and not (root / "train").is_dir():
        raise UserError(f"no {root / 'train'} folder; expected {root}/train/<class>/ and {root}/val/<class>/")
    if not raw and test_dir is None:
        raise UserError(f"no {root / 'val'} or {root / 'test'} folder next to {root / 'train'}")
    listed = {"imagenet100": (IMAGENET100_CLASSES, IMAGENET100_ORDER),
              "imagenet-r": (IMAGENET_R_CLASSES, IMAGENET_R_ORDER)}
    if cfg.dataset in listed:
        wnids, names = listed_classes(listed[cfg.dataset][0])
        order = class_order(cfg, len(wnids), listed[cfg.dataset][1])
    else:
        wnids = image_folders(root / "train")
        if wnids != image_folders(test_dir):
            differ = sorted(set(wnids) ^ set(image_folders(test_dir)))
            raise UserError(f"the classes in {root / 'train'} and {test_dir} differ ({', '.join(differ[:3])}...); "
                            f"both need the same class folders")
        if cfg.dataset == "imagenet":
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as names
            if len(wnids) != 1000:
                raise UserError(f"{root / 'train'} holds {len(wnids)} class folders, ImageNet-1K has 1000")
            order = class_order(cfg, 1000, range(1000))
        else:
            names = [n.replace("_", " ") for n in wnids]
            if (root / "classnames.txt").is_file():
                names = [n.strip() for n in (root / "classnames.txt").read_text().splitlines() if n.strip()]
                if len(names) != len(wnids):
                    raise UserError(f"{root / 'classnames.txt'} has {len(names)} names for {len(wnids)} class "
                                    f"folders; give one name per line in sorted folder order")
            order = class_order(cfg, len(wnids))
    classes = [wnids[i] for i in order]
    if raw:
        train, test = split_raw_imagenet_r(root, classes, cfg.seed)
    else:
        train, test = folder_split(root / "train", classes), folder_split(test_dir, classes)
    return Benchmark(train, test, [names[i] for i in order])


def synthetic_benchmark(cfg: Settings) -> Benchmark:
    """A deterministic toy benchmark: each class is a coarse colour layout plus noise, with a made-up name."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, size = cfg.syn_classes, cfg.syn_size
    layouts = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")

    def sample(per_class):
        labels = torch.arange(n).repeat_interleave(per_class)
        x = layouts[labels] + 0.1 * torch.randn(len(labels), 3, size, size, generator=g)
        return Split(labels, (x.clamp(0, 1) * 255).round().to(torch.uint8))

    syllables = ["ka", "lo", "mi", "zu", "ter", "vin", "sol", "pra", "dex", "nu", "ri", "bo", "fen", "gla", "tor"]
    names = set()
    while len(names) < n:
        names.add("".join(syllables[i] for i in torch.randint(len(syllables), (3,), generator=g)))
    names = sorted(names)
    order = class_order(cfg, n)
    train, test = sample(cfg.syn_train), sample(cfg.syn_test)
    where = positions(order)
    for split in (train, test):
        split.labels = where[split.labels]
    return Benchmark(train, test, [names[i] for i in order])


def load_benchmark(cfg: Settings) -> Benchmark:
    """The benchmark named by --dataset, labels already in class-order positions."""
    if cfg.dataset == "cifar100":
        return load_cifar100(cfg)
    if cfg.dataset == "synthetic":
        return synthetic_benchmark(cfg)
    return load_image_folders(cfg)


def load_food101(cfg: Settings) -> Benchmark:
    """Food-101 (zero-shot retention) in torchvision's layout: food-101/images/, meta/{classes.txt,test.json}."""
    folder = Path(cfg.data_root) / "food-101"
    if not (folder / "meta" / "test.json").is_file():
        if not downloads_allowed(cfg):
            raise UserError(f"Food-101 not found in {folder}; put torchvision's food-101 folder under "
                            f"--zeroshot-root, or run where it downloads (network, no --no-download, "
                            f"no HF_HUB_OFFLINE=1)")
        try:
            torchvision.datasets.Food101(cfg.data_root, split="test", download=True)
        except Exception as e:
            raise UserError(f"could not download Food-101 into --zeroshot-root {cfg.data_root} ({e})") from None
    classes = (folder / "meta" / "classes.txt").read_text().split()
    listed = json.loads((folder / "meta" / "test.json").read_text())  # {class: ["class/id", ...]}
    files = [(str(folder / "images" / f"{item}.jpg"), y) for y, c in enumerate(classes) for item in listed.get(c, [])]
    test = Split(torch.tensor([y for _, y in files], dtype=torch.long), files=[f for f, _ in files])
    no_train = Split(torch.zeros(0, dtype=torch.long), files=[])  # zero-shot only: nothing to train on
    return Benchmark(no_train, test, [c.replace("_", " ") for c in classes])


def load_zeroshot(cfg: Settings) -> Benchmark:
    """The --zeroshot-eval dataset (food101 or any --dataset), read from --zeroshot-root."""
    other = dataclasses.replace(cfg, dataset=cfg.zeroshot_eval, data_root=cfg.zeroshot_root or cfg.data_root,
                                class_order=None)
    if other.dataset == "food101":
        return load_food101(other)
    if other.dataset not in DATASET_DEFAULTS:
        raise UserError(f"unknown --zeroshot-eval '{other.dataset}'; choose food101 or one of "
                        f"{', '.join(DATASET_DEFAULTS)}")
    return load_benchmark(other)


def batches(split: Split, classes: range, batch_size: int, shuffle: bool, cfg: Settings, device, seed: int = 0):
    """Batches of (uint8 images, labels) of the given classes; workers and pinned memory where they help."""
    idx = torch.nonzero((split.labels >= classes.start) & (split.labels < classes.stop)).squeeze(1)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    sampler = torch.utils.data.BatchSampler(idx.tolist(), batch_size, drop_last=False)
    busy = split.files is not None or split.size is not None  # decoding or resizing: worth worker processes
    workers = min(cfg.workers, os.cpu_count() or 1) if busy else 0
    return torch.utils.data.DataLoader(split, sampler=sampler, batch_size=None, num_workers=workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def to_model_input(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """CLIP's test-time transform finished on the device: resize/crop if still needed, then mean/std."""
    return (prepare(x, size).float() / 255 - mean) / std


# ----------------------------------------------------------------------------
# Model: CLIP, and LoRA on the attention keys and values of both towers
# ----------------------------------------------------------------------------
# A CLIP small enough to train on a CPU in seconds, built from open_clip's own config classes.
TINY_CLIP = dict(embed_dim=64,
                 vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=16, width=64, heads=2, layers=2))


@dataclass
class Clip:
    """An open_clip model with its tokenizer and its input transform's size, mean and std."""
    model: nn.Module
    tokenize: typing.Callable
    image_size: int
    mean: torch.Tensor  # (1, 3, 1, 1), on the device
    std: torch.Tensor

    def input(self, x):
        """uint8 images (any size, any device) -> the normalised model input on the model's device."""
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
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        is_tag = pretrained is not None and not os.path.isfile(pretrained)
        if is_tag and pretrained not in tags:
            raise UserError(f"--pretrained '{pretrained}' is neither a file nor an open_clip tag of {cfg.model} "
                            f"({', '.join(tags)})")
        # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use GELU and only warn
        tag = open_clip.get_pretrained_cfg(cfg.model, pretrained) if is_tag else {}
        logging.disable(logging.CRITICAL)  # open_clip and the hub log each retry; we report one line
        try:
            model = open_clip.create_model(cfg.model, pretrained=pretrained,
                                           force_quick_gelu=bool(tag.get("quick_gelu", False)))
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
        for a in self.A:  # the authors' attention LoRA draws A with xavier_uniform_ (their Linear LoRA: kaiming)
            nn.init.xavier_uniform_(a)
        self.scale = alpha / rank

    def forward(self, qkv_weight):
        """W_qkv -> [W_q; W_k + s B_k A_k; W_v + s B_v A_v]."""
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


def set_lora(lora, weights):
    """Load LoRA weights in place (the untouched ones, B = 0, give back the pre-trained CLIP)."""
    with torch.no_grad():
        for p, w in zip(lora, weights):
            p.copy_(w)


@contextmanager
def pretrained_clip(lora, untouched):
    """Within this block the model is the pre-trained CLIP; the trained LoRA weights come back after."""
    trained = [p.detach().clone() for p in lora]
    set_lora(lora, untouched)
    try:
        yield
    finally:
        set_lora(lora, trained)


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
    for x, y in tqdm(batches(split, classes, cfg.eval_batch_size, False, cfg, device), desc=desc,
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
def train_step(clip: Clip, opt, x, y, task_tokens, scale) -> torch.Tensor:
    """One LoRA update: cross-entropy of s * cos(v, t_c) over the current task's classes (y counted from 0)."""
    with autocast(clip.mean.device), parametrize.cached():
        v = clip.model.encode_image(clip.input(x))
        t = clip.model.encode_text(task_tokens)
    logits = scale * F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_task(clip: Clip, lora, split: Split, tokens, classes: range, epochs: int, cfg: Settings, task: int):
    """Fine-tune LoRA on one task with cross-entropy over its own classes; yields after each epoch."""
    device = clip.mean.device
    opt = torch.optim.Adam(lora, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.01 * cfg.lr)
    scale = clip.model.logit_scale.exp().detach()
    task_tokens = tokens[classes.start: classes.stop].to(device)  # the loss reads only these columns
    for epoch in range(1, epochs + 1):
        loss_sum, first_bad = torch.zeros((), device=device), torch.full((), -1, device=device)
        data = batches(split, classes, cfg.batch_size, True, cfg, device, seed=(cfg.seed + task) * 1000 + epoch)
        for step, (x, y) in enumerate(tqdm(data, desc=f"task {task} epoch {epoch}", leave=False,
                                           disable=not cfg.progress), 1):
            loss = train_step(clip, opt, x, y.to(device, non_blocking=True) - classes.start, task_tokens, scale)
            loss_sum += loss  # device-side bookkeeping: no host sync inside the loop
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        sched.step()
        if first_bad.item() >= 0:
            raise UserError(f"non-finite loss in task {task}, epoch {epoch}, step {first_bad.item()}; lower --lr "
                            f"(now {cfg.lr:g}); the checkpoint of the tasks before is intact")
        log.info(f"  epoch {epoch}/{epochs}  loss {loss_sum.item() / max(step, 1):.4f}  "
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
    """Grow W (None at first) by the task's class means of v, then train the new rows on cos(v, w_c)."""
    y = labels - classes.start
    sums = feats.new_zeros(len(classes), feats.shape[1]).index_add_(0, y, feats)  # class means, no host sync
    new = nn.Parameter(sums / torch.bincount(y, minlength=len(classes)).clamp(min=1).unsqueeze(1))
    steps_per_epoch = math.ceil(len(labels) / cfg.vis_batch_size)
    opt = torch.optim.Adam([new], lr=cfg.vis_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.vis_epochs * steps_per_epoch,
                                                       eta_min=0.01 * cfg.vis_lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.vis_epochs):
        for idx in torch.randperm(len(labels), generator=g).to(feats.device).split(cfg.vis_batch_size):
            logits = F.normalize(feats[idx], dim=-1) @ F.normalize(new, dim=-1).T
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return new.detach() if weights is None else torch.cat([weights, new.detach()])


def fuse_scores(text_logits, visual_logits, weights=(1.0, 4.0)):
    """The authors' fusion: (w_t * softmax(softmax(s cos(v, t))) + w_v * softmax(cos(v, w))) / (w_t + w_v)."""
    p_text = text_logits.float().softmax(-1).softmax(-1)  # double softmax, as in the authors' code
    p_vis = visual_logits.float().softmax(-1)
    return (weights[0] * p_text + weights[1] * p_vis) / (weights[0] + weights[1])


# ----------------------------------------------------------------------------
# Evaluation and continual-learning metrics
# ----------------------------------------------------------------------------
@torch.no_grad()
def predict(clip: Clip, x, text_feats, w, scale, weights) -> torch.Tensor:
    """Fused, text-only and visual-only predictions (3, B) of one batch, from one image-tower pass."""
    with autocast(clip.mean.device), parametrize.cached():
        v = F.normalize(clip.model.encode_image(clip.input(x)).float(), dim=-1)
    text_logits, vis_logits = scale * v @ text_feats.T, v @ w.T
    fused = fuse_scores(text_logits, vis_logits, weights)
    return torch.stack([fused.argmax(-1), text_logits.argmax(-1), vis_logits.argmax(-1)])


@torch.no_grad()
def evaluate(clip: Clip, split: Split, text_feats, classifier, cfg: Settings):
    """Per-class correct counts of the fused, text-only and visual-only predictions on all seen classes."""
    device = clip.mean.device
    seen = len(text_feats)
    scale = clip.model.logit_scale.exp().float()
    w = F.normalize(classifier if classifier is not None else text_feats, dim=-1)  # None: text branch only
    correct = torch.zeros(3, seen, device=device)
    count = torch.zeros(seen, device=device)
    for x, y in tqdm(batches(split, range(seen), cfg.eval_batch_size, False, cfg, device), desc="evaluate",
                     leave=False, disable=not cfg.progress):
        y = y.to(device, non_blocking=True)
        preds = predict(clip, x, text_feats, w, scale, (cfg.text_weight, cfg.visual_weight))
        correct.index_add_(1, y, (preds == y).float())
        count.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    return correct.cpu(), count.cpu()


def zeroshot_accuracy(clip: Clip, bench: Benchmark, cfg: Settings) -> float:
    """Zero-shot top-1 (%) of the text branch on another dataset's test split, with its own class names."""
    tokens = clip.tokenize([cfg.prompt.format(name) for name in bench.classnames])
    correct, count = evaluate(clip, bench.test, text_features(clip, tokens), None, cfg)
    return accuracy(correct[1], count, range(len(bench.classnames)))


def accuracy(correct, count, classes: range) -> float:
    """Top-1 accuracy (%) over the test images of the given classes."""
    part = slice(classes.start, classes.stop)
    return 100.0 * correct[part].sum().item() / max(count[part].sum().item(), 1)


def continual_metrics(acc: list[float], matrix: list[list[float]]) -> dict:
    """Avg (mean of acc_t), Last (acc_T), forgetting and backward transfer from a[t][j] (j <= t)."""
    T = len(acc)
    old = range(T - 1)
    forgetting = sum(max(matrix[t][j] for t in range(j, T - 1)) - matrix[T - 1][j] for j in old) / (T - 1) \
        if T > 1 else None
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
        """Seconds and images/s per phase, for summary.json."""
        return {p: dict(seconds=round(s, 3), images_per_second=round(self.images[p] / s, 1) if s else None)
                for p, s in self.seconds.items()}


def replace_atomically(path: Path, write):
    """Write a file through a temporary one, then rename: a crash or Ctrl-C never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj, mode="w"):
    """Write JSON, or append one line of it (mode "a"), atomically."""
    old = path.read_text() if mode == "a" and path.exists() else ""
    text = old + json.dumps(obj) + "\n" if mode == "a" else json.dumps(obj, indent=2)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(out: str) -> dict:
    """The state saved after the last finished task of the run in OUT."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"--resume {out}: no checkpoint.pt there; give the output folder of an earlier run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume {out}: checkpoint.pt is unreadable ({type(e).__name__}); start the run "
                        f"afresh") from None


def setup_logging(out: Path, append: bool):
    """Log lines to the terminal (between progress bars) and to OUT/log.txt."""
    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record))
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in (TqdmHandler(), logging.FileHandler(out / "log.txt", mode="a" if append else "w")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def run(cfg: Settings) -> dict:
    """MG-CLIP over all tasks: train with preserved gap, compensate, evaluate; writes metrics and summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, append=bool(cfg.resume))
    plt = pyplot() if cfg.plot else None  # a missing matplotlib should stop the run now, not after training
    if cfg.model != "tiny" and cfg.pretrained != "none" and not os.path.isfile(cfg.pretrained):
        settle_offline(cfg)
    device = start_device(cfg)
    data = load_benchmark(cfg)
    tasks = split_tasks(len(data.classnames), cfg.tasks, cfg.initial_increment)
    zeroshot = load_zeroshot(cfg) if cfg.zeroshot_eval else None
    clip = load_clip(cfg, device)
    for split in [data.train, data.test] + ([zeroshot.test] if zeroshot else []):
        # files resize in the loader workers; in-memory images too, unless --gpu-preprocess
        on_device = split.files is None and (cfg.gpu_preprocess or split.images.shape[-2:] == (clip.image_size,) * 2)
        split.size = None if on_device else clip.image_size
    lora = add_lora(clip.model, cfg.lora_rank, cfg.lora_alpha)
    untouched = [p.detach().clone() for p in lora]
    tokens = clip.tokenize([cfg.prompt.format(name) for name in data.classnames])
    scale = clip.model.logit_scale.exp().item()
    log.info(f"MG-CLIP ({variant(cfg)}) on {cfg.dataset}: {len(data.classnames)} classes in {len(tasks)} tasks, "
             f"{cfg.model} ({cfg.pretrained}) on {device}, {sum(p.numel() for p in lora):,} LoRA parameters, "
             f"logit scale {scale:.1f}")
    clock = Clock(device)
    state = dict(task=0, epochs=cfg.epochs if cfg.preservation else cfg.epochs or cfg.max_epochs,
                 searched=False, classifier=None, acc=[], matrix=[], rows=[])
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        set_lora(lora, state["lora"])
        torch.set_rng_state(state["rng"])
        clock.seconds.update(state["seconds"])
        clock.images.update(state["images"])
        rows = "".join(json.dumps(r) + "\n" for r in state["rows"])
        replace_atomically(out / "metrics.jsonl", lambda tmp: tmp.write_text(rows))
        log.info(f"resumed from {out / 'checkpoint.pt'} after task {state['task']}")
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    classifier = state["classifier"].to(device) if state["classifier"] is not None else None
    for t in range(state["task"], len(tasks)):
        classes, seen = tasks[t], range(0, tasks[t].stop)
        n_train = int(((data.train.labels >= classes.start) & (data.train.labels < classes.stop)).sum())
        log.info(f"task {t + 1}/{len(tasks)}: classes {classes.start}-{classes.stop - 1} ({n_train} images)")
        with clock("gap", n_train), pretrained_clip(lora, untouched):  # as the authors: S+ / S- of the
            feats, labels = image_features(clip, data.train, classes, cfg, "gap before")  # pre-trained CLIP
            before = modality_gap(feats, text_features(clip, tokens[: seen.stop]), labels, scale)
        trained = False
        if state["epochs"] is None:  # gap preservation, on task 1 only; E* then serves every task
            def s_minus():
                f, y = image_features(clip, data.train, classes, cfg, "gap search")
                return modality_gap(f, text_features(clip, tokens[: seen.stop]), y, scale)[1]
            ran = []  # epochs the probe trained, each followed by one S- pass
            with clock("search"):
                state["epochs"], drifted = search_epochs(
                    (ran.append(e) or e for e in train_task(clip, lora, data.train, tokens, classes,
                                                            cfg.max_epochs, cfg, t + 1)),
                    s_minus, before[1], cfg.alpha)
            clock.images["search"] += 2 * n_train * len(ran)
            state["searched"] = True
            trained = not drifted  # the probe ran its cosine schedule over max_epochs: unless it ran them all,
            if drifted:            # task 1 starts again from the untouched LoRA
                set_lora(lora, untouched)
            log.info(f"  gap preservation: E* = {state['epochs']} epochs per task")
        if not trained:
            with clock("train", n_train * state["epochs"]):
                for _ in train_task(clip, lora, data.train, tokens, classes, state["epochs"], cfg, t + 1):
                    pass
        with clock("features", n_train):
            feats, labels = image_features(clip, data.train, classes, cfg, "features")
            text_seen = text_features(clip, tokens[: seen.stop])
            after = modality_gap(feats, text_seen, labels, scale)
        if cfg.compensation:
            with clock("classifier", n_train * cfg.vis_epochs):
                classifier = train_visual_classifier(classifier, feats, labels, classes, cfg, cfg.seed + t + 1)
        n_test = int((data.test.labels < seen.stop).sum())
        with clock("eval", n_test):
            correct, count = evaluate(clip, data.test, text_seen, classifier, cfg)
        fused = correct[0] if cfg.compensation else correct[1]  # without compensation, the text branch decides
        state["acc"].append(accuracy(fused, count, seen))
        state["matrix"].append([accuracy(fused, count, tasks[j]) for j in range(t + 1)])
        row = dict(task=t + 1, classes=[classes.start, classes.stop], epochs=state["epochs"], acc=state["acc"][-1],
                   acc_text=accuracy(correct[1], count, seen),
                   acc_visual=accuracy(correct[2], count, seen) if cfg.compensation else None,
                   acc_per_task=state["matrix"][-1],
                   gap_before=dict(zip(("s_plus", "s_minus", "centroid"), before)),
                   gap_after=dict(zip(("s_plus", "s_minus", "centroid"), after)))
        state["rows"].append(row)
        state.update(task=t + 1, lora=[p.detach().cpu() for p in lora], rng=torch.get_rng_state(),
                     classifier=classifier.cpu() if classifier is not None else None,
                     seconds=dict(clock.seconds), images=dict(clock.images), settings=dataclasses.asdict(cfg))
        write_json(out / "metrics.jsonl", row, mode="a")
        replace_atomically(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))  # the last good one stays
        log.info(f"  acc {row['acc']:.2f}  (text {row['acc_text']:.2f}, visual {row['acc_visual'] or 0:.2f})  "
                 f"S+ {before[0]:.2f}->{after[0]:.2f}  S- {before[1]:.2f}->{after[1]:.2f} (pre-trained CLIP->trained)")
        if os.environ.get("MGCLIP_STOP_AFTER_TASK") == str(t + 1):  # test hook: a pre-emption after this task
            raise KeyboardInterrupt
    rows = state["rows"]
    summary = dict(config=dataclasses.asdict(cfg), variant=variant(cfg), device=str(device),
                   epochs_star=state["epochs"], epochs_searched=state["searched"],
                   lora_parameters=sum(p.numel() for p in lora),
                   **continual_metrics(state["acc"], state["matrix"]), acc=state["acc"], acc_matrix=state["matrix"],
                   acc_text=[r["acc_text"] for r in rows], acc_visual=[r["acc_visual"] for r in rows],
                   gap=[dict(task=r["task"], before=r["gap_before"], after=r["gap_after"]) for r in rows])
    if zeroshot:
        with clock("zeroshot", 2 * len(zeroshot.test)):
            final = zeroshot_accuracy(clip, zeroshot, cfg)
            with pretrained_clip(lora, untouched):
                first = zeroshot_accuracy(clip, zeroshot, cfg)
        summary["zeroshot"] = dict(dataset=cfg.zeroshot_eval, before=first, after=final,
                                   retained=final / first if first else None)
    summary.update(phases=clock.report(), seconds_total=round(sum(clock.seconds.values()), 3),
                   peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3)
                   if device.type == "cuda" else None)
    write_json(out / "summary.json", summary)
    print_table(summary)
    if cfg.plot:
        plot_run(summary, out / "mgclip.png", plt)
    return summary


def print_table(summary):
    """The run at a glance: accuracy per branch and the gap per task, then Avg / Last / forgetting."""
    lines = [f"{'task':>4} {'acc':>6} {'text':>6} {'visual':>6} {'S+ CLIP>after':>16} {'S- CLIP>after':>16} "
             f"{'gap after':>9}"]
    fmt = lambda v: "   n/a" if v is None else f"{v:6.2f}"
    for g, a, at, av in zip(summary["gap"], summary["acc"], summary["acc_text"], summary["acc_visual"]):
        b, f = g["before"], g["after"]
        lines.append(f"{g['task']:>4} {a:6.2f} {at:6.2f} {fmt(av)} {b['s_plus']:7.2f}>{f['s_plus']:<8.2f} "
                     f"{b['s_minus']:7.2f}>{f['s_minus']:<8.2f} {f['centroid']:9.3f}")
    lines.append(f"Avg {summary['avg']:.2f}  Last {summary['last']:.2f}  "
                 f"forgetting {fmt(summary['forgetting']).strip()}"
                 f"  E* {summary['epochs_star']}  {summary['seconds_total']:.1f}s  -> {summary['config']['out']}")
    if "zeroshot" in summary:
        z = summary["zeroshot"]
        lines.append(f"zero-shot {z['dataset']}: {z['before']:.2f} -> {z['after']:.2f} "
                     f"({100 * (z['retained'] or 0):.1f}% retained)")
    log.info("\n".join(lines))


def pyplot():
    """matplotlib's pyplot for --plot, an optional dependency."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or drop --plot)") from None
    return plt


def plot_run(summary, path: Path, plt):
    """OUT/mgclip.png: accuracy per task for each branch, and S+ / S- of the pre-trained and the trained model."""
    tasks = [g["task"] for g in summary["gap"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("acc", "fused (MG-CLIP)", "o-"), ("acc_text", "text branch", "s--"),
                              ("acc_visual", "visual classifier", "^:")):
        if summary[key][0] is not None:
            left.plot(tasks, summary[key], style, label=label)
    left.set(xlabel="task", ylabel="accuracy on all seen classes (%)", title="Accuracy after each task",
             xticks=tasks, ylim=(0, 100))
    left.legend()
    for key, colour in (("s_plus", "tab:green"), ("s_minus", "tab:red")):
        name = "S+ (matching pairs)" if key == "s_plus" else "S- (non-matching pairs)"
        right.plot(tasks, [g["before"][key] for g in summary["gap"]], "o--", color=colour, alpha=0.5,
                   label=f"{name}, pre-trained CLIP")
        right.plot(tasks, [g["after"][key] for g in summary["gap"]], "o-", color=colour,
                   label=f"{name}, after the task")
    right.set(xlabel="task", ylabel="mean 100 * cos(image, prompt)", xticks=tasks,
              title=f"Modality gap on each task's images (E* = {summary['epochs_star']})")
    right.legend(fontsize=8)
    name = "MG-CLIP" if summary["variant"] == "mgclip" else f"MG-CLIP, {summary['variant']}"
    fig.suptitle(f"{name} on {summary['config']['dataset']}: "
                 f"Avg {summary['avg']:.1f}, Last {summary['last']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"plot: {path}")


def measure_speed(cfg: Settings) -> dict:
    """Images/s of our training step and evaluation batch next to the bare image tower's fwd+bwd and fwd."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = start_device(cfg)
    clip = load_clip(cfg, device)
    lora = add_lora(clip.model, cfg.lora_rank, cfg.lora_alpha)
    size = clip.image_size if not cfg.gpu_preprocess else 32  # --gpu-preprocess: CIFAR-sized uint8 input
    images = lambda n: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    x_train, x_eval = images(cfg.batch_size), images(cfg.eval_batch_size)
    tokens = clip.tokenize([cfg.prompt.format(f"class {i}") for i in range(100)]).to(device)
    y, y_eval = torch.arange(cfg.batch_size, device=device) % 10, torch.arange(cfg.eval_batch_size, device=device) % 100
    opt, scale = torch.optim.Adam(lora, lr=cfg.lr), clip.model.logit_scale.exp().detach()
    text_feats = text_features(clip, tokens)
    w = F.normalize(torch.randn(100, text_feats.shape[1], device=device), dim=-1)
    correct = torch.zeros(3, 100, device=device)

    def bare_train():
        with autocast(device), parametrize.cached():
            clip.model.encode_image(clip.input(x_train)).float().sum().backward()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def bare_eval():
        with autocast(device), parametrize.cached():
            clip.model.encode_image(clip.input(x_eval))

    def our_eval():  # what evaluate() does per batch
        preds = predict(clip, x_eval, text_feats, w, scale, (cfg.text_weight, cfg.visual_weight))
        correct.index_add_(1, y_eval, (preds == y_eval).float())

    clock = Clock(device)

    def timed(name, fn, n_images, repeats=5):
        fn()  # warm-up: kernels, caches
        with clock(name, repeats * n_images):
            for _ in range(repeats):
                fn()
        return clock.images[name] / clock.seconds[name]

    speed = dict(device=str(device), model=cfg.model, image_input=size, batch_size=cfg.batch_size,
                 eval_batch_size=cfg.eval_batch_size,
                 bare_train=timed("bare_train", bare_train, cfg.batch_size),
                 train=timed("train", lambda: train_step(clip, opt, x_train, y, tokens[:10], scale), cfg.batch_size),
                 bare_eval=timed("bare_eval", bare_eval, cfg.eval_batch_size),
                 eval=timed("eval", our_eval, cfg.eval_batch_size))
    speed.update(train_cost_ratio=round(speed["bare_train"] / speed["train"], 3),
                 eval_cost_ratio=round(speed["bare_eval"] / speed["eval"], 3),
                 peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3)
                 if device.type == "cuda" else None)
    speed = {k: round(v, 2) if isinstance(v, float) else v for k, v in speed.items()}
    write_json(out / "speed.json", speed)
    print(json.dumps(speed, indent=2))
    return speed


def main(argv=None):
    """Command line entry: every expected failure ends in one line saying what to do."""
    cfg = None
    try:
        cfg = parse_settings(argv)
        measure_speed(cfg) if cfg.speed else run(cfg)
    except UserError as e:  # raised in a loader worker, it arrives wrapped in that worker's traceback
        sys.exit(f"mgclip: error: {str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"mgclip: error: out of GPU memory; lower --batch-size (now {cfg.batch_size}) "
                 f"or --eval-batch-size (now {cfg.eval_batch_size})")
    except KeyboardInterrupt:
        where = f"; resume with --resume {cfg.out}" if cfg and (Path(cfg.out) / "checkpoint.pt").is_file() else ""
        sys.exit(f"mgclip: interrupted{where}")


# ----------------------------------------------------------------------------
# Class lists and orders, out of the reader's way
# ----------------------------------------------------------------------------
# ImageNet-100 and ImageNet-R: "wnid name" in index order (data/*_classes.tsv), and the class orders of the
# authors' setup (data/class_orders.json): the class at position p of the order is ORDER[p].
IMAGENET100_CLASSES = """
n01440764 tench; n01443537 goldfish; n01484850 great white shark; n01491361 tiger shark; n01494475 hammerhead shark;
n01496331 electric ray; n01498041 stingray; n01514668 rooster; n01514859 hen; n01518878 ostrich; n01530575
brambling; n01531178 goldfinch; n01532829 house finch; n01534433 junco; n01537544 indigo bunting; n01558993 American
robin; n01560419 bulbul; n01580077 jay; n01582220 magpie; n01592084 chickadee; n01601694 American dipper; n01608432
kite (bird of prey); n01614925 bald eagle; n01616318 vulture; n01622779 great grey owl; n01629819 fire salamander;
n01630670 smooth newt; n01631663 newt; n01632458 spotted salamander; n01632777 axolotl; n01641577 American bullfrog;
n01644373 tree frog; n01644900 tailed frog; n01664065 loggerhead sea turtle; n01665541 leatherback sea turtle;
n01667114 mud turtle; n01667778 terrapin; n01669191 box turtle; n01675722 banded gecko; n01677366 green iguana;
n01682714 Carolina anole; n01685808 desert grassland whiptail lizard; n01687978 agama; n01688243 frilled-necked
lizard; n01689811 alligator lizard; n01692333 Gila monster; n01693334 European green lizard; n01694178 chameleon;
n01695060 Komodo dragon; n01697457 Nile crocodile; n01698640 American alligator; n01704323 triceratops; n01728572
worm snake; n01728920 ring-necked snake; n01729322 eastern hog-nosed snake; n01729977 smooth green snake; n01734418
kingsnake; n01735189 garter snake; n01737021 water snake; n01739381 vine snake; n01740131 night snake; n01742172 boa
constrictor; n01744401 African rock python; n01748264 Indian cobra; n01749939 green mamba; n01751748 sea snake;
n01753488 Saharan horned viper; n01755581 eastern diamondback rattlesnake; n01756291 sidewinder rattlesnake;
n01768244 trilobite; n01770081 harvestman; n01770393 scorpion; n01773157 yellow garden spider; n01773549 barn
spider; n01773797 European garden spider; n01774384 southern black widow; n01774750 tarantula; n01775062 wolf
spider; n01776313 tick; n01784675 centipede; n01795545 black grouse; n01796340 ptarmigan; n01797886 ruffed grouse;
n01798484 prairie grouse; n01806143 peafowl; n01806567 quail; n01807496 partridge; n01817953 african grey parrot;
n01818515 macaw; n01819313 sulphur-crested cockatoo; n01820546 lorikeet; n01824575 coucal; n01828970 bee eater;
n01829413 hornbill; n01833805 hummingbird; n01843065 jacamar; n01843383 toucan; n01847000 duck; n01855032
red-breasted merganser; n01855672 goose
"""
IMAGENET_R_CLASSES = """
n01443537 goldfish; n01484850 great_white_shark; n01494475 hammerhead; n01498041 stingray; n01514859 hen; n01518878
ostrich; n01531178 goldfinch; n01534433 junco; n01614925 bald_eagle; n01616318 vulture; n01630670 common_newt;
n01632777 axolotl; n01644373 tree_frog; n01677366 common_iguana; n01694178 African_chameleon; n01748264
Indian_cobra; n01770393 scorpion; n01774750 tarantula; n01784675 centipede; n01806143 peacock; n01820546 lorikeet;
n01833805 hummingbird; n01843383 toucan; n01847000 drake; n01855672 goose; n01860187 black_swan; n01882714 koala;
n01910747 jellyfish; n01944390 snail; n01983481 American_lobster; n01986214 hermit_crab; n02007558 flamingo;
n02009912 American_egret; n02051845 pelican; n02056570 king_penguin; n02066245 grey_whale; n02071294 killer_whale;
n02077923 sea_lion; n02085620 Chihuahua; n02086240 Shih-Tzu; n02088094 Afghan_hound; n02088238 basset; n02088364
beagle; n02088466 bloodhound; n02091032 Italian_greyhound; n02091134 whippet; n02092339 Weimaraner; n02094433
Yorkshire_terrier; n02096585 Boston_bull; n02097298 Scotch_terrier; n02098286 West_Highland_white_terrier; n02099601
golden_retriever; n02099712 Labrador_retriever; n02102318 cocker_spaniel; n02106030 collie; n02106166 Border_collie;
n02106550 Rottweiler; n02106662 German_shepherd; n02108089 boxer; n02108915 French_bulldog; n02109525 Saint_Bernard;
n02110185 Siberian_husky; n02110341 dalmatian; n02110958 pug; n02112018 Pomeranian; n02112137 chow; n02113023
Pembroke; n02113624 toy_poodle; n02113799 standard_poodle; n02114367 timber_wolf; n02117135 hyena; n02119022
red_fox; n02123045 tabby; n02128385 leopard; n02128757 snow_leopard; n02129165 lion; n02129604 tiger; n02130308
cheetah; n02134084 ice_bear; n02138441 meerkat; n02165456 ladybug; n02190166 fly; n02206856 bee; n02219486 ant;
n02226429 grasshopper; n02233338 cockroach; n02236044 mantis; n02268443 dragonfly; n02279972 monarch; n02317335
starfish; n02325366 wood_rabbit; n02346627 porcupine; n02356798 fox_squirrel; n02363005 beaver; n02364673
guinea_pig; n02391049 zebra; n02395406 hog; n02398521 hippopotamus; n02410509 bison; n02423022 gazelle; n02437616
llama; n02445715 skunk; n02447366 badger; n02480495 orangutan; n02480855 gorilla; n02481823 chimpanzee; n02483362
gibbon; n02486410 baboon; n02510455 giant_panda; n02526121 eel; n02607072 anemone_fish; n02655020 puffer; n02672831
accordion; n02701002 ambulance; n02749479 assault_rifle; n02769748 backpack; n02793495 barn; n02797295 barrow;
n02802426 basketball; n02808440 bathtub; n02814860 beacon; n02823750 beer_glass; n02841315 binoculars; n02843684
birdhouse; n02883205 bow_tie; n02906734 broom; n02909870 bucket; n02939185 caldron; n02948072 candle; n02950826
cannon; n02951358 canoe; n02966193 carousel; n02980441 castle; n02992529 cellular_telephone; n03124170 cowboy_hat;
n03272010 electric_guitar; n03345487 fire_engine; n03372029 flute; n03424325 gasmask; n03452741 grand_piano;
n03467068 guillotine; n03481172 hammer; n03494278 harmonica; n03495258 harp; n03498962 hatchet; n03594945 jeep;
n03602883 joystick; n03630383 lab_coat; n03649909 lawn_mower; n03676483 lipstick; n03710193 mailbox; n03773504
missile; n03775071 mitten; n03888257 parachute; n03930630 pickup; n03947888 pirate; n04086273 revolver; n04118538
rugby_ball; n04133789 sandal; n04141076 sax; n04146614 school_bus; n04147183 schooner; n04192698 shield; n04254680
soccer_ball; n04266014 space_shuttle; n04275548 spider_web; n04310018 steam_locomotive; n04325704 stole; n04347754
submarine; n04389033 tank; n04409515 tennis_ball; n04465501 tractor; n04487394 trombone; n04522168 vase; n04536866
violin; n04552348 warplane; n04591713 wine_bottle; n07614500 ice_cream; n07693725 bagel; n07695742 pretzel;
n07697313 cheeseburger; n07697537 hotdog; n07714571 head_cabbage; n07714990 broccoli; n07718472 cucumber; n07720875
bell_pepper; n07734744 mushroom; n07742313 Granny_Smith; n07745940 strawberry; n07749582 lemon; n07753275 pineapple;
n07753592 banana; n07768694 pomegranate; n07873807 pizza; n07880968 burrito; n07920052 espresso; n09472597 volcano;
n09835506 ballplayer; n10565667 scuba_diver; n12267677 acorn
"""
CIFAR100_ORDER = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32,
                  45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73,
                  1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89,
                  43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39]
IMAGENET100_ORDER = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
                     19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31,
                     54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18,
                     94, 11, 12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29,
                     49, 57, 33]
IMAGENET_R_ORDER = [150, 119, 193, 2, 75, 179, 129, 68, 145, 53, 171, 133, 31, 103, 146, 174, 149, 40, 142, 30, 183,
                    156, 167, 166, 124, 56, 109, 198, 185, 170, 51, 55, 77, 32, 45, 23, 115, 39, 134, 177, 12, 126,
                    130, 37, 19, 34, 0, 135, 161, 108, 128, 18, 141, 24, 154, 160, 78, 85, 89, 73, 152, 112, 114,
                    104, 44, 93, 138, 107, 100, 163, 3, 148, 147, 35, 199, 50, 25, 96, 79, 172, 98, 140, 22, 162, 6,
                    27, 60, 144, 197, 67, 165, 196, 102, 71, 65, 47, 9, 122, 42, 63, 61, 180, 97, 84, 157, 168, 69,
                    41, 83, 92, 190, 191, 59, 72, 111, 155, 105, 57, 17, 116, 13, 28, 43, 136, 5, 14, 169, 7, 62,
                    110, 189, 95, 8, 4, 137, 194, 90, 74, 70, 113, 186, 132, 192, 33, 36, 158, 188, 94, 121, 164,
                    58, 11, 178, 151, 184, 1, 10, 64, 15, 106, 52, 176, 26, 81, 82, 88, 125, 46, 123, 91, 187, 86,
                    20, 76, 80, 66, 120, 131, 16, 159, 101, 87, 99, 195, 143, 21, 49, 38, 181, 29, 153, 54, 173,
                    127, 117, 182, 139, 118, 48, 175]

if __name__ == "__main__":
    main()
