"""Time MG-CLIP's training step and evaluation batch against the bare image tower (random images, random init).

    python benchmarks/speed.py --model ViT-B-16 --batch-size 128 --eval-batch-size 256 --device cuda
    python benchmarks/speed.py --model tiny --batch-size 128 --eval-batch-size 256          # a CPU smoke test

The cost ratio is our time per image over the bare tower's: forward+backward into LoRA for training (our step adds
the text tower on the task's 10 prompts and the loss), forward for evaluation (ours adds both branches' scores).
Prints one JSON object and, with --out FILE, writes it there.
"""
import argparse
import json
import sys
import time
from pathlib import Path

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
    p.add_argument("--out", help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out {args.out}: its folder does not exist")
    try:
        return measure(args)
    except M.UserError as e:
        p.exit(1, f"speed.py: error: {e}\n")


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
                 eval=timed(lambda: M.predict(model, x_eval, text, w, amp=amp), args.eval_batch_size, device,
                            args.repeats))
    speed.update(train_cost_ratio=speed["bare_train"] / speed["train"],
                 eval_cost_ratio=speed["bare_eval"] / speed["eval"],
                 peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    speed = {k: round(v, 3) if isinstance(v, float) else v for k, v in speed.items()}
    print(json.dumps(speed, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(speed, indent=2))
    return speed


if __name__ == "__main__":
    main()
