"""The paper's table in one command: MG-CLIP, its two ablations and zero-shot CLIP on every benchmark found under ROOT.

    python benchmarks/paper.py --root DATA --out paper            # 5 benchmarks x 4 variants x 3 seeds, on a GPU
    python benchmarks/paper.py --smoke --out /tmp/paper           # the synthetic demo on the CPU, ~15 s
    python benchmarks/paper.py --root DATA --out paper -- --precision bf16    # after --: flags for every mgclip run

Data under ROOT (a benchmark whose folder is missing becomes a row that says where to put it):
    ROOT/cifar100/cifar-100-python/{train,test,meta}   CIFAR-100 B0 Inc10, torchvision's format
    ROOT/imagenet100/{train,val}/<wnid>/               ImageNet-100 B0 Inc10 (a full ImageNet-1K folder works too)
    ROOT/imagenet-r/<wnid>/  or  {train,test}/<wnid>/  ImageNet-R B0 Inc20
    ROOT/imagenet/{train,val}/<wnid>/                  ImageNet-1K B0 Inc100
    ROOT/vtab/{train,test}/<class>/                    VTAB B0 Inc10 (50 classes)
    ROOT/food101/food-101/{images,meta}                Food-101: zero-shot retention after MG-CLIP on CIFAR-100
The authors' split lists are used when they lie in the folder: imagenet-r/imgr_train_test_split.txt (RAPF's, the
paper's split), imagenet100/train_100.txt and val_100.txt (continuum's). The CLIP weights download on first use as in
any mgclip.py run; offline, they come from the Hugging Face cache (HF_HOME), or: -- --pretrained FILE.

Variants: MG-CLIP, --no-preservation, --no-compensation, zero-shot CLIP (--epochs 0 --no-compensation: the pre-trained
text branch, no training). Seeds: the dataset's default and the next ones (CIFAR-100, VTAB: 42, 43, 44; the others
0, 1, 2; --smoke: 0, 1). Each run is mgclip.py in a subprocess (--smoke: in this process), in OUT/runs/<dataset>-
<variant>-seed<s>: a run with a summary.json is read, never run again, one with a checkpoint.pt continues and a failed
one is retried, so the same command resumes a stopped table. OUT/table.md and OUT/table.json: the paper's Avg / Last
beside the mean +/- sample std over the seeds, their difference, E*, and the time (the runs' seconds_total, summed).
"""
import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

MGCLIP = Path(__file__).resolve().parent.parent / "mgclip.py"
sys.path.insert(0, str(MGCLIP.parent))
import mgclip as M  # noqa: E402

VARIANTS = {"mgclip": ("MG-CLIP", []), "no-preservation": ("without preservation", ["--no-preservation"]),
            "no-compensation": ("without compensation", ["--no-compensation"]),
            "zeroshot": ("zero-shot CLIP", ["--epochs", "0", "--no-compensation"])}
# What paper.py sets in every run: a flag after -- may not change it, or the rows would no longer be the paper's.
OWNED = {"dataset", "data_root", "tasks", "seed", "out", "resume", "epochs", "preservation", "compensation",
         "zeroshot_eval", "zeroshot_root", "device", "workers"}


