"""Time MG-CLIP's training step and evaluation batch against the bare image tower (random images, random init).

    python benchmarks/speed.py --model ViT-B-16 --batch-size 128 --eval-batch-size 256 --device cuda
    python benchmarks/speed.py --model tiny --batch-size 128 --eval-batch-size 256          # a CPU smoke test
    python benchmarks/speed.py --model tiny --device cpu --loader-workers 0 1 2             # the loader alone

The cost ratio is our time per image over the bare tower's: forward+backward into LoRA for training (our step adds
the text tower on the task's 10 prompts and the loss), forward for evaluation (ours adds both branches' scores).
The loader figure is the images/s that mgclip's loader delivers to the device, decoded and resized to 224 as open_clip
does, from CIFAR-sized uint8 images in memory and from JPEG files (500 x 375, ImageNet's typical size), per number of
worker processes (the second pass: the workers are started by then, as in every pass of a run but the first).
Prints one JSON object and, with --out FILE, writes it there.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mgclip as M  # noqa: E402


def timed(fn, images: int, device: torch.device, repeats: int) -> float:
    """Images per second of fn over `repeats` calls, after one warm-up call (kernels, caches)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return repeats * images / (time.perf_counter() - start)


def positive(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def main(argv=None) -> dict:
    """Parse the flags; every mistake ends in one error line, exit code 2 (argparse) or 1 (mgclip's checks)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or 'tiny' (random init either way)")
    p.add_argument("--batch-size", type=positive, default=128, help="training batch")
    p.add_argument("--eval-batch-size", type=positive, default=256, help="evaluation batch")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | ...")
    p.add_argument("--precision", default="tf32", choices=["tf32", "fp32", "bf16"], help="as mgclip.py --precision")
    p.add_argument("--repeats", type=positive, default=5, help="timed calls per measurement")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[0, 1, 2, 4, 8],
                   help="worker counts for the loader figure (none: skip it)")
    p.add_argument("--loader-images", type=positive, default=512, help="images per loader pass")
    p.add_argument("--out", help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out {args.out}: its folder does not exist")
    try:
        speed = measure(args)
    except (M.UserError, ValueError) as e:  # add_lora refuses a model it cannot reach (RN50): a ValueError
        p.exit(1, f"speed.py: error: --model {args.model}: {e}\n" if not isinstance(e, M.UserError) else
               f"speed.py: error: {e}\n")
    print(json.dumps(speed, indent=2))
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(speed, indent=2))
        except OSError as e:
            p.exit(1, f"speed.py: error: cannot write --out {args.out} ({e.strerror}); the figures are above\n")
    return speed


def loader_speed(clip, split, workers: int, batch_size: int) -> tuple[int, float]:
    """The worker processes mgclip's loader uses for `split` (at most the cores) and the images/s of its second pass
    (decoded, resized to 224 and on the device)."""
    feed = M.Feed(split, clip, {}, workers, progress=False)
    batches = M.Batches(feed, range(0, 1), batch_size, "loader")
    for _ in batches:  # the first pass starts the workers
        pass
    first_seconds, first_images = feed.clock["loader"]
    for _ in batches:
        pass
    seconds, images = feed.clock["loader"]
    return feed.loader.num_workers, (images - first_images) / (seconds - first_seconds)


def loader_figures(clip, args) -> list[dict]:
    """The loader figure, per worker count: CIFAR-sized uint8 images in memory, and JPEG files of 500 x 375."""
    n, g = args.loader_images, torch.Generator().manual_seed(0)
    labels = torch.zeros(n, dtype=torch.long)
    at_224 = M.input_transform(dict(size=224))  # OpenAI CLIP's: bicubic resize of the short side, center crop
    pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    cifar = M.Split(labels, pixels, transform=at_224)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = [os.path.join(folder, f"{i}.jpg") for i in range(n)]
        for path in files:  # smooth colour fields with a little noise: about the size of a photo's JPEG
            x = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(375, 500), mode="bilinear")[0]
            x = ((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
            PIL.Image.fromarray(x.permute(1, 2, 0).numpy()).save(path, quality=90)
        jpeg = M.Split(labels, files=files, transform=at_224)
        for source, split in (("cifar-32px-uint8", cifar), ("jpeg-500x375", jpeg)):
            for workers in args.loader_workers:
                used, speed = loader_speed(clip, split, workers, args.eval_batch_size)
                if not any(r["source"] == source and r["workers"] == used for r in rows):
                    rows.append(dict(source=source, workers=used, images_per_second=round(speed, 1)))
    return rows


def measure(args) -> dict:
    """Images/s of the bare tower and of MG-CLIP's training step and evaluation batch; printed as JSON."""
    device = M.pick_device(args.device)
    amp = M.set_precision(device, args.precision)
    clip = M.load_clip(args.model, "none", device)
    lora = M.add_lora(clip.model)
    model, size = clip.model, clip.image_size
    x_train = clip.input(torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device))
    x_eval = clip.input(torch.randint(0, 256, (args.eval_batch_size, 3, size, size), dtype=torch.uint8, device=device))
    tokens = clip.tokenize([f"a good photo of a class {i}." for i in range(100)]).to(device)
    y = torch.arange(args.batch_size, device=device) % 10
    opt = torch.optim.Adam(lora, lr=1e-3)
    text = M.text_features(model, tokens, amp)

    def train_step():  # one step of MG-CLIP's fine-tuning: both towers, the loss over 10 classes, Adam
        next(M.finetune(model, lora, [(x_train, y)], tokens, range(0, 10), 1e-3, 1, amp))
    w = F.normalize(torch.randn(100, text.shape[1], device=device), dim=-1)

    def bare_train():
        with M.forward_context(device, amp):
            model.encode_image(x_train).float().sum().backward()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def bare_eval():
        with M.forward_context(device, amp):
            model.encode_image(x_eval)

    speed = dict(device=str(device), model=args.model, precision=args.precision, batch_size=args.batch_size,
                 eval_batch_size=args.eval_batch_size,
                 bare_train=timed(bare_train, args.batch_size, device, args.repeats),
                 train=timed(train_step, args.batch_size, device, args.repeats),
                 bare_eval=timed(bare_eval, args.eval_batch_size, device, args.repeats),
                 eval=timed(lambda: M.fuse_scores(*M.branch_logits(model, x_eval, text, w, amp)), args.eval_batch_size,
                            device, args.repeats))
    speed.update(train_cost_ratio=speed["bare_train"] / speed["train"],
                 eval_cost_ratio=speed["bare_eval"] / speed["eval"],
                 peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    speed = {k: round(v, 3) if isinstance(v, float) else v for k, v in speed.items()}
    if args.loader_workers:
        speed["loader"] = loader_figures(clip, args)
    return speed


if __name__ == "__main__":
    main()
