"""MG-CLIP in one file: "Mind the Gap: Preserving and Compensating for the Modality Gap in CLIP-Based
Continual Learning" (ICCV 2025, arXiv 2507.09118). CLIP learns new classes task after task, without replay:

    add LoRA (B = 0) to W_k, W_v of every attention block of both towers; freeze the rest   add_lora
    for task t = 1..T, with only task t's training images:                                  learn_tasks
        S+ / S- on task t's images and the seen prompts, of the pre-trained CLIP  measure_gap in pretrained_clip
        t = 1, gap preservation: fine-tune epoch by epoch (at most 10); at the first epoch  search_epochs
            e where S- drifts by more than alpha = 10% from the pre-trained S-(0), E* = max(e - 1, 1) for all
            tasks; task 1 keeps the probe's epoch 1 if E* = 1, else restarts from B = 0 (no drift: E* = 10)
        fine-tune LoRA for E* epochs: cross-entropy of s cos(v, t_c) over task t's classes  finetune
        image features v of task t's training images; S+ / S- after                       image_features
        gap compensation: task t's cosine-classifier rows start at their class means  train_visual_classifier
            of v and train on v; the rows of earlier tasks stay as they are
        predict over all seen classes: (softmax(softmax(s cos(v, t))) + 4 softmax(cos(v, w))) / 5  evaluate
    Avg = mean accuracy over the tasks, Last = accuracy after task T, forgetting        continual_metrics
    later, new classes: the last state goes on with new tasks alone   learn_tasks(..., state=), --continue-from

    python mgclip.py --dataset cifar100   # the paper's CIFAR-100 B0 Inc10 (10 tasks): Avg 87.00 / Last 80.57
    python mgclip.py --dataset synthetic  # offline, a tiny CLIP on a CPU, ~10 s: Avg 46.48 / Last 32.81

Evidence: against the authors' code (linlany/MindtheGap), on the CPU in fp32, LoRA's gradients, S+ / S-, E*,
the classifier's weights and every prediction agree to ~1e-5; the tests pin the synthetic numbers.
"""
__version__ = "2026.12"

import argparse
import fcntl
import collections
import dataclasses
import difflib
import importlib.metadata
import json
import logging
import math
import os
import pickle
import pkgutil
import platform
import signal
import subprocess
import sys
import textwrap
import time
import typing
import urllib.request
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
try:
    import torchvision
    import torchvision.transforms.v2.functional as TF
    from torchvision.datasets.folder import make_dataset
except RuntimeError as e:  # "operator torchvision::nms does not exist": built for another torch
    minor, patch = torch.__version__.split("+")[0].split(".")[1:3]
    index = " --index-url https://download.pytorch.org/whl/cpu" if torch.version.cuda is None else ""
    sys.exit(f"mgclip: error: torchvision {importlib.metadata.version('torchvision')} does not fit torch "
             f"{torch.__version__} ({e}); install the pair from one index: pip install "
             f"torch=={torch.__version__} torchvision==0.{int(minor) + 15}.{patch}{index}")
from tqdm.auto import tqdm


# ======================================================================================================== BEGIN METHOD
# Copied alone (README, Copying the method block), it needs these imports above it; what it is given is checked once,
# at its boundary, by the guards at its end:
# import math
# import typing
# from contextlib import contextmanager, nullcontext
# from dataclasses import asdict, dataclass
# import torch
# import torch.nn as nn
# import torch.nn.functional as F
# from torch.nn.utils import parametrize
@dataclass
class Hyper:
    """All of MG-CLIP's hyperparameters (the authors' CIFAR-100 values); refused when they train or mean nothing."""
    lora_rank: int = 8  # LoRA on W_k, W_v of both towers: W + (lora_alpha / lora_rank) B A
    lora_alpha: float = 1.0
    lr: float = 1e-3  # Adam on LoRA
    epochs: int | None = None  # E*; None: found by gap preservation on task 1
    max_epochs: int = 10  # the search's longest probe; without preservation, every task's epochs
    alpha: float = 0.1  # tolerance on |S-(e) - S-(0)| / |S-(0)|; S- = mean s cos(image, other classes' prompts)
    vis_lr: float = 5e-4  # the visual classifier's Adam
    vis_batch_size: int = 64
    vis_epochs: int = 3
    text_weight: float = 1.0  # fusion
    visual_weight: float = 4.0
    preservation: bool = True  # the ablations: without gap preservation, without gap compensation
    compensation: bool = True
    seed: int = 42  # the visual classifier of task t (from 1) shuffles with seed + t

    def __post_init__(self):
        check_hyper(self)


@dataclass
class Task:
    """A task: its classes, its training images (train: epochs; train_eval: no gradient), seen classes' test images."""
    classes: range
    train: typing.Iterable
    train_eval: typing.Iterable
    test: typing.Iterable


def learn_tasks(model, lora, tokens, tasks: list[Task], hp: Hyper, amp=None, state=None, report=print):
    """MG-CLIP task after task on a model fresh from add_lora(model, hp); yields each task's state. Given a state, it
    goes on with the tasks it has not learned: the new ones alone, or all (those it learned are skipped)."""
    tasks = check_contract(model, lora, tokens, tasks, hp, amp, state)  # the tasks still to learn
    if state is None:  # E*: hp.epochs if set; max_epochs without preservation; else None, searched on task 1
        epochs = hp.max_epochs if hp.epochs is None and not hp.preservation else hp.epochs
        state = dict(rows=[], epochs=epochs, classifier=None, lora=[p.detach().to("cpu", copy=True) for p in lora])
    classifier = load_state(model, lora, tokens, state)[1]  # LoRA and the visual classifier W of the state
    torch.set_rng_state(state.get("rng", torch.get_rng_state()))  # a shuffled DataLoader goes on as if never stopped
    ranges = [range(*row["classes"]) for row in state["rows"]]  # the classes of each task learned so far
    total = len(ranges) + len(tasks)
    device = model.logit_scale.device.type  # each task outside a caller's autocast (torch 2.1-2.4 refuse one on mps)
    for task in tasks:
        ranges.append(task.classes)
        report(f"task {len(ranges)}/{total}: classes {task.classes.start}-{task.classes.stop - 1}")
        try:
            with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else nullcontext():
                row, classifier, epochs = learn_task(model, lora, tokens, task, ranges, state["epochs"], classifier,
                                                     hp, amp, report)
        except BaseException:  # Ctrl-C and a check after a pass too: a task that fails leaves the last state's LoRA
            set_lora(lora, state["lora"])
            raise
        state = dict(rows=state["rows"] + [row], epochs=epochs, lora=[p.detach().to("cpu", copy=True) for p in lora],
                     classifier=None if classifier is None else classifier.to("cpu", copy=True),
                     rng=torch.get_rng_state(), hyper=asdict(hp), taken_on=taken_on(model, tokens, task.classes.stop))
        yield state


def learn_task(model, lora, tokens, task: Task, ranges: list[range], epochs, classifier, hp: Hyper, amp=None,
               report=print):
    """Task t = len(ranges): measure the gap, fine-tune LoRA E* epochs (None: search E*), grow the visual classifier W
    by this task's rows, evaluate the fusion; returns the task's metrics, W and E*."""
    t, classes, seen_tokens = len(ranges), task.classes, tokens[: task.classes.stop]
    with pretrained_clip(model):  # as the authors, "before" is the pre-trained CLIP: S-(0) of the search
        before = measure_gap(model, task.train_eval, seen_tokens, amp)
    row = dict(task=t, classes=[classes.start, classes.stop])
    trained = False
    if epochs is None:
        epochs, trained, row["search"] = search_epochs(model, lora, task.train, task.train_eval, tokens, classes,
                                                       hp.lr, hp.max_epochs, before["s_minus"], hp.alpha, amp, report)
        report(f"  gap preservation: E* = {epochs} epochs per task")
    if len(classes) == 1:
        report("  one class: its cross-entropy is 0 whatever LoRA does, so LoRA trains nothing on this task")
    if not trained:
        for epoch, loss, epoch_lr in finetune(model, lora, task.train, tokens, classes, hp.lr, epochs, amp):
            report(f"  epoch {epoch}/{epochs}  loss {loss:.4f}  lr {epoch_lr:.2e}")
    feats, labels = image_features(model, task.train_eval, classes, amp)  # one pass: S+ / S- and the classifier
    text_seen = text_features(model, seen_tokens, amp)
    after = modality_gap(feats, text_seen, labels, model.logit_scale.exp().item())
    if hp.compensation:
        classifier = train_visual_classifier(classifier, feats, labels, classes, hp.vis_lr, hp.vis_batch_size,
                                             hp.vis_epochs, hp.seed + t)
    correct, count = evaluate(model, task.test, text_seen, classifier, (hp.text_weight, hp.visual_weight), amp)
    fused = correct[0] if hp.compensation else correct[1]  # rows: 0 fused, 1 text, 2 visual; without W: text
    seen = range(0, classes.stop)
    row.update(epochs=epochs, acc=accuracy(fused, count, seen), acc_text=accuracy(correct[1], count, seen),
               acc_visual=accuracy(correct[2], count, seen) if hp.compensation else None,
               acc_per_task=[accuracy(fused, count, r) for r in ranges], gap_before=before, gap_after=after)
    visual = "n/a" if row["acc_visual"] is None else f"{row['acc_visual']:.2f}"
    report(f"  acc {row['acc']:.2f}  (text {row['acc_text']:.2f}, visual {visual})  S+ {before['s_plus']:.2f}->"
           f"{after['s_plus']:.2f}  S- {before['s_minus']:.2f}->{after['s_minus']:.2f} (pre-trained CLIP->trained)")
    return row, classifier, epochs


# ------------------------------------------------------------------------------ the steps, in the algorithm box's order
def measure_gap(model, batches, seen_tokens, amp=None) -> dict:
    """The modality gap between the batches' images and the prompts of the classes seen so far."""
    feats, labels = image_features(model, batches, range(len(seen_tokens)), amp)
    return modality_gap(feats, text_features(model, seen_tokens, amp), labels, model.logit_scale.exp().item())


# S- and not S+: S+ rises with any successful fine-tuning; S- tracks how far the pre-trained geometry (the zero-shot
# knowledge) has moved. Only task 1 is searched, as the authors do: E* is a budget of the dataset and the lr; a search
# per task would cost a probe and a retrain each task, and S- would drift through the earlier tasks' training too.
def search_epochs(model, lora, train_batches, train_eval, tokens, classes: range, lr: float, max_epochs: int,
                  s_minus_0: float, alpha: float, amp=None, report=print):
    """Gap preservation: probe, i.e. fine-tune over max_epochs up to the first epoch e with |S-(e) - S-(0)| / |S-(0)|
    > alpha; returns E* = max(e - 1, 1), whether LoRA holds task 1's training (E* = 1, or no drift: else back at B = 0,
    for a retrain over E*), and the trace."""
    start, trace = [p.detach().clone() for p in lora], []
    for epoch, loss, lr_now in finetune(model, lora, train_batches, tokens, classes, lr, max_epochs, amp):
        if epoch == 1:
            after_one = [p.detach().clone() for p in lora]
        gap = measure_gap(model, train_eval, tokens[: classes.stop], amp)
        drift = abs(gap["s_minus"] - s_minus_0) / abs(s_minus_0)
        trace.append(dict(epoch=epoch, loss=loss, lr=lr_now, s_plus=gap["s_plus"], s_minus=gap["s_minus"], drift=drift))
        report(f"  gap search: epoch {epoch}  loss {loss:.4f}  lr {lr_now:.2e}  S- {gap['s_minus']:.3f}  "
               f"relative drift {drift:.3f} (alpha {alpha})")
        if drift > alpha:  # epoch e went past the drift allowed: E* = e - 1 epochs, at least one
            e_star = max(epoch - 1, 1)
            # epoch 1 runs at lr under any cosine, from the same start and shuffle: the probe's first epoch is E* = 1's
            # training bit for bit. E* > 1 needs a cosine over E* epochs, so LoRA starts again from B = 0.
            set_lora(lora, after_one if e_star == 1 else start)
            return e_star, e_star == 1, trace
    report(f"  gap search: S- stayed within alpha = {alpha} for all {max_epochs} epochs, so E* = {max_epochs}")
    return max_epochs, True, trace  # the probe is the real training


