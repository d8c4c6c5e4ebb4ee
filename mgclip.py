"""MG-CLIP: Mind the Gap -- preserving and compensating for the modality gap in CLIP-based class-incremental
learning (ICCV 2025, arXiv 2507.09118), in one file read top to bottom in the order of the method:
settings -> data -> model and LoRA -> gap measurement -> training with gap preservation -> gap compensation
-> evaluation -> one task; below a marker, the plumbing (loaders, the run, checkpoints, logs, main).

    python mgclip.py --dataset cifar100 --tasks 10      # the paper's CIFAR-100 B0 Inc10 (Avg 87.00 / Last 80.57)
    python mgclip.py --dataset synthetic --model tiny   # offline demo on a CPU in ~10 s (Avg 46.48 / Last 32.81)

Evidence: compared end to end with the authors' code (linlany/MindtheGap) on the CPU in fp32 (LoRA gradients,
S+ / S-, the probe's E*, the classifier's weights and every prediction agree to ~1e-5); the synthetic numbers
above are checked by the tests. Timings: README.md, Performance, and benchmarks/speed.py.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import socket
import sys
import textwrap
import time
import typing
import urllib.parse
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

log = logging.getLogger("mgclip")


class UserError(ValueError):
    """A mistake in the command line or the data: reported as one line, never a traceback."""


# ------------------------------------------------------------------------------------------------------------- Settings
def arg(default, group: str, help: str):
    """A settings field with its --help group and text."""
    return field(default=default, metadata=dict(group=group, help=help))


METHOD, ABLATIONS, DATA, RUN = "method", "ablations", "data", "run and outputs"  # the groups of --help


@dataclass
class Settings:
    """Every knob of a run; each field is a command-line flag (--tasks, --vis-lr, ...). None: per-dataset default."""
    model: str | None = arg(None, METHOD, "open_clip model name, or 'tiny' (a random-init toy CLIP)")
    pretrained: str | None = arg(None, METHOD, "open_clip weight tag, file or 'none' (default: openai; tiny: none)")
    lora_rank: int = arg(8, METHOD, "LoRA rank r")
    lora_alpha: float = arg(1.0, METHOD, "LoRA alpha (delta W = alpha / r * B @ A)")
    prompt: str = arg("a good photo of a {}.", METHOD, "prompt template; {} becomes the class name")
    lr: float | None = arg(None, METHOD, "Adam learning rate of LoRA")
    batch_size: int | None = arg(None, METHOD, "training batch")
    epochs: int | None = arg(None, METHOD, "epochs per task (default: E*, found by gap preservation on task 1)")
    alpha: float = arg(0.1, METHOD, "gap preservation: stop when |S-(e) - S-(0)| / |S-(0)| exceeds alpha")
    max_epochs: int = arg(10, METHOD, "gap preservation: most epochs searched on task 1")
    vis_lr: float | None = arg(None, METHOD, "visual classifier learning rate")
    vis_batch_size: int | None = arg(None, METHOD, "visual classifier batch")
    vis_epochs: int | None = arg(None, METHOD, "visual classifier epochs per task")
    precision: str = arg("fp32", METHOD, "fp32 (the authors'), tf32 (TF32 matmuls on CUDA) or bf16 (autocast)")
    text_weight: float = arg(1.0, METHOD, "fusion weight of the text branch")
    visual_weight: float = arg(4.0, METHOD, "fusion weight of the visual classifier")
    preservation: bool = arg(True, ABLATIONS, "without gap preservation: no search, --epochs or --max-epochs per task")
    compensation: bool = arg(True, ABLATIONS, "without gap compensation: the text branch alone predicts")
    dataset: str = arg("cifar100", DATA, "cifar100 | imagenet100 | imagenet-r | imagenet | folder | synthetic")
    data_root: str = arg("data", DATA, "folder of cifar-100-python/, or of train/ and val/ (or test/)")
    tasks: int | None = arg(None, DATA, "number of tasks T")
    initial_increment: int = arg(0, DATA, "classes in the first task; 0 splits all classes evenly")
    class_order: str | None = arg(None, DATA, "file of class indices (default: the published order, or seeded)")
    split_file: list[str] | None = arg(None, DATA, "the authors' split lists (RAPF's ImageNet-R, continuum's "
                                                   "train_100.txt val_100.txt); entries relative to --data-root")
    download: bool = arg(True, DATA, "never download weights, CIFAR-100 or Food-101 (as HF_HUB_OFFLINE=1)")
    syn_classes: int = arg(20, DATA, "synthetic: number of classes")
    syn_train: int = arg(48, DATA, "synthetic: training images per class")
    syn_test: int = arg(16, DATA, "synthetic: test images per class")
    syn_size: int = arg(32, DATA, "synthetic: image side in pixels")
    seed: int | None = arg(None, RUN, "random seed")
    device: str = arg("auto", RUN, "auto | cuda | cuda:N | mps | cpu")
    workers: int = arg(4, RUN, "data-loader processes that decode and resize images")
    eval_batch_size: int = arg(256, RUN, "batch for feature passes and evaluation")
    out: str | None = arg(None, RUN, "output folder (default: runs/<dataset>-T<tasks>-seed<seed>[-variant])")
    resume: str | None = arg(None, RUN, "continue the run in this output folder after its last finished task")
    zeroshot_eval: str | None = arg(None, RUN, "zero-shot accuracy on this dataset before and after (food101, ...)")
    zeroshot_root: str | None = arg(None, RUN, "--data-root of the --zeroshot-eval dataset")
    plot: bool = arg(False, RUN, "draw OUT/mgclip.png: accuracy and S+ / S- per task (needs matplotlib)")
    progress: bool = arg(False, RUN, "show progress bars even when stderr is not a terminal")


# The authors' per-dataset settings (imagenet: their imagenet1000_100-100.yaml); flags override them.
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
# The smallest allowed value of each numeric setting (None: not set); lr, vis_lr, alpha, lora_alpha must be > 0.
AT_LEAST = dict(tasks=1, initial_increment=0, epochs=1, max_epochs=1, batch_size=1, vis_batch_size=1, vis_epochs=0,
                lora_rank=1, text_weight=0, visual_weight=0, syn_classes=2, syn_train=1, syn_test=1, syn_size=8,
                seed=0, workers=0, eval_batch_size=1)
PRECISIONS = ("fp32", "tf32", "bf16")
FOLDER_DATASETS = ("imagenet100", "imagenet-r", "imagenet", "folder")
# What a resumed run may change; every other setting changes the numbers and must stay.
FREE_ON_RESUME = {"data_root", "download", "device", "workers", "eval_batch_size", "out", "resume", "zeroshot_root",
                  "plot", "progress"}


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, a word for a number) are one line, like every other error."""

    def error(self, message):
        raise UserError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, in --help groups; on/off flags only in the direction a user types them."""
    parser = Parser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    groups = {name: parser.add_argument_group(name) for name in (METHOD, ABLATIONS, DATA, RUN)}
    for f in dataclasses.fields(Settings):
        group, text = groups[f.metadata["group"]], f.metadata["help"]
        flag = "--" + f.name.replace("_", "-")
        kind = next(a for a in typing.get_args(f.type) or [f.type] if a is not type(None))
        if f.default is True:
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=text)
        elif f.default is False:
            group.add_argument(flag, action="store_true", help=text)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="+", metavar="FILE", help=text)
        else:
            default = "" if f.default is None else f" (default: {f.default})"
            if f.name in DATASET_DEFAULTS["cifar100"]:
                default = " (default: " + ", ".join(f"{d} {v[f.name]}" for d, v in DATASET_DEFAULTS.items()) + ")"
            group.add_argument(flag, type=kind, metavar=f.name.upper(), help=text + default)
    return parser


def parse_settings(argv=None) -> Settings:
    """Settings from the command line and the dataset's defaults; a run already in OUT continues with its own."""
    given = vars(build_parser().parse_args(argv))  # only the flags on the command line
    out = given.get("resume")
    fix = "drop it to continue that run, or start a new one with another --out and without --resume"
    if out is None:
        cfg = with_defaults(Settings(**given))
        if not (Path(cfg.out) / "checkpoint.pt").is_file():
            return cfg
        out, given = cfg.out, dataclasses.asdict(cfg)  # a rerun (a resubmitted job): continue it, never overwrite it
        fix = f"continue that run with --resume {out} (its own settings), or give a new --out"
    elif Path(given.get("out", out)) != Path(out):
        raise UserError(f"--resume {out} continues the run in its own folder; drop --out {given['out']}")
    saved = {**dataclasses.asdict(Settings()), **load_checkpoint(out)["settings"]}  # older runs: today's defaults
    changed = [k for k in sorted(given.keys() - FREE_ON_RESUME) if given[k] != saved[k]]
    if changed:
        key = changed[0]
        raise UserError(f"--{key.replace('_', '-')} {given[key]} differs from {saved[key]} in the run in {out}; {fix}")
    known = {f.name for f in dataclasses.fields(Settings)}
    cfg = Settings(**{**{k: v for k, v in saved.items() if k in known}, **given, "out": out, "resume": out})
    check_settings(cfg)  # the flags a resumed run may change (--workers, --eval-batch-size, ...) are checked too
    return cfg


