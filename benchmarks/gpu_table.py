"""The environment record and the one table of benchmarks/gpu.sh (issue #19): ViT-B/16 in fp32, tf32 and bf16.

    python benchmarks/gpu_table.py env OUTDIR [--require-cuda]   # OUTDIR/env.json: GPU, driver, torch, CUDA
    python benchmarks/gpu_table.py table OUTDIR                  # the table: stdout, table.md, results.json

`table` reads what gpu.sh left in OUTDIR: parts.tsv (each part's status, seconds and command), env.json,
speed-P.json (benchmarks/speed.py) and the mgclip.py runs timing-P/ and search-P/. A run stopped by its time
limit (ended at TERM, or KILLed after gpu.sh's grace: timed out either way) has no summary.json: its finished tasks
are read from checkpoint.pt instead (replaced atomically, so whole after a kill; metrics.jsonl, without the phases,
where torch does not import), and its status says how many it finished.
Throughputs, times and memory are compared with fp32 as ratios; accuracy, S+ / S- and E* as differences.
"""
import argparse
import json
import pickle
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PRECISIONS = ("fp32", "tf32", "bf16")
RUNS = ("timing", "search")
# mgclip.py's clock: train (every fine-tuning epoch, the search's probe included), features (the passes over a task's
# training images: S+ / S- before and after, the classifier's features), eval, zeroshot (--zeroshot-eval only)
PHASES = ("train", "features", "eval", "zeroshot")
SPEED = [("bare_train", "bare image tower, training, images/s"), ("train", "MG-CLIP training step, images/s"),
         ("bare_eval", "bare image tower, evaluation, images/s"), ("eval", "MG-CLIP evaluation, images/s")]


def fail(message: str):
    """One line on stderr and exit 1: gpu.sh shows a failed part's last line."""
    print(f"gpu_table.py: {message}", file=sys.stderr)
    sys.exit(1)


def read_json(path: Path):
    """The JSON in path, or None when it is missing or cut short (a killed writer)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- env.json
def record_env(out: Path, require_cuda: bool):
    """What the numbers were measured on. Written before any check fails, so a failed start is recorded too."""
    # the interpreter too: gpu.sh runs the first python3 (else python) on PATH, and that is the one measured
    env = dict(python=platform.python_version(), executable=sys.executable, machine=platform.machine())
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv"], capture_output=True,
                                  text=True, timeout=20)
            env["nvidia_smi"] = (done.stdout or done.stderr).strip()
        except subprocess.TimeoutExpired:
            env["nvidia_smi"] = "nvidia-smi did not answer in 20 s"
    else:
        env["nvidia_smi"] = "nvidia-smi not found"
    problem = None
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cuda_available=torch.cuda.is_available())
        if env["cuda_available"]:
            major, minor = torch.cuda.get_device_capability(0)
            env.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}")
        elif require_cuda:
            problem = (f"torch {torch.__version__} sees no CUDA device; run this on the GPU machine, or test the "
                       f"script with --cpu-smoke")
        import open_clip  # imports ftfy (and so wcwidth) too: the three packages .whl/ carries
        env.update(open_clip=open_clip.__version__, open_clip_from=str(Path(open_clip.__file__).parent))
    except ImportError as e:
        problem = (f"{e.name or e} does not import; install requirements.txt, or on the GPU machine carry its wheels "
                   f"in .whl/ (benchmarks/gpu.sh says how)")
    (out / "env.json").write_text(json.dumps(env, indent=2))
    print(json.dumps(env, indent=2))
    if problem:
        fail(problem)


# ------------------------------------------------------------------------------------------------- the results
def read_parts(out: Path) -> dict:
    """gpu.sh's parts.tsv: name -> status, exit code, seconds, limit and command."""
    parts = {}
    path = out / "parts.tsv"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        name, status, rc, seconds, limit, command = (line.split("\t", 5) + [""] * 6)[:6]
        parts[name] = dict(status=status, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                           seconds=float(seconds or 0), limit=int(limit or 0), command=command)
    return parts