def finetune(model, lora, batches, tokens, classes: range, lr: float, epochs: int, amp=None):
    """LoRA fine-tuning: Adam, cosine over `epochs` to 0.01 lr. A generator: it trains one epoch each time the caller
    asks for the next (epoch, mean loss, its lr), and the schedule steps when the caller asks again."""
    device = model.logit_scale.device
    scale = model.logit_scale.exp().detach()
    task_tokens = tokens[classes.start: classes.stop].to(device)
    opt = torch.optim.Adam(lora, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.01 * lr)
    for epoch in range(1, epochs + 1):
        if hasattr(batches, "set_epoch"):  # as DistributedSampler: epoch e shuffles alike in a probe and a retrain
            batches.set_epoch(epoch)
        model.train()  # as the authors fine-tune; BatchNorm (MobileCLIP's towers) stays frozen, statistics included
        for norm in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            norm.eval()
        loss_sum, step = torch.zeros((), device=device), 0
        for step, (x, y) in enumerate(checked(batches, device, classes), 1):
            with forward_context(device, amp):
                v = model.encode_image(x)
                t = model.encode_text(task_tokens)
            # over the task's own classes only: earlier prompts are not pushed away; SigLIP's logit bias changes nothing
            logits = scale * F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
            loss = F.cross_entropy(logits, y - classes.start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()  # summed on the device: no host sync per step
        yield epoch, finite(loss_sum.item() / step, f"loss in epoch {epoch}"), schedule.get_last_lr()[0]
        schedule.step()


@torch.no_grad()
def image_features(model: nn.Module, batches, classes: range, amp: torch.dtype | None = None):
    """L2-normalised image features v_i and their labels (within `classes`), from one pass over the batches."""
    model.eval()
    device, feats, labels = model.logit_scale.device, [], []
    for x, y in checked(batches, device, classes):
        with forward_context(device, amp):
            feats.append(model.encode_image(x))
        labels.append(y)
    return F.normalize(torch.cat(feats).float(), dim=-1), torch.cat(labels)


@torch.no_grad()
def text_features(model: nn.Module, tokens: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """L2-normalised text features t_c of the tokenised prompts (in chunks, for 1000-class datasets)."""
    model.eval()
    device = model.logit_scale.device
    with forward_context(device, amp):
        out = [model.encode_text(t.to(device)) for t in tokens.split(500)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def modality_gap(image_feats, text_feats, labels, scale: float) -> dict:
    """The modality gap: S+ / S- = mean s cos(v, t) of matching / non-matching pairs (s = 100 for CLIP: pass
    model.logit_scale.exp().item(), not logit_scale, which holds log s) and the centroid gap ||mean v - mean t||."""
    v = F.normalize(image_feats.float(), dim=-1)
    t = F.normalize(text_feats.float(), dim=-1)
    pos = scale * (v * t[labels]).sum(-1)
    every = scale * v @ t.sum(0)  # sum over all classes without the (N, C) matrix
    s_minus = ((every - pos) / (len(t) - 1)).mean() if len(t) > 1 else torch.tensor(float("nan"))
    return dict(s_plus=pos.mean().item(), s_minus=s_minus.item(), centroid_gap=(v.mean(0) - t.mean(0)).norm().item())


def train_visual_classifier(classifier, feats, labels, classes: range, lr: float, batch_size: int, epochs: int,
                            seed: int) -> torch.Tensor:
    """Gap compensation: grow W (None at first) by rows w_c for `classes`, started at their class means of v (prototypes
    on the image side of the gap), trained on the cross-entropy of cos(v, w_c) over the task's classes (Adam, cosine per
    step to 0.01 lr, no temperature, as the authors). Old rows stay: no old image is left. Returns unnormalised rows."""
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


@torch.no_grad()
def evaluate(model, batches, text_feats, classifier, fusion=(1.0, 4.0), amp=None):
    """Per-class correct counts (3, C: fused, text, visual) and image counts (C,) of the C = len(text_feats) classes."""
    device, seen = model.logit_scale.device, len(text_feats)
    correct, count = torch.zeros(3, seen, device=device), torch.zeros(seen, device=device)
    for x, y in checked(batches, device, range(seen)):
        text_logits, vis_logits = branch_logits(model, x, text_feats, classifier, amp)
        fused = fuse_scores(text_logits, vis_logits, fusion)
        preds = torch.stack([fused.argmax(-1), text_logits.argmax(-1), vis_logits.argmax(-1)])  # one image pass
        correct.index_add_(1, y, (preds == y).float())
        count.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    return correct.cpu(), count.cpu()


def branch_logits(model, x, text_feats, classifier, amp=None):
    """One batch's s cos(v, t_c) (text branch) and cos(v, w_c) (rows normalised here; classifier None: w = t)."""
    model.eval()
    with forward_context(x.device, amp):
        v = F.normalize(model.encode_image(x).float(), dim=-1)
    w = F.normalize(text_feats if classifier is None else classifier, dim=-1)
    return model.logit_scale.exp().float() * v @ text_feats.T, v @ w.T


def fuse_scores(text_logits, visual_logits, fusion=(1.0, 4.0)):
    """The authors' fusion: (w_t * softmax(softmax(s cos(v, t))) + w_v * softmax(cos(v, w))) / (w_t + w_v)."""
    # the authors' double softmax, kept for the paper's numbers: softmaxed probabilities and temperature-free cosines
    # are both near-uniform, so either branch can decide
    p_text = text_logits.float().softmax(-1).softmax(-1)
    return (fusion[0] * p_text + fusion[1] * visual_logits.float().softmax(-1)) / (fusion[0] + fusion[1])


def accuracy(correct, count, classes: range) -> float | None:
    """Top-1 accuracy (%) over the test images of `classes`, from one row of evaluate's counts; None without any."""
    if correct.dim() != 1:
        raise ValueError("pass one row of evaluate's counts: [0] fused, [1] text branch, [2] visual classifier")
    images = count[classes.start: classes.stop].sum().item()
    return 100.0 * correct[classes.start: classes.stop].sum().item() / images if images else None  # 0 = forgotten


# ---------------------------------------------------------------------------- a state: loading it, classifying with it
def load_state(model, lora, tokens, state) -> tuple[int, torch.Tensor | None]:
    """Load a state of learn_tasks (or checkpoint.pt) taken on this model and prompts; returns seen classes and W."""
    seen = state["rows"][-1]["classes"][1] if state["rows"] else 0
    saved, now = state.get("taken_on", {}), taken_on(model, tokens, seen)  # {}: before task 1, or before 2026-12
    differ = [f"{k} {saved[k]} (here: {now[k]})" for k in ("rank", "lora_alpha", "frozen_weights")  # a checksum
              if k in saved and not math.isclose(saved[k], now[k], rel_tol=1e-9)]
    prompts = zip(saved.get("prompt_hashes", []), now["prompt_hashes"])
    differ += [f"the prompt of class {c}" for c, (a, b) in enumerate(prompts) if a != b][:1]
    if differ:
        raise ValueError(f"the state was taken on another model or other prompts: {', '.join(differ)}; load it into "
                         f"the model it was trained on (the same weights, add_lora rank and alpha, and prompts)")
    if state["classifier"] is not None and len(state["classifier"]) != seen:
        raise ValueError(f"the state's classifier has {len(state['classifier'])} rows for {seen} classes: not its own")
    set_lora(lora, state["lora"])
    return seen, None if state["classifier"] is None else state["classifier"].to(model.logit_scale.device)


def taken_on(model, tokens, seen: int) -> dict:
    """What a state holds LoRA for: its rank and alpha, a checksum of the frozen weights, the seen classes' prompts."""
    m = next(m for m in model.modules() if isinstance(m, LoRAKeyValue))
    weights = sum(p.detach().double().abs().sum() for p in model.parameters() if not p.requires_grad).item()
    return dict(rank=m.A.shape[1], lora_alpha=m.scale * m.A.shape[1], frozen_weights=weights,
                prompt_hashes=[hash(tuple(prompt)) for prompt in tokens[:seen].tolist()])


def predictor(model, lora, tokens, state, amp=None) -> typing.Callable:
    """The state's classifier: a function of a batch x -> the fused probabilities (B, C) over its seen classes (argmax:
    the prediction) and each branch's. Each batch runs with the state's LoRA, and the model's comes back after."""
    weights = [p.detach().clone() for p in lora]
    with lora_as(lora, weights):  # load_state writes the state's LoRA: the model's comes back after
        seen, classifier = load_state(model, lora, tokens, state)
        weights = [p.detach().clone() for p in lora]
        text_feats = text_features(model, tokens[:seen], amp)
    hp = Hyper(**state.get("hyper", {}))  # states before 2026-12 have none: the default fusion

    @torch.no_grad()
    def probabilities(x):
        with lora_as(lora, weights):  # t_c, W and LoRA always of one state; a training loop around goes on unharmed
            text_logits, vis_logits = branch_logits(model, x, text_feats, classifier, amp)
        # each branch's own probabilities: one softmax (the fusion's second on the text branch only flattens it)
        if classifier is None:  # without compensation, the text branch alone predicts
            return text_logits.softmax(-1), text_logits.softmax(-1), None
        fused = fuse_scores(text_logits, vis_logits, (hp.text_weight, hp.visual_weight))
        return fused, text_logits.softmax(-1), vis_logits.softmax(-1)
    return probabilities


# ----------------------------------------------------------------------------------------------------- LoRA's plumbing
class LoRAKeyValue(nn.Module):
    """W + (lora_alpha / r) B_i A_i on the last n row blocks: W_k, W_v of a packed [W_q; W_k; W_v] (n = 2), or one."""

    def __init__(self, weight: torch.Tensor, n: int, rank: int, lora_alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, rank, weight.shape[1]))
        self.B = nn.Parameter(torch.zeros(n, len(weight) // (3 if n == 2 else 1), rank))  # zero: the model as it was
        for a in self.A:  # the authors' attention LoRA draws A with xavier_uniform_ (their Linear LoRA: kaiming)
            nn.init.xavier_uniform_(a)
        self.scale = lora_alpha / rank

    def forward(self, weight):
        delta = (self.B @ self.A).flatten(0, 1) * self.scale
        return torch.cat([weight[:-len(delta)], weight[-len(delta):] + delta.to(weight.dtype)])


def key_value_weights(module: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, weight name, n) of W_k and W_v of each self-attention block under `module`, in open_clip's 3 layouts."""
    if "Pool" in type(module).__name__:  # pooling heads (SigLIP's MAP head, RN50's AttentionPool2d) are not blocks
        return []
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return [(module, "in_proj_weight", 2)]  # packed [W_q; W_k; W_v]: OpenAI-style ViTs, every text tower
    if isinstance(getattr(module, "qkv", None), nn.Linear):
        return [(module.qkv, "weight", 2)]  # timm's packed qkv Linear: SigLIP, ViTamin, FastViT (MobileCLIP)
    if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("k_proj", "v_proj")):
        return [(module.k_proj, "weight", 1), (module.v_proj, "weight", 1)]  # timm's EVA02: separate projections
    return [found for child in module.children() for found in key_value_weights(child)]


def add_lora(model: nn.Module, hp: Hyper | None = None) -> list[nn.Parameter]:
    """Freeze an open_clip CLIP, add LoRA of hp's rank and alpha to W_k, W_v of every attention block; its weights."""
    check_model(model)
    hp = Hyper() if hp is None else hp
    if any(isinstance(m, LoRAKeyValue) for m in model.modules()):
        raise ValueError("this model already has LoRA: call add_lora once per model")
    towers = dict(image=model.visual, text=model.text if hasattr(model, "text") else model.transformer)
    found = {tower: key_value_weights(module) for tower, module in towers.items()}
    for tower, module in towers.items():
        if not found[tower]:
            raise ValueError(f"the {tower} tower ({type(module).__name__}) has no self-attention block for LoRA; use "
                             f"a ViT, SigLIP, EVA02, ViTamin or MobileCLIP model (not a ResNet or ConvNeXt)")
    model.requires_grad_(False)
    for owner, name, n in found["image"] + found["text"]:
        w = getattr(owner, name)
        parametrize.register_parametrization(owner, name, LoRAKeyValue(w, n, hp.lora_rank, hp.lora_alpha).to(w.device))
    return [p for p in model.parameters() if p.requires_grad]


def set_lora(lora: list[nn.Parameter], values: list[torch.Tensor]):
    """Load LoRA weights in place (the initial ones, B = 0, give back the pre-trained CLIP)."""
    if len(values) != len(lora) or any(p.shape != w.shape for p, w in zip(lora, values)):
        raise ValueError("set_lora takes one value per LoRA weight, of its shape (from the same add_lora rank)")
    with torch.no_grad():
        for p, w in zip(lora, values):
            p.copy_(w)


@contextmanager
def pretrained_clip(model: nn.Module):
    """Within this block the model is the pre-trained CLIP (every B = 0, whatever LoRA learned); B comes back after."""
    bs = [m.B for m in model.modules() if isinstance(m, LoRAKeyValue)]
    with lora_as(bs, [torch.zeros_like(b) for b in bs]):
        yield model


@contextmanager
def lora_as(lora: list[nn.Parameter], values: list[torch.Tensor]):
    """Within this block LoRA holds `values`; what it held comes back after (training goes on from it)."""
    held = [p.detach().clone() for p in lora]
    set_lora(lora, values)
    try:
        yield
    finally:
        set_lora(lora, held)


@contextmanager
def forward_context(device: torch.device, amp: torch.dtype | None):
    """Where the towers run: LoRA merged into W once per forward, autocast to `amp` unless it is None (fp32)."""
    autocast = nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)  # fp32: none at all
    with autocast, parametrize.cached():
        yield
    torch.clear_autocast_cache()  # within a caller's autocast the cache outlives this forward: LoRA changes each step


# ========================================================= The guards: what the block is given, checked at its boundary
def check_hyper(hp: Hyper):
    """Refuse hyperparameters that would train or mean nothing, as the command line does."""
    at_least = dict(lora_rank=1, epochs=0, max_epochs=1, vis_batch_size=1, vis_epochs=0, text_weight=0, visual_weight=0)
    for name in ("lora_alpha", "lr", "alpha", "vis_lr", *at_least):
        value, low = getattr(hp, name), at_least.get(name)
        kind = (int, float) if low is None or name.endswith("weight") else int  # a rank, epochs, a batch: whole
        if value is None and name == "epochs":  # E* searched
            continue
        if not (isinstance(value, kind) and math.isfinite(value) and (value > 0 if low is None else value >= low)):
            number = "a whole number" if kind is int else "a number"
            relation = "greater than 0" if low is None else f"at least {low}"
            raise ValueError(f"Hyper {name} = {value!r} would train or mean nothing: make it {number} {relation}")
    if hp.text_weight + hp.visual_weight <= 0:
        raise ValueError("Hyper text_weight and visual_weight are both 0: the fusion weighs nothing")


def check_contract(model, lora, tokens, tasks: list[Task], hp: Hyper, amp=None, state=None) -> list[Task]:
    """Refuse, before any work, what would train nothing or give a silently wrong number; the tasks still to learn."""
    check_model(model, lora)
    m = next(m for m in model.modules() if isinstance(m, LoRAKeyValue))
    if (m.A.shape[1], m.scale * m.A.shape[1]) != (hp.lora_rank, hp.lora_alpha):
        raise ValueError("the model's LoRA has another rank or alpha than hp's: add_lora(model, hp) with this hp")
    if torch.get_default_dtype() != torch.float32 or amp not in (None, torch.bfloat16):
        raise ValueError("train in float32 (torch's default dtype), amp None or torch.bfloat16 (fp16 needs a scaler)")
    if not tasks or not all(isinstance(t.classes, range) and t.classes.step == 1 and t.classes for t in tasks):
        raise TypeError("a Task's classes are a range of class positions, range(start, stop), not a list")
    learned = [range(*row["classes"]) for row in state["rows"]] if state else []
    todo = [task for task in tasks if task.classes not in learned]  # given again or not, a learned task is skipped
    seen = learned[-1].stop if learned else 0
    if todo and [t.classes.start for t in todo] != [seen] + [t.classes.stop for t in todo[:-1]]:
        raise ValueError(f"the tasks to learn cut the classes in consecutive ranges from {seen}, where the state stops")
    stop = todo[-1].classes.stop if todo else seen
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or len(tokens) < stop:
        raise TypeError(f"tokens are tokenize(prompts), a prompt for every class up to {stop - 1}, not {len(tokens)}")
    if tokens.shape[-1] != getattr(model, "context_length", tokens.shape[-1]):
        raise ValueError(f"tokens of {tokens.shape[-1]}, not {model.context_length}: open_clip.get_tokenizer(name)")
    if any(isinstance(b, typing.Iterator) for task in todo for b in (task.train, task.train_eval, task.test)):
        raise TypeError("batches are re-iterables (a list, a DataLoader); a generator is empty after one pass")
    if hp.epochs is None and hp.preservation and not learned and len(todo[0].classes) < 2:
        raise ValueError("the epoch search needs 2 classes in task 1: S- averages over the other classes")
    if state is None and any(m.B.any() for m in model.modules() if isinstance(m, LoRAKeyValue)):
        raise ValueError("LoRA has trained already: start from a model fresh from add_lora, or pass the yielded state")
    saved = state.get("hyper", {}) if state else {}  # states before 2026-12 have none
    changed = [f"{k} {v} (the state: {saved[k]})" for k, v in asdict(hp).items() if saved.get(k, v) != v]
    if changed:
        raise ValueError(f"the state learned with other hyperparameters: {changed[0]}; use Hyper(**state['hyper'])")
    return todo


def check_model(model: nn.Module, lora: list | None = None):
    """The model is an open_clip CLIP itself (not wrapped) in float32; lora, if given, is its add_lora weights."""
    if not all(hasattr(model, name) for name in ("encode_image", "encode_text", "logit_scale")):
        raise TypeError(f"the model is an open_clip CLIP, not a {type(model).__name__} (unwrap it: model.module)")
    if model.logit_scale.dtype != torch.float32:
        raise TypeError(f"the model is in {model.logit_scale.dtype}: model.float(), and amp=torch.bfloat16 for speed")
    modules = [m for m in model.modules() if isinstance(m, LoRAKeyValue)]
    if lora is not None and {id(p) for p in lora} != {id(p) for m in modules for p in (m.A, m.B)}:
        raise ValueError("lora is what add_lora(model) returned: the LoRA weights of this model, and only those")


def checked(batches, device: torch.device, classes: range):
    """The batches as they pass: (normalised float32 images, int64 labels in `classes`) on `device`. The first batch is
    checked before any step on it; every batch on the device, reported after the pass (no host sync per batch)."""
    wrong, loud, n = 0, 0, 0
    for n, (x, y) in enumerate(batches, 1):
        tensors = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) > 0
        if not (tensors and x.dtype == torch.float32 and y.dtype == torch.long and x.device == device == y.device):
            raise TypeError(f"a batch is a pair (float32 images, int64 labels of shape (B,)), B > 0, both on {device}; "
                            f"got {getattr(x, 'dtype', type(x))} images, labels {getattr(y, 'shape', type(y))}")
        wrong = wrong + ((y < classes.start) | (y >= classes.stop)).sum()
        # normalised pixels lie within about +-3, some below 0; 0..255 or ToTensor's 0..1 would predict at chance
        loud = loud + ((x.abs().amax() > 20) | ((x.amin() >= 0) & (x.amax() <= 1)))
        if n == 1 and bool(loud + wrong):  # one host sync, before any step on the first batch
            break
        yield x, y.clamp(classes.start, classes.stop - 1)
    if n == 0:
        raise ValueError("the batches are empty: give at least one (a generator is empty after one pass: use a list)")
    if int(loud):
        raise ValueError(f"{int(loud)} batches of images were never normalised: (x / 255 - mean) / std")
    if int(wrong):
        raise ValueError(f"{int(wrong)} labels fall outside classes {classes.start}..{classes.stop - 1}: labels must "
                         f"be class-order positions within the task's classes (task 2 of 10-class tasks: 10..19)")


def finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {what} ({value})")
    return value
# ========================================================================================================== END METHOD


# ================================================================================== Data: tasks, splits and benchmarks
class UserError(ValueError):
    """A mistake in the command line or the data: reported as one line, never a traceback."""


def read_text(path, fix: str) -> str:
    """A text file's contents, or a UserError that names it, says what is wrong and what to do (`fix`)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
        raise UserError(f"cannot read {path} ({reason}); {fix}") from None


def split_tasks(num_classes: int, tasks: int, initial_increment: int = 0) -> list[range]:
    """Cut class positions 0..C-1 into T tasks: B classes first (B = 0: all evenly), the rest evenly."""
    if num_classes < 2:
        raise UserError(f"the benchmark has {num_classes} class; a class-incremental run needs at least 2")
    if initial_increment > num_classes:
        raise UserError(f"--initial-increment {initial_increment} is more than the {num_classes} classes")
    first = 1 if initial_increment else 0  # the first task of B classes, then tasks of (C - B) / k classes
    rest = num_classes - initial_increment
    sizes = [initial_increment] * first + [rest // max(tasks - first, 1)] * (tasks - first)
    if tasks < 1 or sum(sizes) != num_classes or min(sizes) < 2:
        works = " or ".join(str(first + k) for k in range(1, rest // 2 + 1) if rest % k == 0)
        after = f" after --initial-increment {initial_increment}" if initial_increment else ""
        fits = [b for b in range(2, num_classes) if tasks > 1 and (num_classes - b) % (tasks - 1) == 0
                and num_classes - b >= 2 * (tasks - 1)]  # B classes first, then tasks of 2 or more
        fits.sort(key=lambda b: abs(b - (initial_increment or num_classes / max(tasks, 1))))
        other = f", or --tasks {tasks} --initial-increment {fits[0]}" if fits else ""
        raise UserError(f"{num_classes} classes do not split evenly into --tasks {tasks} of at least 2 "
                        f"classes each{after}; use --tasks {works or 1}{other}")
    bounds = [sum(sizes[:i]) for i in range(tasks + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(tasks)]


def class_order(cfg, num_classes: int, default=None) -> list[int]:
    """The class at each position: --class-order FILE, else the dataset's published order, else seeded."""
    if cfg.class_order:
        rule = f"list each class index 0..{num_classes - 1} once, split by spaces, commas or new lines"
        tokens = read_text(cfg.class_order, rule).replace(",", " ").strip("[] \n").split()
        problems = [f"'{t}' is not a class index" for t in tokens if not t.lstrip("-").isdigit()]
        order = [] if problems else [int(t) for t in tokens]
        problems += [f"{c} is out of range" for c in order if not 0 <= c < num_classes]
        problems += [f"{c} is listed twice" for k, c in enumerate(order) if c in order[:k]]
        problems += [f"{c} is missing" for c in range(num_classes) if c not in order]
        if problems:
            raise UserError(f"--class-order {cfg.class_order}: {problems[0]}; {rule}")
        return order
    if default is not None:
        return list(default)
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(cfg.seed)).tolist()