def with_defaults(cfg: Settings) -> Settings:
    """Fill what the command line left open from the dataset's defaults, check it, and name the output folder."""
    if cfg.dataset not in DATASET_DEFAULTS:
        raise UserError(f"unknown --dataset '{cfg.dataset}'; choose one of {', '.join(DATASET_DEFAULTS)}")
    for key, value in DATASET_DEFAULTS[cfg.dataset].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.pretrained is None:
        cfg.pretrained = "none" if cfg.model == "tiny" else "openai"
    if cfg.model == "tiny" and cfg.pretrained != "none":
        raise UserError("--model tiny is a random-init toy CLIP; drop --pretrained or pass --pretrained none")
    check_settings(cfg)
    if cfg.out is None:
        suffix = "" if variant(cfg) == "mgclip" else "-" + variant(cfg)
        cfg.out = f"runs/{cfg.dataset}-T{cfg.tasks}-seed{cfg.seed}{suffix}"
    return cfg


def check_settings(cfg: Settings):
    """Refuse at once what would fail later or silently train nothing, saying what is allowed."""
    for key, low in AT_LEAST.items():
        if getattr(cfg, key) is not None and not getattr(cfg, key) >= low:
            raise UserError(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(cfg, key)}")
    for key in ("lr", "vis_lr", "alpha", "lora_alpha"):
        if not getattr(cfg, key) > 0:  # also refuses nan
            raise UserError(f"--{key.replace('_', '-')} must be greater than 0, got {getattr(cfg, key)}")
    if cfg.text_weight + cfg.visual_weight <= 0:
        raise UserError("--text-weight and --visual-weight must not both be 0")
    if "{}" not in cfg.prompt:
        raise UserError(f"--prompt '{cfg.prompt}' has no {{}} for the class name; e.g. --prompt 'a photo of a {{}}.'")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision} is not one of {', '.join(PRECISIONS)}")
    if cfg.split_file and cfg.dataset not in FOLDER_DATASETS:
        raise UserError(f"--split-file is for the image-folder datasets ({', '.join(FOLDER_DATASETS)}), "
                        f"not --dataset {cfg.dataset}")
    if cfg.zeroshot_eval and cfg.zeroshot_eval not in ("food101", *DATASET_DEFAULTS):
        raise UserError(f"unknown --zeroshot-eval '{cfg.zeroshot_eval}'; choose food101 or one of "
                        f"{', '.join(DATASET_DEFAULTS)}")


def variant(cfg: Settings) -> str:
    """The paper's row this run reproduces: mgclip, or its ablation without preservation and/or compensation."""
    off = [name for name in ("preservation", "compensation") if not getattr(cfg, name)]
    return "-".join("no-" + name for name in off) or "mgclip"