def read_checkpoint(path: Path) -> dict | None:
    """mgclip.py's checkpoint.pt, or None: there is none, torch does not import here, or it is cut short (mgclip.py
    replaces it atomically, but a copy brought back from the GPU machine can break off)."""
    if not path.is_file():
        return None
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # what torch.load raises on a cut file
        print(f"gpu_table.py: {path} is unreadable ({type(e).__name__}); its run is read from metrics.jsonl",
              file=sys.stderr)
        return None


def read_run(folder: Path) -> dict | None:
    """An mgclip.py run's summary.json; or, for a run stopped before its end, the same keys from its finished tasks,
    with partial = tasks done: from checkpoint.pt, with the phases and times, or from metrics.jsonl without them
    (no torch here, or the checkpoint cut short)."""
    summary = read_json(folder / "summary.json")
    if summary is not None:
        for bulky in ("classnames", "class_order"):  # 100 names each, no use in a timing table
            summary.pop(bulky, None)
        return summary
    state = read_checkpoint(folder / "checkpoint.pt")
    path = folder / "metrics.jsonl"
    if state is not None:  # the checkpoint first: metrics.jsonl is written after it, and rewritten from it on resume
        rows = state["rows"]
    elif path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = []
    if not rows:
        return None
    acc = [row["acc"] for row in rows]
    run = dict(partial=len(rows), epochs_star=rows[-1]["epochs"], avg=sum(acc) / len(acc), last=acc[-1], acc=acc,
               gap=[dict(task=row["task"], before=row["gap_before"], after=row["gap_after"]) for row in rows],
               seconds_per_task=[row["seconds"] for row in rows])
    if state is not None:  # as summary.json has them, up to the last finished task
        run["phases"] = {phase: dict(seconds=round(s, 3), images_per_second=round(n / s, 1) if s else None)
                         for phase, (s, n) in state["clock"].items()}
        run["seconds_total"] = round(state["wall_seconds"], 3)
    return run


def collect(out: Path) -> dict:
    """Everything the table shows, as results.json keeps it."""
    return dict(env=read_json(out / "env.json") or {}, parts=read_parts(out),
                speed={p: read_json(out / f"speed-{p}.json") for p in PRECISIONS},
                **{kind: {p: read_run(out / f"{kind}-{p}") for p in PRECISIONS} for kind in RUNS})


# --------------------------------------------------------------------------------------------------- the table
def number(value, digits: int) -> str:
    """A cell: the value rounded, thousands separated; '–' for nothing."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def compared(value, base, how: str, digits: int) -> str:
    """A difference column's cell: value / base ('ratio') or value - base ('diff')."""
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return ""
    if how == "ratio":
        return f"×{value / base:.2f}" if base else ""
    return f"{value - base:+.{digits}f}"


def row(label: str, values: list, digits: int = 1, how: str = "") -> str:
    """One table line: the label, a cell per precision, then tf32 and bf16 against fp32 (how: ratio, diff or '')."""
    cells = [number(v, digits) for v in values]
    versus = [compared(v, values[0], how, digits) if how else "" for v in values[1:]]
    return "| " + " | ".join([label] + cells + versus) + " |"


def status(part: dict | None, run: dict | None = None) -> str:
    """How a part ended: 'ok', 'timed out (3/5 tasks)', 'failed (exit 1)', 'skipped (no time left)', 'not run'."""
    if part is None:
        return "not run"
    text = part["status"]
    if run and run.get("partial"):
        text += f" ({run['partial']}/{flag(part, '--tasks')} tasks)"
    return text


def wall(part: dict | None) -> float | None:
    """A part's seconds, start to end; None if it never started."""
    return part["seconds"] if part and not part["status"].startswith("skipped") else None


def flag(part: dict | None, name: str) -> str:
    """The value of a flag in a part's command ('?' if it is not there), to say what a run was."""
    words = part["command"].split() if part else []
    return words[words.index(name) + 1] if name in words[:-1] else "?"