def input_transform(preprocess: dict) -> typing.Callable:
    """open_clip's test transform of a preprocess config, PIL image -> uint8 (Clip.input normalises)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    steps = image_transform_v2(PreprocessCfg(**preprocess), is_train=False).transforms[:-2]
    return torchvision.transforms.Compose(steps + [TF.pil_to_tensor])


PIL.Image.MAX_IMAGE_PIXELS = None  # a dataset's large images are photographs, not decompression bombs


def unreadable(paths: list[str]) -> tuple[int, list[str]]:
    """In a loader worker: PIL verifies each image file's header; returns the count and the failures."""
    bad = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                image.verify()
        except Exception as e:
            bad.append(f"{path} ({type(e).__name__})")
    return len(paths), bad


def check_images(files: list[str], workers: int, progress: bool, fix="delete them, or replace them by readable copies"):
    """Read each image file's header in loader workers before task 1: broken files are named now."""
    workers = min(workers, os.cpu_count() or 1) if files else 0  # nothing to check: no worker to start
    loader = torch.utils.data.DataLoader(files, batch_size=512, num_workers=workers, collate_fn=unreadable)
    bad = []
    with tqdm(total=len(files), desc="checking images", leave=False, disable=not progress) as bar:
        for count, found in loader:
            bar.update(count)
            bad += found
    if bad:
        raise UserError(f"{len(bad)} of the {len(files)} images are unreadable ({', '.join(bad[:3])}); {fix}")


def read_image(path: str, transform: typing.Callable | None) -> torch.Tensor:
    """One image file, decoded by PIL as RGB and prepared like open_clip does."""
    try:
        with PIL.Image.open(path) as image:
            if image.mode.startswith("I"):  # 16- / 32-bit integers, scaled: convert would clip them to white
                pixels = numpy.asarray(image, dtype=numpy.float64)
                top = 65535 if pixels.max() <= 65535 else 2**32 - 1
                image = PIL.Image.fromarray((pixels * 255 / top).round().astype(numpy.uint8))
            image = image.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); replace it with a readable copy "
                        f"(deleting it changes the data: a run in progress would start afresh)") from None
    return transform(image) if transform else TF.pil_to_tensor(image)


@dataclass
class Split(torch.utils.data.Dataset):
    """One split: labels as class-order positions, pixels as a uint8 (N, 3, H, W) tensor or image files."""
    labels: torch.Tensor
    pixels: torch.Tensor | None = None
    files: list[str] | None = None
    transform: typing.Callable | None = None  # input_transform, run in the loader workers; None: as stored

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.files is not None:
            x = read_image(self.files[i], self.transform)
        elif self.transform is not None:
            x = self.transform(TF.to_pil_image(self.pixels[i]))
        else:
            x = self.pixels[i]
        return x, self.labels[i]


class Joined(torch.utils.data.ConcatDataset):
    """Splits one after another in one index space: the test images of a run continued on new classes."""

    def __init__(self, parts: list[Split]):
        super().__init__(parts)
        self.labels = torch.cat([part.labels for part in parts])


@dataclass
class Benchmark:
    """A class-incremental benchmark: train and test splits and the class names in class order."""
    train: Split
    test: Split | Joined
    classnames: list[str]  # in class-order positions: task 1 holds classnames[:n1], ...
    order: list[int]  # the dataset's class index at each position
    learned_from: list[dict] = field(default_factory=list)  # a continued run: each earlier run's data (learned_from)

    def record(self) -> dict:
        """What identifies the data of a run: its class names in order and its (new) images' counts."""
        test = self.test.datasets[-1] if self.learned_from else self.test
        return dict(classnames=self.classnames, train_images=len(self.train), test_images=len(test))