# ------------------------------------------------------------------------------------------- Data: tasks and benchmarks
def split_tasks(num_classes: int, tasks: int, initial_increment: int = 0) -> list[range]:
    """Cut the class order (positions 0..C-1) into T tasks: B classes first (B = 0: all evenly), the rest evenly."""
    if initial_increment:
        later = tasks - 1
        sizes = [initial_increment] + [(num_classes - initial_increment) // max(later, 1)] * later
    else:
        sizes = [num_classes // max(tasks, 1)] * tasks
    if tasks < 1 or initial_increment > num_classes or sum(sizes) != num_classes or min(sizes) < 2:
        works = " or ".join(str(d) for d in range(1, num_classes // 2 + 1) if num_classes % d == 0)
        after = f" after --initial-increment {initial_increment}" if initial_increment else ""
        raise UserError(f"{num_classes} classes do not split into --tasks {tasks} of at least 2 classes each{after}; "
                        f"use --tasks {works}, or another --initial-increment")
    bounds = [sum(sizes[:i]) for i in range(tasks + 1)]
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


def prepare_pil(image: PIL.Image.Image, size: int | None) -> torch.Tensor:
    """open_clip's test transform up to normalisation (PIL bicubic resize of the short side, center crop), uint8."""
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
        else:
            x = self.images[idx]
        return x, self.labels[idx]


@dataclass
class Benchmark:
    """A class-incremental benchmark: train and test splits and the class names in class order."""
    train: Split
    test: Split
    classnames: list[str]  # in class-order positions: task 1 holds classnames[:n1], ...
    order: list[int]  # the dataset's class index at each position


def download_forbidden(cfg: Settings) -> str | None:
    """What the user said to forbid downloads (--no-download, HF_HUB_OFFLINE=1), or None."""
    if not cfg.download:
        return "--no-download"
    return "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else None


def download(cfg: Settings, name: str, missing: Path, flag: str, fetch):
    """Run torchvision's download of a dataset that lacks `missing`, unless the user forbade downloads."""
    forbidden = download_forbidden(cfg)
    if forbidden:
        raise UserError(f"{name} is missing {missing} and {forbidden} forbids its download; "
                        f"put torchvision's folder of {name} under {flag}")
    try:
        fetch()
    except Exception as e:
        raise UserError(f"could not download {name} into {flag} {cfg.data_root} ({e}); "
                        f"copy torchvision's folder of {name} there instead") from None


def unpickle(path: Path, *keys):
    """The given entries of one CIFAR-100 pickle."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        return [d[k] for k in keys]
    except Exception as e:
        raise UserError(f"corrupt CIFAR-100 file {path} ({type(e).__name__}); delete it and download again") from None


def load_cifar100(cfg: Settings) -> Benchmark:
    """CIFAR-100 in torchvision's on-disk format under --data-root, downloaded only if missing."""
    files = [Path(cfg.data_root) / "cifar-100-python" / name for name in ("train", "test", "meta")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        download(cfg, "CIFAR-100", missing[0], "--data-root",
                 lambda: torchvision.datasets.CIFAR100(cfg.data_root, download=True))
    order = class_order(cfg, 100, CIFAR100_ORDER)
    where, splits = positions(order), []
    for f in files[:2]:
        pixels, labels = unpickle(f, "data", "fine_labels")
        splits.append(Split(where[torch.as_tensor(labels)], torch.from_numpy(pixels).reshape(-1, 3, 32, 32)))
    names = unpickle(files[2], "fine_label_names")[0]
    return Benchmark(*splits, [names[i] for i in order], order)


def load_food101(cfg: Settings) -> Benchmark:
    """Food-101's test split (for zero-shot retention) in torchvision's layout: food-101/images/, food-101/meta/."""
    meta = Path(cfg.data_root) / "food-101" / "meta"
    if not (meta / "test.json").is_file():
        download(cfg, "Food-101", meta / "test.json", "--zeroshot-root",
                 lambda: torchvision.datasets.Food101(cfg.data_root, split="test", download=True))
    classes = (meta / "classes.txt").read_text().split()
    listed = json.loads((meta / "test.json").read_text())  # {class: ["class/id", ...]}
    images = meta.parent / "images"
    files = [(str(images / f"{item}.jpg"), y) for y, c in enumerate(classes) for item in listed.get(c, [])]
    test = Split(torch.tensor([y for _, y in files], dtype=torch.long), files=[f for f, _ in files])
    no_train = Split(torch.zeros(0, dtype=torch.long), files=[])  # zero-shot only: nothing to train on
    return Benchmark(no_train, test, [c.replace("_", " ") for c in classes], list(range(len(classes))))


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
    return Benchmark(train, test, [names[i] for i in order], order)


def class_folders(root: Path) -> list[str]:
    """The class folders (sorted names) directly under root."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


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
    train, test = sorted(train), sorted(test)
    return (Split(whole.labels[train], files=[whole.files[i] for i in train]),
            Split(whole.labels[test], files=[whole.files[i] for i in test]))


def listed_classes(text: str) -> tuple[list[str], list[str]]:
    """WordNet ids and names from a "wnid name; wnid name; ..." list."""
    pairs = [" ".join(entry.split()).split(" ", 1) for entry in text.split(";")]
    return [w for w, _ in pairs], [n for _, n in pairs]


def folder_classes(cfg: Settings, train_dir: Path, test_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """Class folders, class names and class order of an image-folder dataset."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # ImageNet-100: the first 100 ImageNet classes
    if cfg.dataset == "imagenet100":
        return IMAGENET100_WNIDS.split(), list(IMAGENET_CLASSNAMES[:100]), class_order(cfg, 100, IMAGENET100_ORDER)
    if cfg.dataset == "imagenet-r":
        wnids, names = listed_classes(IMAGENET_R_CLASSES)
        return wnids, names, class_order(cfg, 200, IMAGENET_R_ORDER)
    wnids = class_folders(train_dir)
    if wnids != class_folders(test_dir):
        differ = sorted(set(wnids) ^ set(class_folders(test_dir)))
        raise UserError(f"the classes in {train_dir} and {test_dir} differ ({', '.join(differ[:3])}...); "
                        f"both need the same class folders")
    if cfg.dataset == "imagenet":
        if len(wnids) != 1000:
            raise UserError(f"{train_dir} holds {len(wnids)} class folders, ImageNet-1K has 1000")
        return wnids, list(IMAGENET_CLASSNAMES), class_order(cfg, 1000, range(1000))
    names = [n.replace("_", " ") for n in wnids]
    listed = train_dir.parent / "classnames.txt"
    if listed.is_file():
        names = [n.strip() for n in listed.read_text().splitlines() if n.strip()]
        if len(names) != len(wnids):
            raise UserError(f"{listed} has {len(names)} names for {len(wnids)} class folders; "
                            f"give one name per line in sorted folder order")
    return wnids, names, class_order(cfg, len(wnids))


def read_split_files(paths: list[str], root: Path, classes: list[str]) -> tuple[Split, Split]:
    """The train and test images the authors' lists name: RAPF's (a line 'train', paths, a line 'test', paths) or
    continuum's ('train/<wnid>/x.JPEG 0' lines; paths outside train/ are test images); labelled by class folder."""
    where, listed = {c: pos for pos, c in enumerate(classes)}, {"train": [], "test": []}
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --split-file {path} ({type(e).__name__})") from None
        section = None  # RAPF's lists name their sections; continuum's paths start with train/ or val/
        for line in filter(None, (line.strip() for line in lines)):
            if line in ("train", "test"):
                section = line
                continue
            file = line.split()[0]
            listed[section or ("train" if file.startswith("train/") else "test")].append(root / file)
    splits = []
    for part, files in listed.items():
        for file in files:
            if not file.is_file():
                raise UserError(f"{file}, listed in --split-file, does not exist; check --data-root")
            if file.parent.name not in where:
                raise UserError(f"{file}, listed in --split-file, is in no class folder of --dataset")
        if not files:
            raise UserError(f"--split-file lists no {part} images; give the train and the test list")
        files = sorted(files, key=lambda f: (where[f.parent.name], str(f)))
        splits.append(Split(torch.tensor([where[f.parent.name] for f in files]), files=[str(f) for f in files]))
    return splits[0], splits[1]


def load_image_folders(cfg: Settings) -> Benchmark:
    """ImageNet-100, ImageNet-R, ImageNet-1K or any ROOT/train/<class>/ + ROOT/val|test/<class>/ tree."""
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root} does not exist; point it at the folder holding train/ and val/ (or test/)")
    tests = ("test", "val") if cfg.dataset == "imagenet-r" else ("val", "test")  # the authors' ImageNet-R: test/
    test_dir = next((root / s for s in tests if (root / s).is_dir()), None)
    listed = cfg.split_file and cfg.dataset in ("imagenet100", "imagenet-r")  # classes known, no folders needed
    raw = cfg.dataset == "imagenet-r" and not (root / "train").is_dir()
    if not raw and not listed and not (root / "train").is_dir():
        raise UserError(f"no {root / 'train'} folder; expected {root}/train/<class>/ and {root}/val/<class>/")
    if not raw and not listed and test_dir is None:
        raise UserError(f"no {root / 'val'} or {root / 'test'} folder next to {root / 'train'}")
    wnids, names, order = folder_classes(cfg, root / "train", test_dir)
    classes = [wnids[i] for i in order]
    if cfg.split_file:
        train, test = read_split_files(cfg.split_file, root, classes)
    elif raw:
        if not any((root / w).is_dir() for w in wnids):
            raise UserError(f"{root} holds neither train/ and test/ nor ImageNet-R's class folders ({wnids[0]}/, ...); "
                            f"point --data-root at the extracted imagenet-r folder")
        train, test = split_raw_imagenet_r(root, classes, cfg.seed)
    else:
        train, test = folder_split(root / "train", classes), folder_split(test_dir, classes)
    return Benchmark(train, test, [names[i] for i in order], order)


def load_benchmark(cfg: Settings) -> Benchmark:
    """The benchmark named by --dataset (or food101, for zero-shot), labels already in class-order positions."""
    loaders = dict(cifar100=load_cifar100, synthetic=synthetic_benchmark, food101=load_food101)
    return loaders.get(cfg.dataset, load_image_folders)(cfg)


def load_zeroshot(cfg: Settings) -> Benchmark:
    """The --zeroshot-eval dataset (food101 or any --dataset), read from --zeroshot-root."""
    return load_benchmark(dataclasses.replace(cfg, dataset=cfg.zeroshot_eval, class_order=None,
                                              data_root=cfg.zeroshot_root or cfg.data_root))


# ------------------------------------------------ Model: CLIP, and LoRA on the attention keys and values of both towers
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
    mean: torch.Tensor  # (1, 3, 1, 1), on the model's device
    std: torch.Tensor

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images of the model's size (any device) -> the normalised input, on the model's device."""
        return (x.to(self.mean.device, non_blocking=True).float() / 255 - self.mean) / self.std


def load_clip(name: str, pretrained: str, device: torch.device, seed: int = 0) -> Clip:
    """CLIP from open_clip (weights by tag, local file or 'none'), or the tiny random-init one ('tiny', seeded)."""
    import open_clip
    if name == "tiny":
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP, init_logit_scale=math.log(100))
        tokenize = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
    else:
        model, tokenize = open_clip_model(name, pretrained), open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return Clip(model.to(device).eval(), tokenize, size,
                torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def open_clip_model(name: str, pretrained: str) -> nn.Module:
    """open_clip's `name` with weights by tag (from the Hugging Face cache or the hub), from a file, or 'none'."""
    import open_clip
    if name not in open_clip.list_models():
        raise UserError(f"unknown --model '{name}'; pick one of open_clip.list_models() or 'tiny'")
    weights = None if pretrained == "none" else pretrained
    is_tag = weights is not None and not os.path.isfile(weights)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if is_tag and weights not in tags:
        raise UserError(f"--pretrained {weights} is neither a file nor an open_clip tag of {name} ({', '.join(tags)})")
    # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use GELU and only warn
    quick_gelu = is_tag and bool(open_clip.get_pretrained_cfg(name, weights).get("quick_gelu"))
    logging.disable(logging.CRITICAL)  # open_clip and the hub log each retry; we report one line
    try:
        return open_clip.create_model(name, pretrained=weights, force_quick_gelu=quick_gelu)
    except Exception as e:
        reason = textwrap.shorten(str(e) or type(e).__name__, 160, placeholder=" ...")
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise UserError(f"could not load --pretrained {pretrained} for --model {name} ({reason}); weights are "
                        f"looked for in the Hugging Face cache under HF_HOME ({cache}): put them there, pass "
                        f"--pretrained PATH to a local file, or run where they download") from None
    finally:
        logging.disable(logging.NOTSET)


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
    """Freeze CLIP and put LoRA on W_k and W_v of every self-attention block of both towers; returns its weights."""
    model.requires_grad_(False)
    blocks = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim]
    if not blocks:
        raise UserError("this model has no packed nn.MultiheadAttention blocks for LoRA; use a ViT CLIP from open_clip")
    for attn in blocks:
        w = attn.in_proj_weight
        parametrize.register_parametrization(attn, "in_proj_weight", LoRAKeyValue(w.shape[1], rank, alpha).to(w.device))
    return [p for p in model.parameters() if p.requires_grad]


def set_lora(lora: list[nn.Parameter], values: list[torch.Tensor]):
    """Load LoRA weights in place (the untouched ones, B = 0, give back the pre-trained CLIP)."""
    with torch.no_grad():
        for p, w in zip(lora, values):
            p.copy_(w)


@contextmanager
def pretrained_clip(lora: list[nn.Parameter], untouched: list[torch.Tensor]):
    """Within this block the model is the pre-trained CLIP; the trained LoRA weights come back after."""
    trained = [p.detach().clone() for p in lora]
    set_lora(lora, untouched)
    try:
        yield
    finally:
        set_lora(lora, trained)


@contextmanager
def towers(device: torch.device, amp: torch.dtype | None):
    """The context the CLIP towers run in: LoRA merged once per forward, autocast to `amp` unless it is None (fp32)."""
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None), parametrize.cached():
        yield


@torch.no_grad()
def text_features(model: nn.Module, tokens: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """L2-normalised text features t_c of the tokenised prompts (in chunks, for 1000-class datasets)."""
    device = model.logit_scale.device
    with towers(device, amp):
        out = [model.encode_text(t.to(device)) for t in tokens.split(500)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def image_features(model: nn.Module, batches, amp: torch.dtype | None = None):
    """L2-normalised image features v_i and their labels, one pass over batches of (model-ready images, labels)."""
    feats, labels = [], []
    for x, y in batches:
        with towers(x.device, amp):
            feats.append(model.encode_image(x))
        labels.append(y)
    return F.normalize(torch.cat(feats).float(), dim=-1), torch.cat(labels)


# ----------------------------------------------------------------------------------------------------- The modality gap
def modality_gap(image_features, text_features, labels, logit_scale: float):
    """S+ (matching pairs), S- (non-matching pairs), both s * cos with s = exp(model.logit_scale) (100 for CLIP), and
    the centroid gap ||mean_i v_i - mean_c t_c|| (each class prompt counted once)."""
    v = F.normalize(image_features.float(), dim=-1)
    t = F.normalize(text_features.float(), dim=-1)
    pos = logit_scale * (v * t[labels]).sum(-1)
    every = logit_scale * v @ t.sum(0)  # sum over all classes without the (N, C) matrix
    s_minus = ((every - pos) / (len(t) - 1)).mean() if len(t) > 1 else torch.tensor(float("nan"))
    centroid = (v.mean(0) - t.mean(0)).norm()
    return pos.mean().item(), s_minus.item(), centroid.item()


# --------------------------------------------------------------------------------------- Training with gap preservation
def train_step(model: nn.Module, opt, x, y, task_tokens, scale, amp: torch.dtype | None = None) -> torch.Tensor:
    """One LoRA update on the restricted cross-entropy of s * cos(v, t_c) over the current task's classes."""
    with towers(x.device, amp):
        v = model.encode_image(x)
        t = model.encode_text(task_tokens)
    logits = scale * F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_epoch(model: nn.Module, opt, batches, tokens, classes: range, amp: torch.dtype | None = None) -> float:
    """One epoch of LoRA fine-tuning on a task's batches (labels: class-order positions, all within `classes`), with
    the restricted cross-entropy: logits over the task's own classes only, so old classes' prompts are not pushed
    away. Returns the mean loss."""
    device = model.logit_scale.device
    scale = model.logit_scale.exp().detach()
    task_tokens = tokens[classes.start: classes.stop].to(device)
    loss_sum, first_bad, step = torch.zeros((), device=device), torch.full((), -1, device=device), 0
    for step, (x, y) in enumerate(batches, 1):
        loss = train_step(model, opt, x, y - classes.start, task_tokens, scale, amp)
        loss_sum += loss  # kept on the device: no host sync inside the loop
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
    if first_bad.item() >= 0:
        raise FloatingPointError(f"step {first_bad.item()}")
    return loss_sum.item() / max(step, 1)


def lora_optimizer(lora: list[nn.Parameter], lr: float, epochs: int):
    """Adam on the LoRA weights, cosine-annealed per epoch over `epochs` down to 0.01 * lr (fresh every task)."""
    opt = torch.optim.Adam(lora, lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.01 * lr)


def lora_epochs(model, lora, batches, tokens, classes: range, lr: float, epochs: int, amp=None):
    """One task's LoRA fine-tuning, an epoch at a time under one cosine schedule over `epochs` (batches: re-iterable,
    one pass per epoch); yields (epoch, mean loss, the lr the epoch ran at) after each."""
    opt, schedule = lora_optimizer(lora, lr, epochs)
    for epoch in range(1, epochs + 1):
        epoch_lr = schedule.get_last_lr()[0]
        try:
            loss = train_epoch(model, opt, batches, tokens, classes, amp)
        except FloatingPointError as e:
            raise FloatingPointError(f"epoch {epoch}, {e}") from None
        schedule.step()
        yield epoch, loss, epoch_lr


def finetune_lora(model, lora, batches, tokens, classes: range, lr: float, epochs: int, amp=None):
    """LoRA fine-tuning on one task for `epochs` epochs (E*), with the restricted cross-entropy."""
    for epoch, loss, epoch_lr in lora_epochs(model, lora, batches, tokens, classes, lr, epochs, amp):
        log.info(f"  epoch {epoch}/{epochs}  loss {loss:.4f}  lr {epoch_lr:.2e}")


def search_epochs(model, lora, train_batches, feature_batches, tokens, classes: range, lr: float, max_epochs: int,
                  s_minus_0: float, alpha: float, amp=None) -> tuple[int, bool]:
    """Gap preservation on task 1: train epoch by epoch (cosine over max_epochs), measure S- after each, and stop at
    the first epoch e with |S-(e) - S-(0)| / |S-(0)| > alpha. S-(0): the pre-trained CLIP's on the same images and
    prompts. Returns E* = max(e - 1, 1) and whether to retrain: then reset LoRA and finetune_lora for E* epochs."""
    seen_tokens = tokens[: classes.stop]
    scale = model.logit_scale.exp().item()
    for epoch, loss, epoch_lr in lora_epochs(model, lora, train_batches, tokens, classes, lr, max_epochs, amp):
        feats, labels = image_features(model, feature_batches, amp)
        s_minus = modality_gap(feats, text_features(model, seen_tokens, amp), labels, scale)[1]
        drift = abs(s_minus - s_minus_0) / abs(s_minus_0)
        log.info(f"  gap search: epoch {epoch}  loss {loss:.4f}  lr {epoch_lr:.2e}  S- {s_minus:.3f}  "
                 f"relative drift {drift:.3f} (alpha {alpha})")
        if drift > alpha:  # the probe's cosine schedule ran over max_epochs: the real E* epochs start again
            return max(epoch - 1, 1), True
    return max_epochs, False  # it ran them all: the probe is the real training


# ----------------------------------------------------------------------- Gap compensation: the cosine visual classifier
def train_visual_classifier(classifier, feats, labels, classes: range, lr: float, batch_size: int, epochs: int,
                            seed: int) -> torch.Tensor:
    """Grow the classifier W (None at first, else one row per class before `classes`) by the task's class means of v,
    then train the new rows on cos(v, w_c) with cross-entropy over the task's classes (Adam, cosine per step to 0.01
    lr; no temperature, as the authors); old rows stay as they are."""
    y = labels - classes.start
    sums = feats.new_zeros(len(classes), feats.shape[1]).index_add_(0, y, feats)  # class means, no host sync
    new = nn.Parameter(sums / torch.bincount(y, minlength=len(classes)).clamp(min=1).unsqueeze(1))
    opt = torch.optim.Adam([new], lr=lr)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01 * lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).to(feats.device).split(batch_size):
            logits = F.normalize(feats[idx], dim=-1) @ F.normalize(new, dim=-1).T
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return new.detach() if classifier is None else torch.cat([classifier, new.detach()])


def fuse_scores(text_logits, visual_logits, fusion=(1.0, 4.0)):
    """The authors' fusion: (w_t * softmax(softmax(s cos(v, t))) + w_v * softmax(cos(v, w))) / (w_t + w_v)."""
    p_text = text_logits.float().softmax(-1).softmax(-1)  # double softmax, as in the authors' code
    p_vis = visual_logits.float().softmax(-1)
    return (fusion[0] * p_text + fusion[1] * p_vis) / (fusion[0] + fusion[1])


# ---------------------------------------------------------------------------- Evaluation and continual-learning metrics
@torch.no_grad()
def predict(model, x, text_feats, w, scale, fusion=(1.0, 4.0), amp=None) -> torch.Tensor:
    """Fused, text-only and visual-only predictions (3, B) of one batch, from one image-tower pass; text_feats and
    the classifier w are L2-normalised rows, one per seen class."""
    with towers(x.device, amp):
        v = F.normalize(model.encode_image(x).float(), dim=-1)
    text_logits, vis_logits = scale * v @ text_feats.T, v @ w.T
    fused = fuse_scores(text_logits, vis_logits, fusion)
    return torch.stack([fused.argmax(-1), text_logits.argmax(-1), vis_logits.argmax(-1)])


@torch.no_grad()
def evaluate(model, batches, text_feats, classifier, fusion=(1.0, 4.0), amp=None):
    """Per-class correct counts (3, C) of the fused, text-only and visual-only predictions, and per-class image
    counts (C,), over the seen classes C = len(text_feats); classifier None (no compensation): read row 1."""
    device = model.logit_scale.device
    seen = len(text_feats)
    scale = model.logit_scale.exp().float()
    w = F.normalize(classifier if classifier is not None else text_feats, dim=-1)
    correct = torch.zeros(3, seen, device=device)
    count = torch.zeros(seen, device=device)
    for x, y in batches:
        preds = predict(model, x, text_feats, w, scale, fusion, amp)
        correct.index_add_(1, y, (preds == y).float())
        count.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    return correct.cpu(), count.cpu()


def accuracy(correct, count, classes: range) -> float:
    """Top-1 accuracy (%) over the test images of the given classes."""
    part = slice(classes.start, classes.stop)
    return 100.0 * correct[part].sum().item() / max(count[part].sum().item(), 1)


def zeroshot_accuracy(model, batches, tokens, amp=None) -> float:
    """Zero-shot top-1 (%) of the text branch on another dataset's test batches, with its own class prompts."""
    correct, count = evaluate(model, batches, text_features(model, tokens, amp), None, amp=amp)
    return accuracy(correct[1], count, range(len(tokens)))


def continual_metrics(acc: list[float], matrix: list[list[float]]) -> dict:
    """Avg (mean of acc_t), Last (acc_T), forgetting and backward transfer from a[t][j] (j <= t)."""
    T = len(acc)
    old = range(T - 1)
    if T == 1:
        return dict(avg=acc[0], last=acc[0], forgetting=None, bwt=None)
    forgetting = sum(max(matrix[t][j] for t in range(j, T - 1)) - matrix[T - 1][j] for j in old) / (T - 1)
    bwt = sum(matrix[T - 1][j] - matrix[j][j] for j in old) / (T - 1)
    return dict(avg=sum(acc) / T, last=acc[-1], forgetting=forgetting, bwt=bwt)


# -------------------------------------------------------------------------------------- One task: the paper's algorithm
def learn_task(r: "Run", t: int, epochs: int | None, classifier):
    """MG-CLIP on task t of run r (a Run, below), as the paper's algorithm: S+ / S- of the pre-trained CLIP, LoRA
    fine-tuning for E* epochs (searched first when epochs is None: gap preservation), features, S+ / S- after, the
    visual classifier (gap compensation), evaluation on all seen classes. Returns the task's metrics and classifier."""
    cfg, model, classes = r.cfg, r.clip.model, r.tasks[t]
    seen = range(0, classes.stop)
    train = r.batches(r.data.train, classes, f"task {t + 1}", seed=cfg.seed + t + 1)
    n_train = train.images
    log.info(f"task {t + 1}/{len(r.tasks)}: classes {classes.start}-{classes.stop - 1} ({n_train} images)")
    with r.clock("gap", n_train), pretrained_clip(r.lora, r.untouched):  # as the authors: before = pre-trained CLIP
        before = r.gap(classes, "gap before")[3]
    retrain = True
    if epochs is None:  # gap preservation on task 1: E* then serves every task
        probe = r.batches(r.data.train, classes, "gap search")
        with r.clock("search"):
            epochs, retrain = search_epochs(model, r.lora, train, probe, r.tokens, classes, cfg.lr, cfg.max_epochs,
                                            before[1], cfg.alpha, r.amp)
        r.clock.images["search"] += train.served + probe.served
        log.info(f"  gap preservation: E* = {epochs} epochs per task")
        if retrain:
            set_lora(r.lora, r.untouched)
            train = r.batches(r.data.train, classes, f"task {t + 1}", seed=cfg.seed + t + 1)
    if retrain:
        with r.clock("train", n_train * epochs):
            finetune_lora(model, r.lora, train, r.tokens, classes, cfg.lr, epochs, r.amp)
    with r.clock("features", n_train):
        feats, labels, text_seen, after = r.gap(classes, "features")
    if cfg.compensation:
        with r.clock("classifier", n_train * cfg.vis_epochs):
            classifier = train_visual_classifier(classifier, feats, labels, classes, cfg.vis_lr, cfg.vis_batch_size,
                                                 cfg.vis_epochs, cfg.seed + t + 1)
    test = r.batches(r.data.test, seen, "evaluate")
    with r.clock("eval", test.images):
        correct, count = evaluate(model, test, text_seen, classifier, (cfg.text_weight, cfg.visual_weight), r.amp)
    fused = correct[0] if cfg.compensation else correct[1]  # without compensation, the text branch decides
    row = dict(task=t + 1, classes=[classes.start, classes.stop], epochs=epochs, acc=accuracy(fused, count, seen),
               acc_text=accuracy(correct[1], count, seen),
               acc_visual=accuracy(correct[2], count, seen) if cfg.compensation else None,
               acc_per_task=[accuracy(fused, count, r.tasks[j]) for j in range(t + 1)],
               gap_before=dict(zip(("s_plus", "s_minus", "centroid"), before)),
               gap_after=dict(zip(("s_plus", "s_minus", "centroid"), after)))
    log.info(f"  acc {row['acc']:.2f}  (text {row['acc_text']:.2f}, visual {row['acc_visual'] or 0:.2f})  "
             f"S+ {before[0]:.2f}->{after[0]:.2f}  S- {before[1]:.2f}->{after[1]:.2f} (pre-trained CLIP->trained)")
    return row, classifier


# ======================================================================================================================
# Above: the method. Below: the plumbing that runs it (loaders, the run, checkpoints, logs, main).
# ======================================================================================================================
class ShuffledBatches(torch.utils.data.Sampler):
    """Lists of indices, batch by batch; with a seed, pass p is the permutation drawn from seed * 1000 + p."""

    def __init__(self, idx: torch.Tensor, batch_size: int, seed: int | None):
        self.idx, self.batch_size, self.seed, self.passes = idx, batch_size, seed, 0

    def __len__(self):
        return math.ceil(len(self.idx) / self.batch_size)

    def __iter__(self):  # the DataLoader may call this more than once per pass: Batches counts the passes
        idx = self.idx
        if self.seed is not None:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.seed * 1000 + self.passes))]
        return iter([chunk.tolist() for chunk in idx.split(self.batch_size)])