def gap_value(run: dict | None, which: int, when: str, key: str):
    """S+ or S- (key) of the run's first (which=0) or last (-1) task, before or after its training."""
    if not run or not run.get("gap"):
        return None
    return (run["gap"][which].get(when) or {}).get(key)


def gap_row(label: str, pairs: list) -> str:
    """A row of (before, after) pairs, 'before → after' in each cell, and the two differences from fp32's."""
    cells = [f"{number(b, 3)} → {number(a, 3)}" if (b, a) != (None, None) else "–" for b, a in pairs]
    versus = [f"{compared(b, pairs[0][0], 'diff', 3) or '–'} → {compared(a, pairs[0][1], 'diff', 3) or '–'}"
              if (b, a) != (None, None) else "" for b, a in pairs[1:]]
    return "| " + " | ".join([label] + cells + versus) + " |"


def run_rows(kind: str, results: dict) -> list[str]:
    """A section for the mgclip.py runs of one kind: wall time, images/s per phase, memory, E*, S+ / S-, Avg / Last."""
    runs = [results[kind][p] for p in PRECISIONS]
    parts = [results["parts"].get(f"{kind}-{p}") for p in PRECISIONS]
    part = next((each for each in parts if each), None)
    epochs = flag(part, "--epochs")
    epochs = (f"{epochs} epoch{'' if epochs == '1' else 's'} a task" if kind == "timing"
              else f"E* searched over up to {flag(part, '--max-epochs')} epochs")
    title = (f"mgclip.py, {flag(part, '--model')}, {flag(part, '--syn-classes')} classes in {flag(part, '--tasks')} "
             f"tasks, {flag(part, '--syn-train')} training + {flag(part, '--syn-test')} test images a class, {epochs}")
    lines = [row(f"**{title}**", ["", "", ""]),
             row("status", [status(part, run) for part, run in zip(parts, runs)]),
             row("wall time, s (the process, start-up included)", [wall(part) for part in parts], 1, "ratio"),
             row("mgclip.py's run, s (seconds_total: imports not included)",
                 [r.get("seconds_total") if r else None for r in runs], 1, "ratio")]
    phases = [(r or {}).get("phases") or {} for r in runs]
    found = [phase for each in phases for phase in each]
    # mgclip.py's phases in the order of a task, then any this script does not know of yet
    for phase in [p for p in PHASES if p in found] + [p for p in dict.fromkeys(found) if p not in PHASES]:
        values = [(each.get(phase) or {}).get("images_per_second") for each in phases]
        lines.append(row(f"{phase}, images/s", values, 0, "ratio"))
    lines.append(row("peak GPU memory, GiB", [r.get("peak_gpu_memory_gib") if r else None for r in runs], 2, "ratio"))
    lines.append(row("E* (epochs per task)", [r.get("epochs_star") if r else None for r in runs], 0, "diff"))
    tasks = [f"task {r['gap'][-1]['task']}" for r in runs if r and r.get("gap")]
    last = tasks[0] if tasks and len(set(tasks)) == 1 else "last task"
    for which, name in ((0, "task 1"), (-1, last)):
        for key, symbol in (("s_plus", "S+"), ("s_minus", "S-")):
            lines.append(gap_row(f"{symbol} {name}, initial CLIP → trained",
                                 [(gap_value(r, which, "before", key), gap_value(r, which, "after", key))
                                  for r in runs]))
    lines.append(row("Avg accuracy, %", [r.get("avg") if r else None for r in runs], 2, "diff"))
    lines.append(row("Last accuracy, %", [r.get("last") if r else None for r in runs], 2, "diff"))
    return lines