def continued(new: Benchmark, earlier: list[dict]) -> Benchmark:
    """A run that goes on from others: the test images of their classes while their data is there (else none: their
    tasks' accuracies are null), then the new data's, with the labels after the classes learned before."""
    names, tests = [], []
    for part in earlier:
        own = part["data"]["classnames"]
        try:
            old = load_benchmark(Settings(**{**part["settings"], "download": False}))  # only while it is there
            gone = old.record() != part["data"]
        except UserError:
            gone = True
        if gone:
            log.info(f"the test images of classes {len(names)}-{len(names) + len(own) - 1} ({own[0]}, ...) are no "
                     f"longer at --data-root {part['settings']['data_root']} as learned (put them back there to test "
                     f"them): their tasks' accuracies are null")
        test = Split(torch.zeros(0, dtype=torch.long), files=[]) if gone else old.test
        tests.append(dataclasses.replace(test, labels=test.labels + len(names)))
        names += own
    train = dataclasses.replace(new.train, labels=new.train.labels + len(names))
    test = dataclasses.replace(new.test, labels=new.test.labels + len(names))
    return Benchmark(train, Joined(tests + [test]), names + new.classnames, new.order, earlier)


def download_forbidden(cfg) -> str | None:
    """What the user said to forbid downloads (--no-download, HF_HUB_OFFLINE=1), or None."""
    if not cfg.download:
        return "--no-download"
    return "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else None


def download(cfg, name: str, missing: Path, flag: str, fetch):
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
        raise UserError(f"{path} is corrupt ({type(e).__name__}); delete it and download again") from None


def load_cifar100(cfg) -> Benchmark:
    """CIFAR-100 in torchvision's on-disk format under --data-root, downloaded only if missing."""
    files = [Path(cfg.data_root) / "cifar-100-python" / name for name in ("train", "test", "meta")]
    missing = [f for f in files if not f.is_file()]
    if missing and (Path(cfg.data_root) / "meta").is_file():  # else torchvision downloads a copy in it
        raise UserError(f"--data-root {cfg.data_root} is cifar-100-python/ itself; point it at the folder above it")
    if missing:
        download(cfg, "CIFAR-100", missing[0], "--data-root",
                 lambda: torchvision.datasets.CIFAR100(cfg.data_root, download=True))
    order = class_order(cfg, 100, CIFAR100_ORDER)
    where, splits = torch.argsort(torch.as_tensor(order)), []  # the position of each class id in the order
    for f in files[:2]:
        pixels, labels = unpickle(f, "data", "fine_labels")
        labels = torch.as_tensor(labels)
        shape_ok = getattr(pixels, "shape", ())[1:] == (3072,) and len(labels) == len(pixels) > 0
        if not shape_ok or labels.min() < 0 or labels.max() > 99:
            raise UserError(f"{f} has no CIFAR-100 images (3072 bytes, label 0..99); delete it, re-download")
        splits.append(Split(where[labels], torch.from_numpy(pixels).reshape(-1, 3, 32, 32)))
    names = unpickle(files[2], "fine_label_names")[0]
    if len(names) != 100:
        raise UserError(f"{files[2]} names {len(names)} classes, CIFAR-100 has 100; delete it, re-download")
    return Benchmark(*splits, [names[i] for i in order], order)


def load_food101(cfg) -> Benchmark:
    """Food-101's test split (for zero-shot retention) in torchvision's layout: food-101/images/, meta/."""
    meta = Path(cfg.data_root) / "food-101" / "meta"
    if not (meta / "test.json").is_file():
        download(cfg, "Food-101", meta / "test.json", "--zeroshot-root",
                 lambda: torchvision.datasets.Food101(cfg.data_root, split="test", download=True))
    fix = "point --zeroshot-root at the folder of torchvision's food-101/"
    classes = read_text(meta / "classes.txt", fix).split()
    try:
        listed = json.loads(read_text(meta / "test.json", fix))  # {class: ["class/id", ...]}
    except json.JSONDecodeError:
        raise UserError(f"{meta / 'test.json'} is not JSON; delete food-101/ to download it again") from None
    images = meta.parent / "images"
    files = [(str(images / f"{item}.jpg"), y) for y, c in enumerate(classes) for item in listed.get(c, [])]
    test = Split(torch.tensor([y for _, y in files], dtype=torch.long), files=[f for f, _ in files])
    no_train = Split(torch.zeros(0, dtype=torch.long), files=[])  # zero-shot only: nothing to train on
    return Benchmark(no_train, test, [c.replace("_", " ") for c in classes], list(range(len(classes))))


def synthetic_benchmark(cfg) -> Benchmark:
    """A seeded toy benchmark: each class is a coarse colour layout plus noise, with a made-up name."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, size = cfg.syn_classes, cfg.syn_size
    layouts = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    order = class_order(cfg, n)
    where = torch.argsort(torch.as_tensor(order))  # the position of each class id in the order

    def sample(per_class):
        labels = torch.arange(n).repeat_interleave(per_class)
        x = layouts[labels] + 0.1 * torch.randn(len(labels), 3, size, size, generator=g)
        return Split(where[labels], (x.clamp(0, 1) * 255).round().to(torch.uint8))

    syllables = "ka lo mi zu ter vin sol pra dex nu ri bo fen gla tor".split()
    names = set()
    while len(names) < n:
        names.add("".join(syllables[i] for i in torch.randint(len(syllables), (3,), generator=g)))
    names = sorted(names)
    return Benchmark(sample(cfg.syn_train), sample(cfg.syn_test), [names[i] for i in order], order)


def class_folders(root: Path) -> list[str]:
    """The class folders (sorted names, as torchvision's ImageFolder sorts them) directly under root."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


PIL.Image.init()  # every format plugin: the extensions of every image PIL opens, GIF included
IMAGE_EXTENSIONS = tuple(ext for ext, kind in PIL.Image.registered_extensions().items() if kind in PIL.Image.OPEN)


def is_image(path: str) -> bool:
    """A file PIL opens, by its extension; macOS's ._* files are not images."""
    return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith("._")


def skipped_kinds(paths: list[str]) -> str:
    """'2 .txt, 1 ._*': files counted by extension."""
    kinds = ["._*" if os.path.basename(p).startswith("._") else Path(p).suffix.lower() or "no extension" for p in paths]
    return ", ".join(f"{n} {kind}" for kind, n in collections.Counter(kinds).most_common())


def folder_split(folder: Path, classes: list[str]) -> Split:
    """Images of folder/<class>/ as ImageFolder finds them (any extension PIL opens), labelled by position."""
    skipped = []

    def keep(path: str) -> bool:
        if not is_image(path):
            skipped.append(path)
        return is_image(path)
    try:
        found = make_dataset(str(folder), {name: pos for pos, name in enumerate(classes)}, is_valid_file=keep)
    except FileNotFoundError as e:
        raise UserError(f"{folder}: {e} (read: the files PIL opens)") from None
    if skipped:
        log.info(f"skipped what PIL does not open under {folder}: {skipped_kinds(skipped)}")
    found.sort(key=lambda item: (item[1], item[0]))
    return Split(torch.tensor([pos for _, pos in found]), files=[path for path, _ in found])


def split_raw_imagenet_r(root: Path, classes: list[str], seed: int) -> tuple[Split, Split]:
    """The raw ImageNet-R download (ROOT/<wnid>/, no split): 80% train / 20% test per class, by the seed."""
    whole, test = folder_split(root, classes), []
    for pos in range(len(classes)):
        idx = torch.nonzero(whole.labels == pos).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 1000 + pos))]
        test += idx[int(0.8 * len(idx)):].tolist()
    train = sorted(set(range(len(whole.labels))) - set(test))
    return tuple(Split(whole.labels[part], files=[whole.files[i] for i in part]) for part in (train, sorted(test)))


def wordnet_ids(listing: str) -> list[str]:
    """A sorted list of WordNet ids that timm (open_clip's dependency) ships: ImageNet-1K's, ImageNet-R's."""
    return pkgutil.get_data("timm", f"data/_info/{listing}").decode().split()


def imagenet_r_names(wnids: list[str]) -> list[str]:
    """ImageNet-R's class names as the authors spell them: each id's first WordNet lemma, underscored."""
    lines = pkgutil.get_data("timm", "data/_info/imagenet_synset_to_lemma.txt").decode().splitlines()
    lemmas = dict(line.split("\t", 1) for line in lines)
    return [lemmas[w].split(",")[0].strip().replace(" ", "_") for w in wnids]


def folder_classes(cfg, source: Path, test_dir: Path | None) -> tuple[list[str], list[str], list[int]]:
    """The class folders of `source` (sorted), their names and class order; test_dir must hold the same."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    folders = class_folders(source)
    if not folders:
        raise UserError(f"no class folders in {source}; expected {source}/<class>/ folders of images")
    if test_dir is not None and folders != class_folders(test_dir):
        sides = ((test_dir, folders, class_folders(test_dir)), (source, class_folders(test_dir), folders))
        lacks = [f"{where} lacks {', '.join(sorted(set(have) - set(its))[:3])}" for where, have, its in sides
                 if set(have) - set(its)]
        raise UserError(f"the class folders differ: {'; '.join(lacks)}; make them match")
    imagenet, imagenet_r = wordnet_ids("imagenet_synsets.txt"), wordnet_ids("imagenet_r_synsets.txt")
    if cfg.dataset == "imagenet100" and folders == imagenet:
        folders = folders[:100]  # a full ImageNet-1K: ImageNet-100 is its first 100 classes
    known = {"imagenet100": (IMAGENET_CLASSNAMES[:100], IMAGENET100_ORDER, imagenet[:100]),
             "imagenet-r": (imagenet_r_names(imagenet_r), IMAGENET_R_ORDER, imagenet_r),
             "imagenet": (IMAGENET_CLASSNAMES, range(1000), imagenet),
             "vtab": ([n.strip() for n in VTAB_CLASSES.split(";")], range(50), None)}
    if cfg.dataset in known:
        names, order, wnids = known[cfg.dataset]
        if wnids is not None and folders != wnids:  # another "ImageNet-100" (CMC's) would be misnamed
            extra, missing = [f for f in folders if f not in wnids], [w for w in wnids if w not in folders]
            raise UserError(f"{source} does not hold --dataset {cfg.dataset}'s classes: {len(extra)} class "
                            f"folders are not its WordNet ids ({', '.join(extra[:3])}), {len(missing)} ids have "
                            f"no folder ({', '.join(missing[:3])}); point --data-root at it, or use --dataset folder")
        if len(folders) != len(names):
            raise UserError(f"{source} holds {len(folders)} class folders; --dataset {cfg.dataset} has {len(names)}")
        if cfg.dataset == "vtab":  # folder names vary between downloads: say which name each got
            log.info("VTAB's class folders, named: " + ", ".join(f"{f} = {n}" for f, n in zip(folders, names)))
        return folders, list(names), class_order(cfg, len(names), order)
    names = [n.replace("_", " ") for n in folders]
    listed = source.parent / "classnames.txt"
    if listed.is_file():
        names = [n.strip() for n in read_text(listed, "give one name per line").splitlines() if n.strip()]
        if len(names) != len(folders):
            raise UserError(f"{listed} has {len(names)} names for {len(folders)} class folders; "
                            f"give one name per line in sorted folder order")
    return folders, names, class_order(cfg, len(folders))


def read_split_files(paths: list[str], root: Path, classes: list[str]) -> tuple[Split, Split]:
    """The images of the authors' train and test lists, by class folder: RAPF's (a line 'train', paths, a
    line 'test', paths) or continuum's ('train/<wnid>/x.JPEG 0' lines; other paths are test images)."""
    where, listed = {c: pos for pos, c in enumerate(classes)}, {"train": [], "test": []}
    for path in paths:
        lines = read_text(path, "give the authors' --split-file lists").splitlines()
        section = None  # RAPF's lists name their sections; continuum's paths start with train/ or val/
        for line in filter(None, (line.strip() for line in lines)):
            if line.lower() in ("train", "test"):
                section = line.lower()
                continue
            file = os.path.relpath(os.path.join(root, line.split()[0]), root)  # absolute ones too
            listed[section or ("train" if file.startswith("train/") else "test")].append(root / file)
    both = set(listed["train"]) & set(listed["test"])
    if both:  # a test image trained on would score itself
        raise UserError(f"--split-file lists {len(both)} images as train and test images (e.g. {min(both)}); "
                        f"give the dataset's train and test lists, which share no image")
    splits = []
    for part, files in listed.items():
        for file in files:
            if not file.is_file():
                raise UserError(f"{file}, listed in --split-file, does not exist; check --data-root")
            if file.parent.name not in where:
                raise UserError(f"{file}, listed in --split-file, is in no class folder of --dataset")
        twice = next((f for f, n in collections.Counter(files).items() if n > 1), None)
        present = {f.parent.name for f in files}
        empty = next((c for c in classes if c not in present), None)
        if twice or empty:
            problem = f"lists {twice} twice" if twice else f"lists no {part} image of class {empty}"
            raise UserError(f"--split-file {problem}; give each image once, in the train and test lists")
        files = sorted(files, key=lambda f: (where[f.parent.name], str(f)))
        splits.append(Split(torch.tensor([where[f.parent.name] for f in files]), files=[str(f) for f in files]))
    return splits[0], splits[1]