# A benchmark: row name, --dataset, --tasks, the path under ROOT that shows its data (its first part is --data-root),
# where to put the data, the figures per variant (Avg, Last), the authors' split lists (passed when in its folder).
Bench = namedtuple("Bench", "name dataset tasks found hint figures splits", defaults=[()])
PAPER = [
    Bench("CIFAR-100 B0 Inc10", "cifar100", 10, "cifar100/cifar-100-python", "put torchvision's cifar-100-python/ in",
          {"mgclip": (87.00, 80.57), "zeroshot": (None, 66.7)}),
    Bench("ImageNet-100 B0 Inc10", "imagenet100", 10, "imagenet100/train", "put train/ and val/ (class folders) in",
          {"mgclip": (87.31, 78.38)}, ("train_100.txt", "val_100.txt")),
    Bench("ImageNet-R B0 Inc20", "imagenet-r", 10, "imagenet-r", "put the 200 class folders (or train/, test/) in",
          {"mgclip": (87.58, 82.67)}, ("imgr_train_test_split.txt",)),
    Bench("ImageNet-1K B0 Inc100", "imagenet", 10, "imagenet/train", "put train/ and val/ (class folders) in",
          {"mgclip": (81.88, 73.68)}),
    Bench("VTAB B0 Inc10", "vtab", 5, "vtab/train", "put train/ and test/ (50 class folders) in",
          {"mgclip": (94.67, 91.53)}),
]
# The synthetic demo's numbers for seed 0 on the CPU (mgclip's tests pin the first three): a reference, not the paper.
SMOKE = Bench("synthetic demo", "synthetic", 4, "", "", {
    "mgclip": (46.484375, 32.8125), "no-preservation": (59.244791666666664, 43.4375),
    "no-compensation": (35.15625, 10.0), "zeroshot": (10.416666666666666, 5.0)})
FOOD101 = "food101/food-101"


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, as mgclip.py's are."""

    def error(self, message):
        self.exit(2, f"paper.py: error: {message}; see --help\n")