class Batches:
    """Model-ready (images, labels) of one split's classes on the model's device, pass after pass (loader workers
    stay alive between passes); counts the images it served, for the images/s in summary.json."""

    def __init__(self, split: Split, classes: range, batch_size: int, clip: Clip, workers: int,
                 seed: int | None = None, desc: str = "", progress: bool = False):
        idx = torch.nonzero((split.labels >= classes.start) & (split.labels < classes.stop)).squeeze(1)
        busy = split.files is not None or split.size is not None  # decoding or resizing: worth worker processes
        workers = min(workers, os.cpu_count() or 1) if busy else 0
        device = clip.mean.device
        self.loader = torch.utils.data.DataLoader(
            split, sampler=ShuffledBatches(idx, batch_size, seed), batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
        self.images = len(idx)
        self.clip, self.device, self.desc, self.progress, self.served = clip, device, desc, progress, 0

    def __iter__(self):
        self.loader.sampler.passes += 1
        for x, y in tqdm(self.loader, desc=self.desc, leave=False, disable=not self.progress):
            self.served += len(y)
            yield self.clip.input(x), y.to(self.device, non_blocking=True)


class Clock:
    """Seconds and images per phase (device-synchronised), for summary.json."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.images = device, defaultdict(float), defaultdict(int)

    @contextmanager
    def __call__(self, phase: str, images: int = 0):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - start
        self.images[phase] += images


@dataclass
class Run:
    """What every task of a run shares: the settings, the data, CLIP with its LoRA, the prompts, the clock."""
    cfg: Settings
    data: Benchmark
    tasks: list[range]
    clip: Clip
    lora: list[nn.Parameter]
    untouched: list[torch.Tensor]  # LoRA at start (B = 0): the pre-trained CLIP
    tokens: torch.Tensor  # the prompts of every class, in class order
    clock: Clock
    amp: torch.dtype | None = None
    progress: bool = False

    def batches(self, split: Split, classes: range, desc: str, seed: int | None = None) -> Batches:
        """Training batches when seeded (shuffled), feature/evaluation batches otherwise."""
        size = self.cfg.batch_size if seed is not None else self.cfg.eval_batch_size
        return Batches(split, classes, size, self.clip, self.cfg.workers, seed, desc, self.progress)

    def gap(self, classes: range, desc: str):
        """Features v_i of the task's training images and t_c of all seen classes' prompts, and (S+, S-, centroid)."""
        model = self.clip.model
        feats, labels = image_features(model, self.batches(self.data.train, classes, desc), self.amp)
        text = text_features(model, self.tokens[: classes.stop], self.amp)
        return feats, labels, text, modality_gap(feats, text, labels, model.logit_scale.exp().item())


def pick_device(name: str) -> torch.device:
    """The fastest available device: cuda, then mps, then cpu (or the one named)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if (device.index or 0) >= count.get(device.type, 0):
        raise UserError(f"--device {name} is not available here; use --device auto")
    return device


def set_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """The towers' numerics; returns their autocast dtype. fp32: PyTorch's defaults, as the authors ran; tf32: TF32
    matmuls and convolutions on CUDA; bf16: autocast to bfloat16 (with TF32). LoRA's weights, the visual classifier
    and Adam's state stay fp32 (under bf16, LoRA's B @ A is rounded to bf16 like the weight it is added to)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    return torch.bfloat16 if precision == "bf16" else None


def settle_offline(cfg: Settings):
    """Treat the machine as offline (HF_HUB_OFFLINE=1, read when huggingface_hub is imported) on --no-download or
    when the hub does not answer within 3 s: weights then come from the cache or fail at once, never a retry loop."""
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))  # or a mirror
    if not download_forbidden(cfg):
        try:
            socket.create_connection((hub.hostname, hub.port or (443 if hub.scheme == "https" else 80)), 3).close()
            return
        except OSError:
            pass
    os.environ["HF_HUB_OFFLINE"] = "1"


def set_up(cfg: Settings) -> tuple[Run, Benchmark | None]:
    """Device (seeded), data, CLIP with LoRA and the prompts of a run, and the zero-shot benchmark if any."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # every device's generator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # summary.json's peak is this run's
    data = load_benchmark(cfg)
    tasks = split_tasks(len(data.classnames), cfg.tasks, cfg.initial_increment)
    zeroshot = load_zeroshot(cfg) if cfg.zeroshot_eval else None
    if cfg.model != "tiny" and cfg.pretrained != "none" and not os.path.isfile(cfg.pretrained):
        settle_offline(cfg)  # after the data: it only decides how the weights load
    clip = load_clip(cfg.model, cfg.pretrained, device, cfg.seed)
    for split in [data.train, data.test] + ([zeroshot.test] if zeroshot else []):
        stored = split.files is None and split.images.shape[-2:] == (clip.image_size,) * 2
        split.size = None if stored else clip.image_size  # files and other sizes: resized in the loader workers
    lora = add_lora(clip.model, cfg.lora_rank, cfg.lora_alpha)
    tokens = clip.tokenize([cfg.prompt.format(name) for name in data.classnames])
    r = Run(cfg, data, tasks, clip, lora, [p.detach().clone() for p in lora], tokens, Clock(device),
            set_precision(device, cfg.precision), cfg.progress or sys.stderr.isatty())
    log.info(f"MG-CLIP ({variant(cfg)}) on {cfg.dataset}: {len(data.classnames)} classes in {len(tasks)} tasks, "
             f"{cfg.model} ({cfg.pretrained}) on {device}, {sum(p.numel() for p in lora):,} LoRA parameters, "
             f"logit scale {clip.model.logit_scale.exp().item():.1f}")
    return r, zeroshot


def run(cfg: Settings) -> dict:
    """MG-CLIP over all tasks: set up, then for each task learn, evaluate and checkpoint; then the summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, append=bool(cfg.resume))
    plt = pyplot() if cfg.plot else None  # a missing matplotlib should stop the run now, not after training
    r, zeroshot = set_up(cfg)
    # E* for every task: --epochs if given, else searched on task 1 (None), or --max-epochs without preservation
    epochs = cfg.epochs or (None if cfg.preservation else cfg.max_epochs)
    state = dict(rows=[], classifier=None, searched=False, epochs=epochs)
    if cfg.resume:
        state = resume_state(r, out)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    classifier = state["classifier"].to(r.clip.mean.device) if state["classifier"] is not None else None
    for t in range(len(state["rows"]), len(r.tasks)):
        state["searched"] |= state["epochs"] is None
        try:
            row, classifier = learn_task(r, t, state["epochs"], classifier)
        except FloatingPointError as e:
            raise UserError(f"non-finite loss in task {t + 1}, {e}; lower --lr (now {cfg.lr:g}); the checkpoint "
                            f"of the tasks before is intact") from None
        state["rows"].append(row)
        state.update(epochs=row["epochs"], lora=[p.detach().cpu() for p in r.lora], rng=torch.get_rng_state(),
                     classifier=classifier.cpu() if classifier is not None else None,
                     seconds=dict(r.clock.seconds), images=dict(r.clock.images), settings=dataclasses.asdict(cfg))
        write_json(out / "metrics.jsonl", row, mode="a")
        replace_atomically(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))  # the last good one stays
        if os.environ.get("MGCLIP_STOP_AFTER_TASK") == str(t + 1):  # test hook: a pre-emption after this task
            raise KeyboardInterrupt
    summary = summarize(r, state, zeroshot)
    write_json(out / "summary.json", summary)
    print_table(summary)
    if plt is not None:
        plot_run(summary, out / "mgclip.png", plt)
    return summary


def summarize(r: Run, state: dict, zeroshot: Benchmark | None) -> dict:
    """summary.json: the settings and data, Avg / Last / forgetting, the accuracy matrix, per-branch accuracies, the
    gap per task, zero-shot retention, and seconds and images/s per phase."""
    cfg, rows, clock = r.cfg, state["rows"], r.clock
    summary = dict(config=dataclasses.asdict(cfg), variant=variant(cfg), device=str(r.clip.mean.device),
                   classnames=r.data.classnames, class_order=r.data.order, train_images=len(r.data.train),
                   test_images=len(r.data.test), epochs_star=state["epochs"], epochs_searched=state["searched"],
                   lora_parameters=sum(p.numel() for p in r.lora),
                   **continual_metrics([row["acc"] for row in rows], [row["acc_per_task"] for row in rows]),
                   acc=[row["acc"] for row in rows], acc_matrix=[row["acc_per_task"] for row in rows],
                   acc_text=[row["acc_text"] for row in rows], acc_visual=[row["acc_visual"] for row in rows],
                   gap=[dict(task=row["task"], before=row["gap_before"], after=row["gap_after"]) for row in rows])
    if zeroshot:
        tokens = r.clip.tokenize([cfg.prompt.format(name) for name in zeroshot.classnames])
        every = range(len(zeroshot.classnames))
        with clock("zeroshot", 2 * len(zeroshot.test)):
            final = zeroshot_accuracy(r.clip.model, r.batches(zeroshot.test, every, "zero-shot"), tokens, r.amp)
            with pretrained_clip(r.lora, r.untouched):
                first = zeroshot_accuracy(r.clip.model, r.batches(zeroshot.test, every, "zero-shot"), tokens, r.amp)
        summary["zeroshot"] = dict(dataset=cfg.zeroshot_eval, before=first, after=final,
                                   retained=final / first if first else None)
    summary["phases"] = {p: dict(seconds=round(s, 3), images_per_second=round(clock.images[p] / s, 1) if s else None)
                         for p, s in clock.seconds.items()}
    cuda = r.clip.mean.device.type == "cuda"
    summary.update(seconds_total=round(sum(clock.seconds.values()), 3),
                   peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None)
    return summary


def resume_state(r: Run, out: Path) -> dict:
    """The checkpoint's state, loaded into LoRA, the RNG and the clock; metrics.jsonl cut back to its tasks."""
    state = load_checkpoint(str(out))
    set_lora(r.lora, state["lora"])
    torch.set_rng_state(state["rng"])
    r.clock.seconds.update(state["seconds"])
    r.clock.images.update(state["images"])
    rows = "".join(json.dumps(row) + "\n" for row in state["rows"])
    replace_atomically(out / "metrics.jsonl", lambda tmp: tmp.write_text(rows))
    log.info(f"continuing the run in {out} after task {len(state['rows'])} (from its checkpoint.pt)")
    return state


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
        raise UserError(f"--resume {out}: no checkpoint.pt there; give the --out folder of an earlier run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume {out}: checkpoint.pt is unreadable ({type(e).__name__}); start the run "
                        f"afresh") from None


class TqdmHandler(logging.Handler):
    """Log lines printed between the progress bars."""

    def emit(self, record):
        tqdm.write(self.format(record))


def setup_logging(out: Path, append: bool):
    """Log lines to the terminal and to OUT/log.txt."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in (TqdmHandler(), logging.FileHandler(out / "log.txt", mode="a" if append else "w")):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


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
    for key, colour, name in (("s_plus", "tab:green", "S+ (matching pairs)"),
                              ("s_minus", "tab:red", "S- (non-matching pairs)")):
        right.plot(tasks, [g["before"][key] for g in summary["gap"]], "o--", color=colour, alpha=0.5,
                   label=f"{name}, pre-trained CLIP")
        right.plot(tasks, [g["after"][key] for g in summary["gap"]], "o-", color=colour,
                   label=f"{name}, after the task")
    right.set(xlabel="task", ylabel="mean 100 * cos(image, prompt)", xticks=tasks,
              title=f"Modality gap on each task's images (E* = {summary['epochs_star']})")
    right.legend(fontsize=8)
    name = "MG-CLIP" if summary["variant"] == "mgclip" else f"MG-CLIP, {summary['variant']}"
    fig.suptitle(f"{name} on {summary['config']['dataset']}: Avg {summary['avg']:.1f}, Last {summary['last']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"plot: {path}")


def stop(cfg: Settings | None, message: str, code: int = 1):
    """Exit with one line on stderr, also appended to the run's log.txt when the run has one."""
    if cfg is not None and (Path(cfg.out) / "log.txt").is_file():
        with open(Path(cfg.out) / "log.txt", "a") as fh:
            fh.write(message + "\n")
    print(message, file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    """Command line entry: every expected failure ends in one line saying what to do, and a non-zero exit."""
    cfg = None
    try:
        cfg = parse_settings(argv)
        run(cfg)
    except UserError as e:  # raised in a loader worker, it arrives wrapped in that worker's traceback
        stop(cfg, f"mgclip: error: {str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]}")
    except torch.cuda.OutOfMemoryError:
        stop(cfg, f"mgclip: error: out of GPU memory; lower --batch-size (now {cfg.batch_size}) "
                  f"or --eval-batch-size (now {cfg.eval_batch_size})")
    except KeyboardInterrupt:
        where = f"; resume with --resume {cfg.out}" if cfg and (Path(cfg.out) / "checkpoint.pt").is_file() else ""
        stop(cfg, f"mgclip: interrupted{where}", 130)


# ---------------------------------------------------------------------- Class lists and orders, out of the reader's way
# ImageNet-100 is the first 100 ImageNet-1K classes (names: open_clip's); ImageNet-R lists "wnid name" in index
# order. The orders are those of the authors' setup: the class at position p of the order is ORDER[p].
IMAGENET100_WNIDS = """
n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859 n01518878 n01530575
n01531178 n01532829 n01534433 n01537544 n01558993 n01560419 n01580077 n01582220 n01592084 n01601694 n01608432
n01614925 n01616318 n01622779 n01629819 n01630670 n01631663 n01632458 n01632777 n01641577 n01644373 n01644900
n01664065 n01665541 n01667114 n01667778 n01669191 n01675722 n01677366 n01682714 n01685808 n01687978 n01688243
n01689811 n01692333 n01693334 n01694178 n01695060 n01697457 n01698640 n01704323 n01728572 n01728920 n01729322
n01729977 n01734418 n01735189 n01737021 n01739381 n01740131 n01742172 n01744401 n01748264 n01749939 n01751748
n01753488 n01755581 n01756291 n01768244 n01770081 n01770393 n01773157 n01773549 n01773797 n01774384 n01774750
n01775062 n01776313 n01784675 n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953
n01818515 n01819313 n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01847000 n01855032
n01855672
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