def load_image_folders(cfg) -> Benchmark:
    """ImageNet-100, -R, -1K, VTAB or any ROOT/train/<class>/ + ROOT/val|test/<class>/ tree."""
    root = Path(cfg.data_root)
    tests = ("test", "val") if cfg.dataset in ("imagenet-r", "vtab") else ("val", "test")  # their test/
    test_dir = next((root / s for s in tests if (root / s).is_dir()), None)
    raw = cfg.dataset == "imagenet-r" and not (root / "train").is_dir()  # the raw download: ROOT/<wnid>/
    if raw and not (root / "n01443537").is_dir():
        raise UserError(f"{root} has neither train/ and test/ nor ImageNet-R's class folders (n01443537/, "
                        f"...); point --data-root at the extracted imagenet-r folder")
    if not raw and not (root / "train").is_dir():
        raise UserError(f"--data-root {root} has no train/; expected train/<class>/ and val/<class>/ in it")
    if not raw and test_dir is None and not cfg.split_file:
        raise UserError(f"no {root / 'val'} or {root / 'test'} folder next to {root / 'train'}")
    compare = None if raw or cfg.split_file else test_dir  # a split list names its own images
    folders, names, order = folder_classes(cfg, root if raw else root / "train", compare)
    classes = [folders[i] for i in order]
    if cfg.split_file:
        train, test = read_split_files(cfg.split_file, root, classes)
    elif raw:
        train, test = split_raw_imagenet_r(root, classes, cfg.seed)
    else:
        train, test = folder_split(root / "train", classes), folder_split(test_dir, classes)
    return Benchmark(train, test, [names[i] for i in order], order)


def load_benchmark(cfg) -> Benchmark:
    """The benchmark named by --dataset (or food101), labelled by class-order position."""
    loaders = dict(cifar100=load_cifar100, synthetic=synthetic_benchmark, food101=load_food101)
    return loaders.get(cfg.dataset, load_image_folders)(cfg)


# ======================================================================================= Settings and the command line
def arg(default, group: str, help: str, **accepts):
    """A Settings field: its default, --help group and text, and what argparse accepts (choices, low, ...)."""
    return field(default=default, metadata=dict(group=group, help=help, **accepts))


METHOD, ABLATIONS, DATA, RUN = "method", "ablations", "data", "run and outputs"  # the groups of --help
# The authors' settings per dataset (imagenet: their imagenet1000 config; vtab, folder: our pick, CIFAR-100's).
CIFAR100 = dict(tasks=10, lr=1e-3, batch_size=128, vis_lr=5e-4, vis_batch_size=64, vis_epochs=3, seed=42,
                model="ViT-B-16")
DATASET_DEFAULTS = {
    "cifar100": CIFAR100,
    "imagenet100": dict(CIFAR100, lr=5e-4, vis_lr=1e-3, vis_batch_size=128, seed=0),
    "imagenet-r": dict(CIFAR100, batch_size=64, vis_batch_size=32, seed=0),
    "imagenet": dict(CIFAR100, lr=5e-4, batch_size=80, vis_epochs=2, seed=0),
    "vtab": dict(CIFAR100, tasks=5),
    "folder": dict(CIFAR100, seed=0),
    "synthetic": dict(CIFAR100, tasks=4, lr=1e-2, batch_size=16, vis_lr=2e-3, vis_batch_size=16, seed=0, model="tiny"),
}


@dataclass
class Settings:
    """Every knob of a run; each field is a command-line flag (--tasks, --vis-lr, ...). None: per-dataset default."""
    model: str | None = arg(None, METHOD, "open_clip model name, or 'tiny' (a random-init toy CLIP)")
    pretrained: str | None = arg(None, METHOD, "weight tag, file or 'none' (default: openai; tiny: none)")
    lora_rank: int = arg(8, METHOD, "LoRA rank r", low=1)
    lora_alpha: float = arg(1.0, METHOD, "scales B @ A by it / r (not gap preservation's --alpha)", above=0)
    prompt: str = arg("a good photo of a {}.", METHOD, "prompt template; {} becomes the class name")
    lr: float | None = arg(None, METHOD, "Adam learning rate of LoRA", above=0)
    batch_size: int | None = arg(None, METHOD, "training batch", low=1)
    epochs: int | None = arg(None, METHOD, "task epochs (default: searched E*); 0: no fine-tuning", low=0)
    alpha: float = arg(0.1, METHOD, "max drift |S-(e) - S-(0)| / |S-(0)| (not LoRA's --lora-alpha)", above=0)
    max_epochs: int = arg(10, METHOD, "gap preservation: most epochs searched on task 1", low=1)
    vis_lr: float | None = arg(None, METHOD, "visual classifier learning rate", above=0)
    vis_batch_size: int | None = arg(None, METHOD, "visual classifier batch", low=1)
    vis_epochs: int | None = arg(None, METHOD, "visual classifier epochs per task", low=0)
    precision: str = arg("tf32", METHOD, "tf32 (the authors' numerics; on a CPU plain fp32), fp32 (strict) "
                         "or bf16 (autocast)", choices=("tf32", "fp32", "bf16"))
    text_weight: float = arg(1.0, METHOD, "fusion weight of the text branch", low=0)
    visual_weight: float = arg(4.0, METHOD, "fusion weight of the visual classifier", low=0)
    preservation: bool = arg(True, ABLATIONS, "no epoch search: each task trains --max-epochs (or --epochs)")
    compensation: bool = arg(True, ABLATIONS, "turn gap compensation off: the text branch alone predicts")
    dataset: str = arg("cifar100", DATA, "the benchmark", choices=tuple(DATASET_DEFAULTS))
    data_root: str = arg("data", DATA, "folder of cifar-100-python/, or of train/ and val/ (or test/)")
    tasks: int | None = arg(None, DATA, "number of tasks T", low=1)
    initial_increment: int = arg(0, DATA, "classes in the first task; 0 splits all classes evenly", low=0)
    class_order: str | None = arg(None, DATA, "file: each class index (from 0) once, in learning order, "
                                  "split by spaces, commas or new lines (default: published, or seeded)")
    split_file: list[str] | None = arg(None, DATA, "train/test lists of --data-root (RAPF's, continuum's)")
    download: bool = arg(True, DATA, "never download weights, CIFAR-100 or Food-101 (as HF_HUB_OFFLINE=1)")
    syn_classes: int = arg(20, DATA, "synthetic: number of classes", low=2)
    syn_train: int = arg(48, DATA, "synthetic: training images per class", low=1)
    syn_test: int = arg(16, DATA, "synthetic: test images per class", low=1)
    syn_size: int = arg(32, DATA, "synthetic: image side in pixels", low=8)
    seed: int | None = arg(None, RUN, "random seed", low=0, high=2**32 - 1)
    device: str = arg("auto", RUN, "auto | cuda | cuda:N | mps | cpu")
    workers: int = arg(4, RUN, "loader workers that decode and resize images; 0: in the main process", low=0)
    eval_batch_size: int = arg(256, RUN, "batch for feature passes and evaluation", low=1)
    out: str | None = arg(None, RUN, "folder, default runs/<dataset>-<model>-T<tasks>-seed<seed>[-variant]")
    resume: str | None = arg(None, RUN, "resume run RUN (its --out folder or checkpoint.pt)", metavar="RUN")
    continue_from: str | None = arg(None, RUN, "teach finished run RUN the classes of --data-root (read as its "
                                    "--dataset unless given) in --tasks (default 1), into --out (default: RUN+<data "
                                    "folder>)", metavar="RUN")
    zeroshot_eval: str | None = arg(None, RUN, "zero-shot accuracy on this dataset's test images before and "
                                    "after the run: what it retains", choices=("food101", *DATASET_DEFAULTS))
    zeroshot_root: str | None = arg(None, RUN, "--data-root of the --zeroshot-eval dataset")
    progress: bool = arg(False, RUN, "show progress bars even when stderr is not a terminal")
    predict: list[str] | None = arg(None, RUN, "classify images (files, folders) with RUN's last task: their"
                                    " paths, --top-k classes, probabilities", metavar=("RUN PATH", "PATH"))
    top_k: int = arg(5, RUN, "--predict: the classes printed per image", low=1)


# What a resumed run may change: every other setting changes the numbers already computed and must stay.
FREE_ON_RESUME = {"data_root", "download", "device", "workers", "eval_batch_size", "out", "resume", "zeroshot_eval",
                  "zeroshot_root", "progress"}


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, a word for a number) are one line, like every other error."""

    def error(self, message):
        raise UserError(f"{message}; see --help")


def number(kind, low=None, above=None, high=None):
    """An argparse type: a finite `kind` number, at least `low`, greater than `above` and at most `high`."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        if low is not None and not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it: "invalid float value"
    return parse


USAGE = """mgclip.py [--dataset NAME] [--data-root DIR] [--tasks T] [FLAG ...]   learn a benchmark, task after task
       mgclip.py --resume RUN [FLAG ...]                                  finish an interrupted run
       mgclip.py --continue-from RUN --dataset folder --data-root NEW      teach a finished run new classes
       mgclip.py --predict RUN PATH [PATH ...] [--top-k K]                classify images with a finished run"""


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, in --help groups; on/off flags only in the direction they are typed."""
    parser = Parser(usage=USAGE, description="MG-CLIP (ICCV 2025): class-incremental learning on CLIP that preserves "
                    "and compensates for the modality gap.", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                    epilog="environment: HF_HUB_OFFLINE=1 never downloads (as --no-download); HF_HOME is where the "
                    "weights are cached; HF_ENDPOINT names a hub mirror; OMP_NUM_THREADS=1 speeds up CPU runs on "
                    "shared machines; CUDA_VISIBLE_DEVICES picks the GPUs that --device sees.")
    parser.add_argument("--version", action="version", version=f"mgclip {__version__}")
    groups = {name: parser.add_argument_group(name) for name in (METHOD, ABLATIONS, DATA, RUN)}
    for f in dataclasses.fields(Settings):
        meta = dict(f.metadata)
        group, text = groups[meta.pop("group")], meta.pop("help")
        flag = "--" + f.name.replace("_", "-")
        kind = next(a for a in typing.get_args(f.type) or [f.type] if a is not type(None))
        if f.default is True:
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=text)
        elif f.default is False:
            group.add_argument(flag, action="store_true", help=text)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="+", metavar=meta.get("metavar", "FILE"), help=text)
        else:
            default = "" if f.default is None else f" (default: {f.default})"
            if f.name in CIFAR100:
                default = " (default: " + ", ".join(f"{d} {v[f.name]}" for d, v in DATASET_DEFAULTS.items()) + ")"
            kind = number(kind, **meta) if kind in (int, float) else kind
            group.add_argument(flag, type=kind, choices=meta.get("choices"), metavar=meta.get("metavar"),
                               help=text + default)
    return parser


def parse_settings(argv=None) -> Settings:
    """Settings from the command line and the dataset's defaults; a run already in OUT continues with its own."""
    typed = vars(build_parser().parse_args(argv))  # only the flags on the command line
    known = {f.name for f in dataclasses.fields(Settings)}
    if "predict" in typed:  # the run's own settings rebuild its model; only where and how it runs may change
        extra = sorted(typed.keys() - {"predict", "top_k", "device", "workers", "eval_batch_size", "download"})
        if extra or len(typed["predict"]) < 2:
            why = f"--{extra[0].replace('_', '-')} cannot act" if extra else "give image files or folders after RUN"
            raise UserError(f"--predict RUN PATH...: {why}; the run's own settings rebuild its model")
        saved = load_checkpoint(typed["predict"][0], "--predict")["settings"]
        return Settings(**{**{k: v for k, v in saved.items() if k in known}, **typed, "resume": None})
    if "resume" in typed:
        out = Path(typed["resume"])
        if out.is_file() and out.name != "checkpoint.pt":
            raise UserError(f"--resume {out}: give a run's --out folder, or the checkpoint.pt in it")
        out = str(out.parent if out.name == "checkpoint.pt" else out)  # the folder, or its checkpoint.pt
        if Path(typed.get("out", out)) != Path(out):
            raise UserError(f"--resume {out} continues the run in its own folder; drop --out {typed['out']}")
        wanted, fix = typed, "drop those flags to continue that run, or start a new one with another --out"
    else:
        check_typed(typed)
        cfg = continued_settings(typed) if "continue_from" in typed else Settings(**typed)
        for key, value in DATASET_DEFAULTS[cfg.dataset].items():  # what the command line left open
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.pretrained is None:
            cfg.pretrained = "none" if cfg.model == "tiny" else "openai"
        check_settings(cfg)
        if cfg.out is None and cfg.continue_from:  # beside RUN, named after it and the new data
            cfg.out = f"{cfg.continue_from.rstrip('/')}+{Path(cfg.data_root).resolve().name}"
        if cfg.out is None:
            suffix = "" if variant(cfg) == "mgclip" else "-" + variant(cfg)
            suffix += "" if cfg.epochs is None else f"-epochs{cfg.epochs}"  # a zero-shot run: its own folder
            cfg.out = f"runs/{cfg.dataset}-{cfg.model.replace('/', '_')}-T{cfg.tasks}-seed{cfg.seed}{suffix}"
        if cfg.continue_from:
            check_new_classes(cfg)
        if not (Path(cfg.out) / "checkpoint.pt").is_file():
            return cfg
        out, wanted = cfg.out, dataclasses.asdict(cfg)  # a rerun (a resubmitted job) continues, never overwrites
        fix = f"continue that run with --resume {out} (its own settings), or give another --out"
    # a setting that an older run lacks had today's default, but precision: runs before --precision were fp32
    saved = {**dataclasses.asdict(Settings()), "precision": "fp32", **load_checkpoint(out)["settings"]}
    changed = [k for k in sorted(wanted.keys() - FREE_ON_RESUME) if wanted[k] != saved[k]]
    if changed:
        differ = ", ".join(f"{as_typed(k, typed.get(k))} (the run: {as_typed(k, saved[k])})" for k in changed)
        raise UserError(f"the run in {out} has other settings: {differ}; {fix}")
    cfg = Settings(**{**{k: v for k, v in saved.items() if k in known}, **typed, "out": out, "resume": out})
    check_settings(cfg)
    return cfg