def speed_rows(results: dict) -> list[str]:
    """The speed.py section: images/s of the bare tower and of MG-CLIP, memory, and the loader if it measured one."""
    speeds = [results["speed"][p] or {} for p in PRECISIONS]
    parts = [results["parts"].get(f"speed-{p}") for p in PRECISIONS]
    known = next((s for s in speeds if s), {})
    batches = f"batch {known.get('batch_size', '?')} (training) / {known.get('eval_batch_size', '?')} (evaluation)"
    lines = [row(f"**speed.py, {known.get('model', '?')}, {batches}**", ["", "", ""]),
             row("status", [status(part) for part in parts]),
             row("wall time, s (the process, start-up included)", [wall(part) for part in parts], 1, "ratio")]
    lines += [row(label, [s.get(key) for s in speeds], 0, "ratio") for key, label in SPEED]
    lines.append(row("peak GPU memory, GiB", [s.get("peak_gpu_memory_gib") for s in speeds], 2, "ratio"))
    # speed.py may time the loader too: one row per source and worker count
    loaders = []
    for s in speeds:
        for entry in s.get("loader") or []:
            if (entry.get("source"), entry.get("workers")) not in loaders:
                loaders.append((entry.get("source"), entry.get("workers")))
    for source, workers in loaders:
        values = [next((e.get("images_per_second") for e in s.get("loader") or []
                        if (e.get("source"), e.get("workers")) == (source, workers)), None) for s in speeds]
        lines.append(row(f"loader, {source}, {workers} workers, images/s", values, 0, "ratio"))
    return lines


def environment(env: dict) -> str:
    """One line: the GPU and driver (nvidia-smi), torch, CUDA, cuDNN, Python, open_clip."""
    smi = env.get("nvidia_smi", "")
    smi_rows = smi.splitlines()[1:] if smi.startswith("name") else [smi]  # the CSV header line goes
    gpu = "; ".join(line.strip() for line in smi_rows if line.strip()) or "–"
    return (f"GPU (name, driver): {gpu}; torch {env.get('torch', '?')}, CUDA {env.get('cuda') or 'none'}, "
            f"cuDNN {env.get('cudnn') or 'none'}; Python {env.get('python', '?')}; "
            f"open_clip {env.get('open_clip', '?')}")


def commands(results: dict) -> list[str]:
    """The fp32 command of each kind of part, to say what was run (the others differ in --precision and --out)."""
    lines = []
    for kind in ("speed", *RUNS):
        part = results["parts"].get(f"{kind}-fp32")
        if part:
            lines.append(f"- {kind}: `{part['command']}`")
    return lines


def table(results: dict) -> str:
    """The markdown: one table, then the environment and the commands."""
    header = ["| | " + " | ".join(PRECISIONS) + " | tf32 vs fp32 | bf16 vs fp32 |",
              "|---|" + "---:|" * (len(PRECISIONS) + 2)]
    body = speed_rows(results) + run_rows("timing", results) + run_rows("search", results)
    notes = ["", environment(results["env"]), "",
             "Ratios: the precision's figure over fp32's; differences: the precision's minus fp32's. S+ / S-: the "
             "logit-scaled cosines of matching / non-matching image-prompt pairs on the task's training images "
             "(random-init CLIP). A run cut off by its time limit shows its finished tasks (k/T), its times and "
             "phases up to the last of them (from its checkpoint.pt), and no memory.", "",
             "Commands (fp32; the others differ in --precision and --out):", *commands(results)]
    return "\n".join(header + body + notes) + "\n"


def write_table(out: Path):
    """Prints the table and writes table.md and results.json."""
    if not out.is_dir():
        fail(f"{out} is not a folder")
    results = collect(out)
    text = table(results)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(text, end="")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["env", "table"], help="env: record the environment; table: the table")
    p.add_argument("outdir", type=Path, help="gpu.sh's OUTDIR")
    p.add_argument("--require-cuda", action="store_true", help="env: fail unless torch sees a CUDA device")
    args = p.parse_args(argv)
    if args.what == "env":
        record_env(args.outdir, args.require_cuda)
    else:
        write_table(args.outdir)


if __name__ == "__main__":
    main()