def parse_args(argv=None):
    """The flags; every mistake (no --root, --out a file, --seeds 0, a bad mgclip flag) is one error line."""
    p = Parser(prog="paper.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="the folder of the benchmarks' data, laid out as above")
    p.add_argument("--out", required=True, help="the table's folder: table.md, table.json and runs/ (a rerun resumes)")
    p.add_argument("--seeds", type=int, help="seeds per row (default: 3; --smoke: 2)")
    p.add_argument("--device", help="mgclip.py --device for every run (default: auto)")
    p.add_argument("--workers", help="mgclip.py --workers, image loader processes per run (default: 4)")
    p.add_argument("--smoke", action="store_true", help="the synthetic demo (tiny random-init CLIP) on the CPU, in "
                   "this process, all four variants; its reference column is seed 0's numbers, not the paper's")
    p.add_argument("flags", nargs="*", metavar="-- FLAGS", help="more mgclip.py flags for every run (after --)")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.smoke and (args.root or args.device):
        p.error(f"--smoke runs the synthetic demo on the CPU; drop {'--root' if args.root else '--device'}")
    if not args.smoke and not args.root:
        p.error("give --root DATA, the folder holding cifar100/, imagenet100/, ... (or --smoke)")
    if args.root and not Path(args.root).is_dir():
        p.error(f"--root {args.root} is not a folder")
    if args.root and not any((Path(args.root) / b.found).exists() for b in PAPER):
        p.error(f"--root {args.root} holds none of {', '.join(b.found + '/' for b in PAPER)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    try:  # mgclip's own checks, once here rather than in every run
        owned = sorted(OWNED & vars(M.build_parser().parse_args(args.flags)).keys())
        M.build_parser().parse_args(["--workers", args.workers] if args.workers else [])
        M.pick_device(args.device or "auto")
    except M.UserError as e:
        p.error(str(e).removesuffix("; see --help"))
    if owned:
        p.error(f"after --: paper.py sets --{owned[0].replace('_', '-')} itself; drop it")
    args.fail = p.error
    return args


def read_json(path: Path):
    """The JSON in path, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def command(args, bench: Bench, variant: str, seed: int, folder: Path) -> list[str]:
    """The mgclip.py flags of one run."""
    argv = ["--dataset", bench.dataset, "--tasks", str(bench.tasks), "--seed", str(seed), "--out", str(folder)]
    argv += VARIANTS[variant][1] + (["--device", "cpu"] if args.smoke else [])
    if args.root:
        data = Path(args.root) / Path(bench.found).parts[0]
        argv += ["--data-root", str(data)]
        if bench.splits and all((data / name).is_file() for name in bench.splits):
            argv += ["--split-file", *(str(data / name) for name in bench.splits)]
    if variant == "mgclip" and bench.dataset == "cifar100" and (Path(args.root) / FOOD101).is_dir():
        argv += ["--zeroshot-eval", "food101", "--zeroshot-root", str(Path(args.root) / "food101")]
    for flag in ("device", "workers"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    return argv + args.flags


def launch(argv: list[str], folder: Path, smoke: bool) -> str:
    """Run mgclip in a subprocess (memory freed, a crash contained), or in this process for the smoke (no torch
    import per run); its last stderr line."""
    if smoke:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                M.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        text = err.getvalue()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "stderr.txt", "a+") as fh:  # every session's stderr is kept; this one's is read
            start = fh.tell()
            code = subprocess.run([sys.executable, str(MGCLIP), *argv], stderr=fh).returncode
            fh.seek(start)
            text = fh.read()
    if code in (130, 143):  # Ctrl-C or SIGTERM reached the run too: stop the table; the run's checkpoint stays
        raise KeyboardInterrupt
    lines = text.strip().splitlines()
    return lines[-1] if lines else f"exit code {code}"


def one_run(args, bench: Bench, variant: str, seed: int) -> dict:
    """Read a finished run's summary.json, or run it (or continue it from its checkpoint.pt) first."""
    folder = Path(args.out) / "runs" / f"{bench.dataset}-{variant}-seed{seed}"
    summary = read_json(folder / "summary.json")
    if summary is None:
        print(f"paper.py: {'continuing' if (folder / 'checkpoint.pt').is_file() else 'running'} {folder}", flush=True)
        error = launch(command(args, bench, variant, seed, folder), folder, args.smoke)
        summary = read_json(folder / "summary.json")
        if summary is None:
            return dict(seed=seed, out=str(folder), status="failed", error=error)
    kept = (summary.get("zeroshot") or {}).get("retained")
    return dict(seed=seed, out=str(folder), status="ok", avg=summary["avg"], last=summary["last"],
                epochs_star=summary["epochs_star"], seconds=summary["seconds_total"],
                zeroshot_kept=None if kept is None else 100 * kept)


def mean_std(values: list[float]) -> tuple:
    """Mean and sample standard deviation (n - 1), None where there are too few values."""
    return statistics.fmean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None


def table_row(bench: Bench, variant: str, runs: list[dict]) -> dict:
    """One row: the figures, the mean +/- std of the seeds that finished, the difference, E*, time and status."""
    done = [r for r in runs if r["status"] == "ok"]
    failed = [f"seed {r['seed']}: {r['error']}" for r in runs if r["status"] != "ok"]
    row = dict(benchmark=bench.name, dataset=bench.dataset, variant=variant)
    for key, figure in zip(("avg", "last"), bench.figures.get(variant, (None, None))):
        mean, std = mean_std([r[key] for r in done])
        row.update({key + "_ref": figure, key + "_mean": mean, key + "_std": std,
                    key + "_diff": None if mean is None or figure is None else mean - figure})
    row["kept_mean"], row["kept_std"] = mean_std([r["zeroshot_kept"] for r in done if r["zeroshot_kept"] is not None])
    row.update(epochs_star=sorted({r["epochs_star"] for r in done}), seconds_sum=sum(r["seconds"] for r in done),
               status="failed: " + "; ".join(failed) if failed else "ok", runs=runs)
    return row


def cell(mean, std=None, sign="") -> str:
    """A number as the table shows it: 87.00, 86.91 ± 0.32, +0.12, or — for none."""
    return "—" if mean is None else f"{mean:{sign}.2f}" + ("" if std is None else f" ± {std:.2f}")


def duration(seconds: float) -> str:
    """Seconds as the table shows them: 12.3 s, 45.6 min, 7.89 h, or — for none."""
    if not seconds:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def markdown(args, rows: list[dict]) -> str:
    """table.md: a line per benchmark and variant (one per benchmark without data), then what the columns are."""
    ref = "reference (seed 0)" if args.smoke else "paper"
    kept = "zero-shot kept %" if args.smoke else "Food-101 kept % (paper 85.7)"
    lines = [f"| benchmark | variant | {ref} Avg / Last | Avg / Last, mean ± std | mean − {ref} | E* | {kept} "
             "| time (sum over seeds) | seeds | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['benchmark']} | | | | | | | | | {r['note']} |")
            continue
        lines.append(f"| {r['benchmark']} | {VARIANTS[r['variant']][0]} | {cell(r['avg_ref'])} / {cell(r['last_ref'])} "
                     f"| {cell(r['avg_mean'], r['avg_std'])} / {cell(r['last_mean'], r['last_std'])} "
                     f"| {cell(r['avg_diff'], sign='+')} / {cell(r['last_diff'], sign='+')} "
                     f"| {', '.join(map(str, r['epochs_star'])) or '—'} | {cell(r['kept_mean'], r['kept_std'])} "
                     f"| {duration(r['seconds_sum'])} | {', '.join(str(run['seed']) for run in r['runs'])} "
                     f"| {r['status'].replace('|', '/')} |")  # an error line's | would split the cell
    notes = ["", "Mean ± sample std (n − 1) over the seeds that finished; time: the runs' seconds_total, summed."]
    if args.smoke:
        notes.append("Reference (seed 0): the synthetic demo's numbers for seed 0 on the CPU, not a paper figure; seed "
                     "0's runs match them exactly. Its CLIP is random-init: zero-shot is chance.")
    else:
        notes.append("Paper: CLIP ViT-B/16 (OpenAI); zero-shot CLIP: Last only. RAPF, for comparison: CIFAR-100 "
                     "86.19 / 79.04, Food-101 kept 17.2%.")
        if not (Path(args.root) / FOOD101).is_dir():
            notes.append(f"Food-101 retention not measured: put torchvision's food-101/ in {args.root}/food101/.")
    return "\n".join(lines + notes) + "\n"


def write_tables(args, rows: list[dict]):
    """OUT/table.md and OUT/table.json: the rows with each run's numbers, and the flags the runs were made with."""
    meta = dict(reference="synthetic demo, seed 0" if args.smoke else "paper", root=args.root, mgclip_flags=args.flags,
                std="sample standard deviation (n - 1)", seconds_sum="the runs' seconds_total, summed over the seeds")
    try:
        (Path(args.out) / "table.md").write_text(markdown(args, rows))
        (Path(args.out) / "table.json").write_text(json.dumps(dict(meta, rows=rows), indent=2))
    except OSError as e:
        args.fail(f"cannot write the table in --out {args.out} ({e.strerror})")


def main(argv=None) -> list[dict]:
    """Every row's runs, the table rewritten after each row (a stopped table shows its finished rows), printed."""
    args = parse_args(argv)
    before = read_json(Path(args.out) / "table.json")
    if before and before.get("mgclip_flags", []) != args.flags:  # its finished runs would be read as made with these
        made = " ".join(["--", *before["mgclip_flags"]]) if before.get("mgclip_flags") else "no flags after --"
        args.fail(f"the runs in --out {args.out} were made with {made}; give the same, or another --out")
    try:
        (Path(args.out) / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        args.fail(f"cannot write to --out {args.out} ({e.strerror})")
    rows = []
    try:
        for bench in [SMOKE] if args.smoke else PAPER:
            if args.root and not (Path(args.root) / bench.found).exists():
                where = Path(args.root) / Path(bench.found).parts[0]
                rows.append(dict(benchmark=bench.name, dataset=bench.dataset, note=f"no data: {bench.hint} {where}/"))
                continue
            first = M.DATASET_DEFAULTS[bench.dataset]["seed"]
            seeds = range(first, first + (args.seeds or (2 if args.smoke else 3)))
            for variant in VARIANTS:
                rows.append(table_row(bench, variant, [one_run(args, bench, variant, seed) for seed in seeds]))
                write_tables(args, rows)
        write_tables(args, rows)
    except KeyboardInterrupt:
        print("paper.py: interrupted; the same command continues the table (finished runs are kept)", file=sys.stderr)
        sys.exit(130)
    print(markdown(args, rows), end="")
    failed = sum(r.get("status", "").startswith("failed") for r in rows)
    if failed:
        sys.exit(f"paper.py: failed runs in {failed} of {len(rows)} rows; {Path(args.out) / 'table.md'} gives their "
                 f"error lines")
    return rows


if __name__ == "__main__":
    main()