# What --continue-from takes: the new data and where the run goes; RUN's model, prompt and hyperparameters go on.
NEW_DATA = {"dataset", "data_root", "tasks", "initial_increment", "class_order", "split_file", "syn_classes",
            "syn_train", "syn_test", "syn_size", "continue_from", *FREE_ON_RESUME}


def continued_settings(typed: dict) -> Settings:
    """--continue-from RUN: RUN's settings but for the new data's flags (--tasks default 1); a flag that would change
    what RUN learned with is refused, naming it."""
    run = typed["continue_from"]
    if "data_root" not in typed:
        raise UserError(f"--continue-from {run} needs --data-root NEW, the folder of the new classes (and --dataset "
                        f"to read it by, default the run's)")
    saved = load_checkpoint(run, "--continue-from")
    names = saved.get("data", {}).get("classnames")
    if not names:
        raise UserError(f"--continue-from {run}: its checkpoint.pt names no classes (a run before 2026-11)")
    if saved["rows"][-1]["classes"][1] < len(names):
        raise UserError(f"--continue-from {run}: that run has not finished ({len(saved['rows'])} of "
                        f"{saved['settings']['tasks']} tasks); finish it with --resume {run} first")
    kept = {k: v for k, v in saved["settings"].items() if k not in NEW_DATA}
    changed = [k for k in sorted(typed.keys() & kept.keys()) if typed[k] != kept[k]]
    if changed:
        differ = ", ".join(f"{as_typed(k, typed[k])} (the run: {as_typed(k, kept[k])})" for k in changed)
        raise UserError(f"--continue-from {run} goes on with that run's model, prompt and hyperparameters: {differ}; "
                        f"drop those flags")
    return Settings(**{**kept, "tasks": 1, "dataset": saved["settings"]["dataset"], **typed})


def check_new_classes(cfg: Settings):
    """Before anything is written: the new data holds classes RUN has not learned, and only those, in --tasks."""
    learned = {name.lower() for name in load_checkpoint(cfg.continue_from)["data"]["classnames"]}
    new = load_benchmark(cfg).classnames  # loaded again by the run: here, nothing is written yet
    if all(name.lower() in learned for name in new):
        raise UserError(f"--data-root {cfg.data_root} holds no class that {cfg.continue_from} has not learned; give "
                        f"the new classes' data")
    again = next((name for name in new if name.lower() in learned), None)
    if again:
        raise UserError(f"{cfg.continue_from} has learned '{again}' already; take its folder out of --data-root "
                        f"{cfg.data_root} (a class is learned once)")
    split_tasks(len(new), cfg.tasks, cfg.initial_increment)
    if Path(cfg.out).resolve() == Path(cfg.continue_from).resolve():
        raise UserError(f"--out {cfg.out} is the run it continues, which is read, never written; give another --out")


def as_typed(key: str, value) -> str:
    """A setting as the command line spells it: '--lr 0.001', '--no-compensation', '--epochs default'."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return f"--no-{flag[2:]}" if not value else f"without --no-{flag[2:]}"
    return f"{flag} {'default' if value is None else value}"


def check_typed(typed: dict):
    """Refuse a flag that cannot act in this run: a run must never end as if it had."""
    dataset, idle = typed.get("dataset", "cifar100"), {}
    if not typed.get("compensation", True):
        idle.update(dict.fromkeys(("vis_lr", "vis_batch_size", "vis_epochs", "visual_weight"),
                                  "--no-compensation trains no visual classifier"))
    if "epochs" in typed or not typed.get("preservation", True):
        idle["alpha"] = "no epoch search runs with --epochs or --no-preservation"
    if "epochs" in typed:
        idle["max_epochs"] = "--epochs skips the epoch search"
    if dataset != "synthetic":
        idle.update(dict.fromkeys(("syn_classes", "syn_train", "syn_test", "syn_size"), f"--dataset is {dataset}"))
    idle["top_k"] = "only --predict prints classes"  # only a typed flag is looked up
    if typed.get("max_epochs") == 1 and "alpha" not in idle:
        idle["max_epochs"] = "a search of one epoch finds E* = 1 whatever S- does (--epochs 1 says so)"
    key = next((key for key in typed if key in idle), None)
    if key:
        raise UserError(f"--{key.replace('_', '-')} cannot act: {idle[key]}; drop it")


def check_settings(cfg: Settings):
    """Refuse at once what would fail later or silently train nothing, saying what is allowed."""
    if cfg.model == "tiny" and cfg.pretrained != "none":
        raise UserError("--model tiny has random weights; drop --pretrained or pass --pretrained none")
    if cfg.text_weight + cfg.visual_weight <= 0:
        raise UserError("--text-weight and --visual-weight must not both be 0")
    if cfg.prompt.count("{") != 1 or cfg.prompt.count("}") != 1 or "{}" not in cfg.prompt:
        raise UserError(f"--prompt '{cfg.prompt}' needs exactly one {{}}, where the class name goes")
    if cfg.split_file and cfg.dataset in ("cifar100", "synthetic"):
        raise UserError(f"--split-file is for the image-folder datasets, not --dataset {cfg.dataset}")
    if cfg.out is not None and not cfg.out.strip():
        raise UserError("--out '' names no folder; give one, or drop --out for runs/<dataset>-<model>-...")
    if cfg.zeroshot_root and not cfg.zeroshot_eval:  # not in check_typed: --resume may add both to a run
        raise UserError("--zeroshot-root cannot act: no --zeroshot-eval names the data it holds; drop it")
    if cfg.zeroshot_eval == cfg.dataset and (cfg.dataset == "synthetic" or cfg.zeroshot_root in (None, cfg.data_root)):
        raise UserError(f"--zeroshot-eval {cfg.dataset} is the data the run trains on, not a measure of "
                        f"what it retains; give another dataset (the paper: food101)")
    if cfg.zeroshot_eval not in (None, "synthetic") and not cfg.zeroshot_root:
        raise UserError(f"--zeroshot-eval {cfg.zeroshot_eval} needs --zeroshot-root DIR, the folder of its "
                        f"data (Food-101 is downloaded there when missing)")


def hyper(cfg: Settings) -> Hyper:
    """The method's hyperparameters of a run: the Settings fields of the same names."""
    return Hyper(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Hyper)})


def variant(cfg: Settings) -> str:
    """The paper's row: mgclip, no-preservation and / or no-compensation, or zeroshot (no training)."""
    if cfg.epochs == 0 and not cfg.compensation:
        return "zeroshot"
    off = [name for name in ("preservation", "compensation") if not getattr(cfg, name)]
    return "-".join("no-" + name for name in off) or "mgclip"


# ===================================================================== Running it: CLIP, loaders, the run, checkpoints
log = logging.getLogger("mgclip")
# A CLIP small enough to train on a CPU in seconds, built from open_clip's own config classes.
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=16, width=64, heads=2, layers=2))


@dataclass
class Clip:
    """An open_clip model, its tokenizer and input: size, PIL transform (input_transform), mean and std."""
    model: nn.Module
    tokenize: typing.Callable
    image_size: int
    transform: typing.Callable
    mean: torch.Tensor  # (1, 3, 1, 1), on the model's device
    std: torch.Tensor

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images of the model's size (any device) -> the normalised input, on the model's device."""
        return (x.to(self.mean.device, non_blocking=True).float() / 255 - self.mean) / self.std


def load_clip(name: str, pretrained: str, device: torch.device, seed: int = 0) -> Clip:
    """open_clip's CLIP (weights: a tag, a file or 'none') or the tiny random one, its tokenizer and input."""
    import open_clip
    if name == "tiny":
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP, init_logit_scale=math.log(100))
        tokenize = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
    elif name not in open_clip.list_models():
        lower = {m.lower(): m for m in open_clip.list_models()}
        close = [lower[m] for m in difflib.get_close_matches(name.lower().replace("/", "-"), lower, n=3)]
        hint = f"did you mean --model {' or '.join(close)}? Or " if close else ""
        raise UserError(f"unknown --model '{name}'; {hint}pick one of open_clip.list_models() or 'tiny'")
    else:
        try:  # before the weights: SigLIP's tokenizer comes from Hugging Face, and may be missing
            tokenize = open_clip.get_tokenizer(name)
        except Exception as e:
            hub = open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name")
            reason = textwrap.shorten(f"{type(e).__name__}: {e}", 200, placeholder=" ...")  # one line
            fix = "pip install transformers" if isinstance(e, ImportError) else "cache it while online"
            raise UserError(f"--model {name} needs the tokenizer {hub} ({reason}); {fix}") from None
        model = open_clip_model(name, pretrained)
    preprocess = {"size": model.visual.image_size, **open_clip.get_model_preprocess_cfg(model)}
    size = preprocess["size"][0] if isinstance(preprocess["size"], (tuple, list)) else preprocess["size"]
    mean = torch.tensor(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
    return Clip(model.to(device).eval(), tokenize, size, input_transform(preprocess), mean, std)


def open_clip_model(name: str, pretrained: str) -> nn.Module:
    """open_clip's `name` with its weights; a failure is one line that says where weights were looked for."""
    import open_clip
    weights = None if pretrained == "none" else pretrained
    is_tag = weights is not None and not os.path.isfile(weights)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if is_tag and weights not in tags:
        known = f"its tags: {', '.join(tags)}" if tags else "no tags: give a file, or --pretrained none"
        raise UserError(f"--pretrained {weights} is neither a file nor an open_clip tag of {name} ({known})")
    # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use GELU and only warn
    quick_gelu = is_tag and bool(open_clip.get_pretrained_cfg(name, weights).get("quick_gelu"))
    # a weight file has no preprocessing: take the one all the model's tags share (SigLIP's mean 0.5, squash)
    keys = ("mean", "std", "interpolation", "resize_mode")
    shared = {tuple(open_clip.get_pretrained_cfg(name, tag).get(k) for k in keys) for tag in tags}
    preprocess = dict(zip(keys, shared.pop())) if weights and not is_tag and len(shared) == 1 else None
    logging.disable(logging.CRITICAL)  # open_clip and the hub log each retry; we report one line
    try:
        return open_clip.create_model(name, pretrained=weights, force_quick_gelu=quick_gelu,
                                      force_preprocess_cfg=preprocess)
    except Exception as e:
        reason = textwrap.shorten(str(e) or type(e).__name__, 160, placeholder=" ...")
        if weights is None:
            raise UserError(f"open_clip could not build --model {name} ({reason})") from None
        if not is_tag:
            raise UserError(f"--pretrained {pretrained} is no checkpoint of --model {name} that open_clip can "
                            f"load ({reason}); give that model's weights, or its --model") from None
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise UserError(f"could not load --pretrained {pretrained} for --model {name} ({reason}); weights are looked "
                        f"for under HF_HOME ({cache}): put them there, pass --pretrained PATH, or go online") from None
    finally:
        logging.disable(logging.NOTSET)


class Feed:
    """One split's DataLoader for the whole run; `clock` sums the seconds and images of the passes per phase."""

    def __init__(self, split: Split, clip: Clip, clock: dict, workers: int, progress: bool):
        decoded = any(s.files is not None or s.transform for s in getattr(split, "datasets", [split]))
        workers = min(workers, os.cpu_count() or 1) if decoded else 0
        self.order = []  # the loader's batch sampler: the index batches of the pass about to start, set in place
        self.loader = torch.utils.data.DataLoader(
            split, batch_sampler=self.order, num_workers=workers, pin_memory=clip.mean.device.type == "cuda",
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0)  # started once, for every pass
        self.split, self.clip, self.clock, self.progress = split, clip, clock, progress


class Batches:
    """Model-ready (images, labels) of a split's classes, a pass per iteration; seeded: reshuffled per epoch."""

    def __init__(self, feed: Feed, classes: range, batch_size: int, phase: str, seed: int | None = None):
        labels = feed.split.labels
        self.idx = torch.nonzero((labels >= classes.start) & (labels < classes.stop)).squeeze(1)
        self.feed, self.batch_size, self.phase, self.seed, self.epoch = feed, batch_size, phase, seed, 1

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        feed, idx, device = self.feed, self.idx, self.feed.clip.mean.device
        if self.seed is not None:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))]
        feed.order[:] = [chunk.tolist() for chunk in idx.split(self.batch_size)]
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        sync()  # the time of this pass's own GPU work, not of what was queued before
        start = time.perf_counter()
        with tqdm(total=len(idx), desc=self.phase, leave=False, disable=not feed.progress) as bar:
            for x, y in feed.loader:  # one iterator per pass: the workers decode this pass's images only
                yield feed.clip.input(x), y.to(device, non_blocking=True)
                bar.update(len(y))
        sync()
        seconds, images = feed.clock.get(self.phase, (0.0, 0))
        feed.clock[self.phase] = (seconds + time.perf_counter() - start, images + len(idx))


