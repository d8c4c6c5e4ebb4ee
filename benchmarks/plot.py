"""Draw a finished MG-CLIP run from its summary.json: accuracy per branch, S+ / S- per task, and the gap search.

    python benchmarks/plot.py runs/cifar100-ViT-B-16-T10-seed42            # writes OUT/mgclip.png
    python benchmarks/plot.py OUT --out docs/synthetic-gap.png              # README's figure

Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
from pathlib import Path


def draw(summary: dict, path: Path, plt):
    """Left: accuracy on all seen classes after each task, per branch. Middle: S+ / S- of the pre-trained CLIP and of
    the trained model per task. Right: the gap search on task 1, S- per epoch against the alpha band around S-(0)."""
    tasks = [g["task"] for g in summary["gap"]]
    search = summary.get("search") or []
    fig, axes = plt.subplots(1, 3 if search else 2, figsize=(16 if search else 11, 4.2))
    left, middle = axes[0], axes[1]
    for key, label, style in (("acc", "fused (MG-CLIP)", "o-"), ("acc_text", "text branch", "s--"),
                              ("acc_visual", "visual classifier", "^:")):
        if summary[key][0] is not None:
            left.plot(tasks, summary[key], style, label=label)
    left.set(xlabel="task", ylabel="accuracy on all seen classes (%)", title="Accuracy after each task",
             xticks=tasks, ylim=(0, 100))
    left.legend()
    for key, colour, name in (("s_plus", "tab:green", "S+ (matching pairs)"),
                              ("s_minus", "tab:red", "S- (non-matching pairs)")):
        middle.plot(tasks, [g["before"][key] for g in summary["gap"]], "o--", color=colour, alpha=0.5,
                    label=f"{name}, pre-trained CLIP")
        middle.plot(tasks, [g["after"][key] for g in summary["gap"]], "o-", color=colour,
                    label=f"{name}, after the task")
    middle.set(xlabel="task", ylabel="mean s * cos(image, prompt)", xticks=tasks,
               title=f"Modality gap on each task's images (E* = {summary['epochs_star']})")
    middle.legend(fontsize=8)
    if search:
        right = axes[2]
        s0, alpha = summary["s_minus_0"], summary["config"]["alpha"]
        epochs = [0] + [e["epoch"] for e in search]
        right.plot(epochs, [s0] + [e["s_minus"] for e in search], "o-", color="tab:red", label="S-(e)")
        right.axhspan(s0 - alpha * abs(s0), s0 + alpha * abs(s0), color="tab:red", alpha=0.12,
                      label=f"S-(0) +/- {alpha:g} |S-(0)|")
        right.axvline(summary["epochs_star"], color="black", linestyle=":", label=f"E* = {summary['epochs_star']}")
        right.set(xlabel="epoch of the search on task 1", ylabel="S-", xticks=epochs,
                  title="Gap preservation: S- while fine-tuning task 1")
        right.legend(fontsize=8)
    name = "MG-CLIP" if summary["variant"] == "mgclip" else f"MG-CLIP, {summary['variant']}"
    fig.suptitle(f"{name} on {summary['config']['dataset']}: Avg {summary['avg']:.1f}, Last {summary['last']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    """Read OUT/summary.json and write the picture; every mistake is one error line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the output folder of a finished run (it holds summary.json)")
    p.add_argument("--out", help="the picture to write (default: RUN/mgclip.png)")
    args = p.parse_args(argv)
    try:
        summary = json.loads((Path(args.run) / "summary.json").read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {Path(args.run) / 'summary.json'} ({type(e).__name__}); give a finished run's --out")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        p.error("needs matplotlib: pip install matplotlib")
    path = Path(args.out or Path(args.run) / "mgclip.png")
    try:
        draw(summary, path, plt)
    except OSError as e:
        p.error(f"cannot write {path} ({e.strerror or type(e).__name__})")
    print(path)
    return path


if __name__ == "__main__":
    main()