def pick_device(name: str) -> torch.device:
    """The fastest available device: cuda, then mps, then cpu (or the one named)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type == "cuda" and not count["cuda"]:
        raise UserError(f"--device {name}: this torch ({torch.__version__}) finds no usable GPU (none, or a driver "
                        f"older than CUDA {torch.version.cuda}); install one for the driver (README), or --device cpu")
    if (device.index or 0) >= count.get(device.type, 0):
        raise UserError(f"--device {name} is not available here ({count.get(device.type, 0)} found); use --device auto")
    return device


def set_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """TF32 on CUDA unless fp32 (as the authors' torch 1.8); returns bf16's autocast dtype or None. README, Run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def settle_offline(cfg: Settings):
    """Offline on --no-download or if the hub (HF_ENDPOINT) sends no HTTP answer in 3 s: no retry loop."""
    with suppress(OSError, ValueError):  # refused, unknown, silent for 3 s, or a malformed HF_ENDPOINT
        if not download_forbidden(cfg):
            with suppress(urllib.request.HTTPError):  # an HTTP answer, even an error page: the hub is there
                urllib.request.urlopen(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=3).close()
            return
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # read when they are imported
    if "huggingface_hub.constants" in sys.modules:  # imported already (open_clip names ImageNet's classes)
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


@dataclass
class Run:
    """What a run's plumbing holds: data, CLIP with its LoRA, the prompts, the tasks' batches, the clock."""
    data: Benchmark
    clip: Clip
    lora: list[nn.Parameter]
    tokens: torch.Tensor
    tasks: list[Task]
    zeroshot: Benchmark | None
    clock: dict  # phase -> (seconds, images)
    amp: torch.dtype | None
    progress: bool


def set_up(cfg: Settings) -> Run:
    """Device (seeded), data, CLIP with LoRA, the prompts and the batches of every task of a run."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # every device's generator
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:N: the timing syncs, peak memory, device name and pinned memory too
        torch.cuda.reset_peak_memory_stats(device)  # summary.json's peak is this run's
        if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name()} has no bfloat16; use tf32 (default)")
    data = load_benchmark(cfg)
    if cfg.continue_from:
        data = continued(data, learned_from(cfg))
    first = sum(len(part["data"]["classnames"]) for part in data.learned_from)  # learned by the runs before
    before = sum(part["settings"]["tasks"] for part in data.learned_from)
    ranges = [range(first + r.start, first + r.stop)
              for r in split_tasks(len(data.classnames) - first, cfg.tasks, cfg.initial_increment)]
    zcfg = dataclasses.replace(cfg, dataset=cfg.zeroshot_eval, class_order=None, split_file=None,
                               data_root=cfg.zeroshot_root or cfg.data_root)  # any --dataset, or food101
    zeroshot = load_benchmark(zcfg) if cfg.zeroshot_eval else None
    splits = [data.train, *getattr(data.test, "datasets", [data.test])] + ([zeroshot.test] if zeroshot else [])
    progress = cfg.progress or sys.stderr.isatty()
    check_images([file for split in splits if split.files for file in split.files], cfg.workers, progress)
    if cfg.model != "tiny":
        settle_offline(cfg)  # after the data: it only decides how the weights and a hub tokenizer load
    clip = load_clip(cfg.model, cfg.pretrained, device, cfg.seed)
    if cfg.pretrained == "none":
        log.info("a random-init CLIP (--pretrained none): zero-shot is chance, the text branch may sit below it, and "
                 "which ablation wins means nothing")
    if device.type == "cpu" and cfg.device == "auto" and cfg.model != "tiny":
        log.info(f"warning: no usable GPU found: {cfg.model} runs on the CPU, days for a benchmark (README, Set up)")
    for split in splits:
        stored = split.files is None and split.pixels.shape[-2:] == (clip.image_size,) * 2
        split.transform = None if stored else clip.transform  # files and other sizes: resized in the loader workers
    try:
        lora = add_lora(clip.model, hyper(cfg))
    except ValueError as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    tokens = clip.tokenize([cfg.prompt.format(name) for name in data.classnames])
    clock = {}
    train = Feed(data.train, clip, clock, cfg.workers, progress)
    test = Feed(data.test, clip, clock, cfg.workers, progress)
    tasks = []
    for t, classes in enumerate(ranges, before + 1):  # task t shuffles with seed + t, as in one run of all the tasks
        log.info(f"task {t} learns {', '.join(data.classnames[classes.start: classes.stop])}")
        tasks.append(Task(classes, Batches(train, classes, cfg.batch_size, "train", seed=cfg.seed + t),
                          Batches(train, classes, cfg.eval_batch_size, "features"),
                          Batches(test, range(0, classes.stop), cfg.eval_batch_size, "eval")))
    after = f" after the {first} of {cfg.continue_from}" if first else ""
    images = f"{len(data.classnames) - first} classes{after} ({len(data.train)} training images)"
    in_tasks = "1 task" if len(tasks) == 1 else f"{len(tasks)} tasks"
    log.info(f"MG-CLIP ({variant(cfg)}) on {cfg.dataset}: {images} in {in_tasks}, {cfg.model} "
             f"({cfg.pretrained}) on {device} in {cfg.precision}, "
             f"{sum(p.numel() for p in lora):,} LoRA parameters, logit scale {clip.model.logit_scale.exp().item():.1f}")
    log.info(f"prompts as '{cfg.prompt.format(data.classnames[first])}'")
    return Run(data, clip, lora, tokens, tasks, zeroshot, clock, set_precision(device, cfg.precision), progress)


def run(cfg: Settings) -> dict:
    """MG-CLIP into --out (one run at a time): set up, learn each task and checkpoint it, then write the summary."""
    started = time.perf_counter()
    out = Path(cfg.out)
    done = out / "summary.json"
    finished = json.loads(done.read_text()) if cfg.resume and done.is_file() else {}
    if finished and (finished.get("zeroshot") or {}).get("dataset") == cfg.zeroshot_eval:  # all done
        print(f"the run in {out} has finished: {summary_line(finished)}; --predict {out} PATH classifies with it, "
              f"--continue-from {out} teaches it new classes, another --out starts anew")
        return finished
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror or type(e).__name__}); give a folder you can "
                        f"write to") from None
    with lock:  # closing it drops the lock, and so does the system when the process dies, crash or not
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a resubmitted job, or a sweep whose runs share one --out
            raise UserError(f"another run is writing to {out} (it holds {out / '.lock'}); wait for it to end, or give "
                            f"another --out") from None
        setup_logging(out, append=bool(cfg.resume))
        settings = dict(settings=dataclasses.asdict(cfg), run=run_record(cfg.device))
        if not cfg.resume:  # at once: a run that fails while loading its data still says what it was
            write_json(out / "settings.json", settings)
        r = set_up(cfg)
        state = resume_state(r, out) if cfg.resume else None
        if state is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        if state is None and cfg.continue_from:  # RUN's last state, read and never written: its tasks stay its own
            state = {k: v for k, v in load_checkpoint(cfg.continue_from).items() if k not in ("clock", "wall_seconds")}
            log.info(f"continuing {cfg.continue_from}: {len(state['rows'])} tasks learned, classes 0-"
                     f"{state['rows'][-1]['classes'][1] - 1}")
        elif state is not None:
            started -= state.get("wall_seconds", 0.0)  # the wall time of the sessions before
            write_json(out / "settings.json", settings)  # after the checks: a refused resume leaves it as it was
        hp = hyper(cfg)
        tick = time.perf_counter()
        try:
            for state in learn_tasks(r.clip.model, r.lora, r.tokens, r.tasks, hp, r.amp, state, log.info):
                row = state["rows"][-1]
                row["seconds"] = round(time.perf_counter() - tick, 3)
                tick = time.perf_counter()
                save_task(out, dict(state, wall_seconds=time.perf_counter() - started), r, cfg)
                if os.environ.get("MGCLIP_STOP_AFTER_TASK") == str(row["task"]):  # test hook: a pre-emption now
                    raise KeyboardInterrupt
        except FloatingPointError as e:
            task = len(state["rows"]) + 1 if state else 1
            raise UserError(f"{e} of task {task}; lower --lr (now {cfg.lr:g}); the checkpoint of the tasks before is "
                            f"intact") from None
        except ValueError as e:  # the method's contracts (a checkpoint taken on other weights): one line too
            raise UserError(f"{e}") from None
        summary = summarize(r, cfg, state, settings["run"], time.perf_counter() - started)
        write_json(out / "summary.json", summary)
        log.info(f"{summary_line(summary)}  -> {out}")
        return summary


def summary_line(summary: dict) -> str:
    """Avg, Last, forgetting, E*, the time and zero-shot retention of a finished run, as its log ends."""
    forgetting = "n/a" if summary["forgetting"] is None else f"{summary['forgetting']:.2f}"
    epochs = "E*" if summary["epochs_searched"] else "epochs per task"
    line = (f"Avg {summary['avg']:.2f}  Last {summary['last']:.2f}  forgetting {forgetting}  {epochs} "
            f"{summary['epochs_star']}  {summary['seconds_total']:.1f}s")
    if summary.get("untested"):  # a continued run whose earlier data is gone
        line += f"  (without tasks {', '.join(map(str, summary['untested']))}: their test images are gone)"
    z = summary.get("zeroshot")
    if z:
        kept = 100 * (z["retained"] or 0)
        line += f"  zero-shot {z['dataset']}: {z['before']:.2f} -> {z['after']:.2f} ({kept:.1f}% kept)"
    return line


def run_record(device: str) -> dict:
    """What ran, where: the command line, the code's git version, library versions, host and device."""
    try:
        code = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        code = None
    cuda = torch.cuda.is_available() and device != "cpu"
    return dict(command=sys.argv, code=code, python=platform.python_version(), torch=torch.__version__,
                open_clip=importlib.metadata.version("open_clip_torch"), cuda=torch.version.cuda if cuda else None,
                cudnn=torch.backends.cudnn.version() if cuda else None, host=platform.node(),
                device_name=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine())


def save_task(out: Path, state: dict, r: Run, cfg: Settings):
    """After each task: checkpoint.pt (state, settings, data, clock), then metrics.jsonl, each replaced atomically."""
    checkpoint = dict(state, settings=asdict(cfg), data=r.data.record(), learned_from=r.data.learned_from,
                      clock=r.clock)
    try:  # the checkpoint first: metrics.jsonl is rewritten from it on resume, never the other way round
        replace_atomically(out / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))
        write_json(out / "metrics.jsonl", state["rows"], lines=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = textwrap.shorten(getattr(e, "strerror", None) or str(e), 80, placeholder=" ...")
        raise UserError(f"cannot save task {len(state['rows'])} in {out} ({reason}); is the disk full? The "
                        f"checkpoint of the tasks before is intact: free space, then --resume {out}") from None


def learned_from(cfg: Settings) -> list[dict]:
    """The data of the runs a continued run goes on from, oldest first: each one's settings and its own classes."""
    if cfg.resume and (Path(cfg.out) / "checkpoint.pt").is_file():
        return load_checkpoint(cfg.out)["learned_from"]
    saved = load_checkpoint(cfg.continue_from, "--continue-from")
    earlier = saved.get("learned_from", [])
    own = saved["data"]["classnames"][sum(len(part["data"]["classnames"]) for part in earlier):]
    return earlier + [dict(settings=saved["settings"], data=dict(saved["data"], classnames=own))]


def resume_state(r: Run, out: Path) -> dict:
    """The checkpoint's state, on the same data, with the clock it had; metrics.jsonl cut back to its tasks."""
    state = load_checkpoint(str(out))
    saved, now = state.get("data", r.data.record()), r.data.record()  # checkpoints before 2026-11 have none
    differ = [key for key in now if saved[key] != now[key]]
    if differ:
        raise UserError(f"the run in {out} was trained on other data ({', '.join(differ)} differ); point --data-root "
                        f"at that run's data, or start a new run with another --out")
    r.clock.update(state.get("clock", {}))
    write_json(out / "metrics.jsonl", state["rows"], lines=True)
    log.info(f"continuing the run in {out} after task {len(state['rows'])} (from its checkpoint.pt)")
    return state


def predict_images(cfg: Settings):
    """--predict RUN PATH...: the run's CLIP with the LoRA and the classifier of its last finished task; prints a line
    per image: its path, then its top-k classes, each with its fused probability, tab-separated, highest first."""
    out = cfg.predict[0]
    state = load_checkpoint(out, "--predict")
    names = state.get("data", {}).get("classnames")  # checkpoints before 2026-11 lack them
    if not names:
        raise UserError(f"--predict {out}: its checkpoint.pt names no classes (a run before 2026-11)")
    state.setdefault("hyper", asdict(hyper(cfg)))  # runs before 2026-12: the fusion weights of their settings
    files = images_to_predict(cfg.predict[1:])
    check_images(files, cfg.workers, cfg.progress, "give only images that PIL reads")
    seen = state["rows"][-1]["classes"][1]
    planned = sum(part["settings"]["tasks"] for part in state.get("learned_from", [])) + cfg.tasks
    finished = f"task {len(state['rows'])} of {planned}"
    if still_training(out):
        finished += " (it is still training)"
    elif seen < len(names):
        finished += f" (it stopped there: --resume {out} finishes it)"
    print(f"mgclip: predicting with {out} after {finished}: ranks {seen} of its {len(names)} classes", file=sys.stderr)
    if cfg.top_k > seen:
        print(f"mgclip: --top-k {cfg.top_k} is more than the {seen} classes: printing {seen}", file=sys.stderr)
    device = pick_device(cfg.device)
    if cfg.model != "tiny":
        settle_offline(cfg)
    clip = load_clip(cfg.model, cfg.pretrained, device, cfg.seed)
    lora = add_lora(clip.model, hyper(cfg))
    tokens = clip.tokenize([cfg.prompt.format(name) for name in names])
    try:
        classify = predictor(clip.model, lora, tokens, state, set_precision(device, cfg.precision))
    except ValueError as e:
        raise UserError(f"--predict {cfg.predict[0]}: {e}") from None
    split = Split(torch.zeros(len(files), dtype=torch.long), files=files, transform=clip.transform)
    batches = Batches(Feed(split, clip, {}, cfg.workers, cfg.progress), range(1), cfg.eval_batch_size, "predict")
    done = 0
    try:
        for x, _ in batches:
            fused = classify(x)[0]
            top = fused.topk(min(cfg.top_k, fused.shape[1]))
            for path, values, indices in zip(files[done:], top.values.tolist(), top.indices.tolist()):
                print("\t".join([path] + [f"{names[c]}\t{p:.4f}" for c, p in zip(indices, values)]))
            done += len(x)
    except BrokenPipeError:  # mgclip.py --predict ... | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def images_to_predict(paths: list[str]) -> list[str]:
    """The image files given, and those under the folders given, found as training finds them (sorted, subfolders)."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"--predict: {path} does not exist; give image files or folders of them")
        if os.path.isfile(path) and not is_image(path):
            raise UserError(f"--predict: {path} is no image that PIL opens ({skipped_kinds([path])}); give images")
        found = [path] if os.path.isfile(path) else [os.path.join(top, name) for top, _, fnames in
                                                     os.walk(path, followlinks=True) for name in fnames]
        others = [f for f in found if not is_image(f)]
        if others:
            print(f"mgclip: skipped what PIL does not open under {path}: {skipped_kinds(others)}", file=sys.stderr)
        files += sorted(f for f in found if is_image(f))
    if not files:
        raise UserError(f"--predict: no image in {', '.join(paths)} (read: the files PIL opens)")
    return files


def still_training(out: str) -> bool:
    """Whether a run holds the lock of its folder now (a process that ends, crash or not, drops it)."""
    try:
        with open(Path(out) / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no run ever wrote there
        return False
    return False


def zeroshot_accuracy(model, batches, tokens, amp=None) -> float:
    """Zero-shot top-1 (%) of the text branch on another dataset's test batches and class prompts."""
    correct, count = evaluate(model, batches, text_features(model, tokens, amp), None, amp=amp)
    return accuracy(correct[1], count, range(len(tokens)))


def continual_metrics(acc: list, matrix: list[list]) -> dict:
    """From a[t][j], task j's accuracy after task t (None: not measured, left out): Avg = mean of acc_t, Last = acc_T,
    forgetting = mean over j < T of max_{j<=t<T} a[t][j] - a[T][j], backward transfer = mean of a[T][j] - a[j][j]."""
    T, drops, transfers = len(acc), [], []
    for j in range(T - 1):
        earlier = [matrix[t][j] for t in range(j, T - 1) if matrix[t][j] is not None]
        if matrix[T - 1][j] is not None and matrix[j][j] is not None:
            drops.append(max(earlier) - matrix[T - 1][j])
            transfers.append(matrix[T - 1][j] - matrix[j][j])
    return dict(avg=mean([a for a in acc if a is not None]), last=acc[-1], forgetting=mean(drops), bwt=mean(transfers))


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(r: Run, cfg: Settings, state: dict, record: dict, seconds: float) -> dict:
    """summary.json: settings, data, run record, the metrics, per-branch accuracies, gap, search, zero-shot, times."""
    rows = state["rows"]
    device = r.clip.mean.device
    summary = dict(config=dataclasses.asdict(cfg), variant=variant(cfg), device=str(device), **r.data.record(),
                   class_order=r.data.order, epochs_star=state["epochs"], epochs_searched="search" in rows[0],
                   lora_parameters=sum(p.numel() for p in r.lora),
                   **continual_metrics([row["acc"] for row in rows], [row["acc_per_task"] for row in rows]),
                   acc=[row["acc"] for row in rows], acc_matrix=[row["acc_per_task"] for row in rows],
                   acc_text=[row["acc_text"] for row in rows], acc_visual=[row["acc_visual"] for row in rows],
                   gap=[dict(task=row["task"], before=row["gap_before"], after=row["gap_after"]) for row in rows],
                   s_minus_0=rows[0]["gap_before"]["s_minus"], search=rows[0].get("search", []),
                   untested=[row["task"] for row, acc in zip(rows, rows[-1]["acc_per_task"]) if acc is None])
    if r.zeroshot:
        z = r.zeroshot
        tokens = r.clip.tokenize([cfg.prompt.format(name) for name in z.classnames])
        feed = Feed(z.test, r.clip, r.clock, cfg.workers, r.progress)
        batches = Batches(feed, range(len(z.classnames)), cfg.eval_batch_size, "zeroshot")
        final = zeroshot_accuracy(r.clip.model, batches, tokens, r.amp)
        with pretrained_clip(r.clip.model):
            first = zeroshot_accuracy(r.clip.model, batches, tokens, r.amp)
        summary["zeroshot"] = dict(dataset=cfg.zeroshot_eval, before=first, after=final,
                                   retained=final / first if first else None)
    summary["phases"] = {p: dict(seconds=round(s, 3), images_per_second=round(n / s, 1) if s else None)
                         for p, (s, n) in r.clock.items()}
    summary.update(run=record, seconds_total=round(seconds, 3), seconds_per_task=[row.get("seconds") for row in rows],
                   peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda"
                   else None)
    return summary


def replace_atomically(path: Path, write):
    """Write a file through a temporary one, then rename: a crash or Ctrl-C never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing behind


def write_json(path: Path, obj, lines=False):
    """Write JSON, or a list as JSON lines (lines=True), atomically."""
    text = "".join(json.dumps(row) + "\n" for row in obj) if lines else json.dumps(obj, indent=2)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(out: str, flag: str = "--resume") -> dict:
    """The state saved after the last finished task of the run in OUT."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file() and (Path(out) / "settings.json").is_file():
        fix = "wait for its first task" if still_training(out) else "run its command again (it starts afresh)"
        raise UserError(f"{flag} {out}: no task of that run has finished yet, so there is nothing to {flag[2:]}; {fix}")
    if not path.is_file():
        raise UserError(f"{flag} {out}: no checkpoint.pt there; give the --out folder of an earlier run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete it to start that run afresh, or give "
                        f"another --out") from None


class TqdmHandler(logging.Handler):
    """Log lines printed between the progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except OSError:  # stdout closed (mgclip.py ... | head): the run goes on, log.txt keeps every line
            log.removeHandler(self)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def setup_logging(out: Path, append: bool):
    """Log lines, stamped with the time, to the terminal and to OUT/log.txt."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler, stamp in ((TqdmHandler(), "%H:%M:%S"),
                           (logging.FileHandler(out / "log.txt", mode="a" if append else "w"), "%Y-%m-%d %H:%M:%S")):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", stamp))
        log.addHandler(handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, SIGHUP (ssh dropped) or SIGUSR1 (SLURM's warning), as Ctrl-C: one line says how to resume."""


def terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def stop(cfg: Settings | None, message: str, code: int = 1):
    """Exit with one line on stderr, also appended to the run's log.txt when the run has one."""
    if cfg is not None and not cfg.predict and (Path(cfg.out) / "log.txt").is_file():
        with open(Path(cfg.out) / "log.txt", "a") as fh:
            fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
    with suppress(OSError):  # the terminal is gone (SIGHUP): log.txt has the line
        print(message, file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    """Command line entry: every expected failure ends in one line saying what to do, and a non-zero exit."""
    cfg = None
    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    try:
        cfg = parse_settings(argv)
        if cfg.predict:
            predict_images(cfg)
        else:
            run(cfg)
    except UserError as e:  # raised in a loader worker, it arrives wrapped in that worker's traceback
        stop(cfg, f"mgclip: error: {str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]}")
    except OSError as e:  # an I/O failure no check foresaw (a disk filling up): one line all the same
        stop(cfg, f"mgclip: error: {e.strerror or e} ({e.filename or 'no file named'}); check the disk and --out")
    except torch.cuda.OutOfMemoryError:
        stop(cfg, f"mgclip: error: out of GPU memory; lower --batch-size (now {cfg.batch_size}) "
                  f"or --eval-batch-size (now {cfg.eval_batch_size})")
    except RuntimeError as e:  # a loader worker's bus error: /dev/shm is full (Docker gives 64 MB)
        if "shared memory" not in str(e):
            raise
        stop(cfg, f"mgclip: error: the loader workers ran out of shared memory (/dev/shm); lower --workers (now "
                  f"{cfg.workers}), or give the container more (docker run --shm-size 8g)")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP / SIGUSR1: exit 130, or 128 + the signal
        if argv is None:  # the process ends after this: a second Ctrl-C must not break the workers' shutdown
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        done = cfg and (Path(cfg.out) / "checkpoint.pt").is_file()
        where = f"; resume with --resume {cfg.out}" if done else "; no task had finished: run the same command again"
        if isinstance(e, Terminated):
            stop(cfg, f"mgclip: terminated by {e}{where}", 128 + signal.Signals[str(e)].value)
        else:
            stop(cfg, f"mgclip: interrupted{where}", 130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ===================================================================== Class lists and orders, out of the reader's way
# The authors' lists: VTAB's class names (dataset_reqs/vtab_classes.txt, ImageFolder order); ORDER[p]: class at p.
VTAB_CLASSES = """airplane; airport; baseball diamond; basketball court; beach; bridge; chaparral; church;
circular farmland; cloud; banded; blotchy; braided; bubbly; bumpy; chequered; cobwebbed; cracked;
crosshatched; crystalline; Abyssinian Cat; American Bulldog; American Pit Bull Terrier; Basset Hound; Beagle;
Bengal Cat; Birman; Bombay Cat; Boxer Dog; British Shorthair Cat; AnnualCrop; Forest; HerbaceousVegetation;
Highway; Industrial; Pasture; PermanentCrop; Residential; River; SeaLake; petunia; wild pansy; primula;
sunflower; pelargonium; bishop of llandaff; gaura; geranium; orange dahlia; pink-yellow dahlia"""
CIFAR100_ORDER = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32,
                  45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73,
                  1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89,
                  43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39]
IMAGENET100_ORDER = numpy.random.RandomState(1993).permutation(100).tolist()  # continuum's and PyCIL's seed
IMAGENET_R_ORDER = [
    150, 119, 193, 2, 75, 179, 129, 68, 145, 53, 171, 133, 31, 103, 146, 174, 149, 40, 142, 30, 183, 156, 167, 166,
    124, 56, 109, 198, 185, 170, 51, 55, 77, 32, 45, 23, 115, 39, 134, 177, 12, 126, 130, 37, 19, 34, 0, 135, 161, 108,
    128, 18, 141, 24, 154, 160, 78, 85, 89, 73, 152, 112, 114, 104, 44, 93, 138, 107, 100, 163, 3, 148, 147, 35, 199,
    50, 25, 96, 79, 172, 98, 140, 22, 162, 6, 27, 60, 144, 197, 67, 165, 196, 102, 71, 65, 47, 9, 122, 42, 63, 61, 180,
    97, 84, 157, 168, 69, 41, 83, 92, 190, 191, 59, 72, 111, 155, 105, 57, 17, 116, 13, 28, 43, 136, 5, 14, 169, 7, 62,
    110, 189, 95, 8, 4, 137, 194, 90, 74, 70, 113, 186, 132, 192, 33, 36, 158, 188, 94, 121, 164, 58, 11, 178, 151,
    184, 1, 10, 64, 15, 106, 52, 176, 26, 81, 82, 88, 125, 46, 123, 91, 187, 86, 20, 76, 80, 66, 120, 131, 16, 159,
    101, 87, 99, 195, 143, 21, 49, 38, 181, 29, 153, 54, 173, 127, 117, 182, 139, 118, 48, 175
]

if __name__ == "__main__":
    main()
