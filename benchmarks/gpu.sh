#!/usr/bin/env bash
# ViT-B/16 in fp32, tf32 and bf16 on one NVIDIA GPU, in one call of at most 7.5 minutes, ending in one table
# (issue #19). Made for a GPU machine with no network, whose Python has torch and torchvision but not open_clip.
#
#   bash benchmarks/gpu.sh OUTDIR               # on the GPU machine: OUTDIR must be new or empty
#   bash benchmarks/gpu.sh --cpu-smoke OUTDIR   # the same steps, shrunk to the tiny CLIP on a CPU (~25 s)
#
# It runs, each part under its own `timeout`:
#   1. the wheels in .whl/ (if any) installed into /tmp/site, and OUTDIR/env.json: nvidia-smi, torch, CUDA, open_clip
#   2. benchmarks/speed.py in each precision              -> OUTDIR/speed-P.json
#   3. mgclip.py on a synthetic CIFAR-100-shaped benchmark -> OUTDIR/timing-P/ (1 epoch a task: the phases' images/s)
#   4. the same with the epoch search, smaller             -> OUTDIR/search-P/ (E*, S+ / S- per precision)
#   5. benchmarks/gpu_table.py: the table on stdout and in OUTDIR/table.md, everything in OUTDIR/results.json, the
#      end of every part's log in OUTDIR/logs.txt: where only a few files can be brought back, these three do
# A part that fails or runs out of time is marked so in the table, and the next part runs. Exit status: 0 when
# every part finished, 1 when some did not (the table still has the rest) or when nothing could be measured, 2 for
# a wrong command line; the last stderr line then says why. --cpu-smoke stops timing-bf16 by its time limit after
# its first task, so that the table shows such a run too (its phases from its checkpoint): 0 when that one timed
# out and every other part finished.
#
# A run stopped by its time limit gets TERM, and KILL if it has not ended GPU_SH_GRACE seconds later (default 30:
# loader workers with deep prefetch can take longer than 5 s to go; --cpu-smoke 10). Either way it counts as timed
# out, its finished tasks read from its checkpoint (replaced atomically after each task, so a kill leaves it whole).
#
# Before the call, HERE (a machine with network), fill .whl/ once with the packages the GPU machine lacks, at the
# versions that pass this project's tests (Python 3.12 on x86_64 there; all three are pure-Python wheels):
#   mkdir -p .git/info; echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0
# and name it in the device call: carry [".whl"]. .whl/ is ignored by git: it is never committed.
#
# Sizing (why the runs are smaller than CIFAR-100). ViT-B/16 costs 17.6 G multiply-adds, i.e.
# 35 GFLOP, per 224 px image forward (17.6 "GFLOP" is timm's count, which counts multiply-adds); a LoRA training
# step is ~2.2 forwards (gradients of all activations, plus the q/k/v weight gradient that LoRA's B @ A needs).
# Assumed: 20 TFLOP/s in fp32 (40% of ~50) -> 570 forward and 260 training images/s; tf32 and bf16 3x that
# -> 1700 and 770; 10 s to start each process (imports, CUDA, model) and 0.4 s to start each loader's 8 workers
# (4 loaders a task). CIFAR-100's own 500 training + 100 test images per class in 10 tasks would take ~450 s in
# fp32 alone, so both runs keep CIFAR-100's 100 classes of 32 px images (resized to 224 in the loader workers) and its
# batch sizes, but in 5 tasks of 20 classes and with fewer images (fewer tasks: each loader start serves more
# images, so the phases' images/s are less start-up):
#   part         images (forward / training)                       fp32    tf32, bf16 (each)   slot (fp32, others)
#   speed.py     2 x 6 x 256 / 2 x 6 x 128, fp32 + loader figure   41 s    14 s                50 s, 25 s
#   timing       40 train + 10 test per class, 1 epoch:            53 s    30 s                60 s, 40 s
#                features 8000 (S+ / S- before; after, with the classifier's) + eval 200 x (1+..+5) = 11000 / 4000
#   search       16 train + 8 test per class, --max-epochs 3:      38 s    25 s                50 s, 35 s
#                E* = 1 (probe up to 2 epochs, no retrain): 6240 / 1920;
#                worst, E* = 3 kept: 6560 / 4800                    49 s    29 s
#   install 5 s, env 10 s, table 2 s                                                           15 s, 25 s, 15 s
# Estimated ~285 s in all (~305 s at worst); the slots add up to 415 s. A part may use its own slot and what the
# parts before it left unused, never the slots of the parts after it; a part whose limit would fall under 5 s is
# skipped (shown so in the table). Only the grace goes past a slot: a run stopped at its limit may take 30 s more
# to end, taken from the parts after it, but never from the table, which always gets its own 15 s (and 5 s of grace:
# no loader workers). At most 415 + 30 + 5 = 450 s in all (checked below), and 30 s for the caller's copying.
set -uo pipefail  # no -e: a part that fails is recorded and the script goes on

die() {
    echo "gpu.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: bash benchmarks/gpu.sh [--cpu-smoke] OUTDIR  (OUTDIR new or empty)" >&2
    exit 2
}

smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    smoke=1
    shift
fi
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
# seconds between TERM and KILL for a part stopped at its limit: the runs' (loader workers), and the others' (install,
# env and table: one Python process with no workers, which TERM ends at once)
grace=${GPU_SH_GRACE:-30}
(( smoke )) && grace=${GPU_SH_GRACE:-10}  # killed or not, it counts the same: 10 s bounds what a busy machine adds
[[ $grace =~ ^[1-9][0-9]*$ ]] || die "GPU_SH_GRACE must be a whole number of seconds, 1 or more (not '$grace')"
short_grace=5
out=$(realpath -m -- "$1")
# mgclip.py continues or refuses a run in a folder it has used before: old results would be mixed in
if [[ -e "$out" && -n "$(ls -A -- "$out" 2>/dev/null)" ]]; then
    echo "gpu.sh: $out is not empty; give a new or empty OUTDIR" >&2
    exit 2
fi
mkdir -p -- "$out/logs" || die "cannot create $out"
cd "$(dirname -- "$(realpath -- "$0")")/.." || die "cannot enter the repository"

# python3 from PATH, else python: the GPU machine's own environment. python3 first, since `python` can be a Python 2
# or missing (PEP 394); a virtual environment has both, so with its bin/ first on PATH (as the test puts it) its
# interpreter runs every part. env.json records which one did.
py=python3
command -v python3 >/dev/null 2>&1 || py=python
command -v "$py" >/dev/null 2>&1 || die "neither python3 nor python is on PATH"
command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) is not on PATH"

precisions=(fp32 tf32 bf16)
stopped=""  # the part that --cpu-smoke stops by its time limit after its first task, so that the table shows one
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # no network there; logs written as they happen

if (( smoke )); then
    speed_args=(--model tiny --batch-size 16 --eval-batch-size 32 --device cpu --repeats 1)
    loader_args=(--loader-workers 0 1 --loader-images 16)
    run_args=(--model tiny --syn-classes 10 --device cpu)
    # 5 tasks, as on the GPU: timing-bf16 is stopped after its first (stop_after_first_task), with 4 to spare
    timing_args=(--syn-train 8 --syn-test 4 --tasks 5 --epochs 1)
    stopped=timing-bf16
    search_args=(--syn-train 8 --syn-test 4 --tasks 2 --max-epochs 3)
    # one thread: fast on 2 busy cores, and the same numbers on every run
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # each only a bound for a hung part: a part takes ~6 s, ~40 s with its kind's other two on 2 cores at load 4
    declare -A slot=([env]=90 [table]=90)
    for p in "${precisions[@]}"; do
        slot[speed-$p]=90
        slot[timing-$p]=90
        slot[search-$p]=90
    done
else
    speed_args=(--model ViT-B-16 --batch-size 128 --eval-batch-size 256 --device cuda)
    # the loader figure does not depend on the precision: measured once, in the fp32 part (~20 s on 16 cores)
    loader_args=(--loader-workers 0 2 4 8 16 --loader-images 512)
    run_args=(--model ViT-B-16 --syn-classes 100 --device cuda)
    timing_args=(--syn-train 40 --syn-test 10 --tasks 5 --epochs 1)
    search_args=(--syn-train 16 --syn-test 8 --tasks 5 --max-epochs 3)
    # seconds; the sizing above says where they come from
    declare -A slot=(
        [install]=15 [env]=25 [table]=15
        [speed-fp32]=50 [speed-tf32]=25 [speed-bf16]=25
        [timing-fp32]=60 [timing-tf32]=40 [timing-bf16]=40
        [search-fp32]=50 [search-tf32]=35 [search-bf16]=35
    )
    # 7.5 minutes: the slots, the grace of the last run stopped at its limit, and the table's; 8 with the copying
    total=0
    for name in "${!slot[@]}"; do
        total=$(( total + slot[$name] ))
    done
    (( total + grace + short_grace <= 450 )) \
        || die "the slots (${total} s) and graces (${grace} + ${short_grace} s) are over the 450 s budget: shrink one"
fi
# what every mgclip.py run shares, in both modes (tiny takes --pretrained none too)
run_args+=(--dataset synthetic --pretrained none --syn-size 32 --batch-size 128 --vis-batch-size 64 --workers 8)

# Time in milliseconds since the start (EPOCHREALTIME: bash 5; its separator follows the locale, hence the strip)
[[ -n "${EPOCHREALTIME:-}" ]] || die "needs bash 5 or newer (EPOCHREALTIME)"
now_ms() {
    local us=${EPOCHREALTIME//[!0-9]/}
    echo $(( us / 1000 - start_ms ))
}
start_ms=0
start_ms=$(now_ms)
deadline_ms=0  # when the running part must end: the sum of its slot and all the slots before it

# last_line FILE: its last line that is not blank, cut to 200 characters
last_line() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c 1-200
}

# stop_after_first_task FOLDER PID: --cpu-smoke's run stopped by its time limit. A limit in seconds would stop it in
# whichever task a busy machine had reached, or before its first; instead, as soon as the run in FOLDER has saved its
# first task (metrics.jsonl is written after checkpoint.pt, each at once), PID (its timeout) gets SIGALRM, the signal
# of its own timer: the run is stopped as at its limit (TERM to its processes, exit 124; KILL after the grace, 137),
# in task 2 of 5. The 4 tasks left take ~0.3 s, 15 times the 0.02 s between looks, on an idle machine as on a busy
# one (where both slow down). Succeeds when it sent the signal, fails when the run ended first.
stop_after_first_task() {
    local folder=$1 pid=$2
    while kill -0 "$pid" 2>/dev/null; do  # bash reaps its children at once: kill -0 fails when it has ended
        if [[ -s $folder/metrics.jsonl ]]; then
            kill -ALRM "$pid" 2>/dev/null
            return
        fi
        sleep 0.02
    done
    return 1
}

# part NAME COMMAND...: runs COMMAND under timeout until NAME's deadline, output in logs/NAME.log, one line in
# parts.tsv (name, status, exit code, seconds, limit, command) and one progress line; fails unless it finished
part() {
    local name=$1
    shift
    local begin limit rc ms status kill_after=$grace alarmed=0
    begin=$(now_ms)
    case $name in install | env | table) kill_after=$short_grace ;; esac
    if (( smoke )); then
        limit=${slot[$name]}  # parts run side by side (below): the slot only bounds a hung one
    elif [[ $name == table ]]; then
        limit=${slot[$name]}  # what comes back: never skipped, whatever grace the last run took (sizing, above)
    else
        deadline_ms=$(( deadline_ms + slot[$name] * 1000 ))
        limit=$(( (deadline_ms - begin) / 1000 ))
    fi
    if (( limit < 5 )); then
        printf '%s\tskipped (no time left)\t\t0\t%s\t%s\n' "$name" "$limit" "$*" >>"$out/parts.tsv"
        printf '[%4d s] %-12s skipped (no time left)\n' $(( begin / 1000 )) "$name"
        return 1
    fi
    # timeout signals the whole process group, so loader workers go too; KILL (timeout's group, itself included)
    # kill_after seconds later if TERM did not end them
    if [[ $name == "$stopped" ]]; then
        timeout --kill-after="$kill_after" "$limit" "$@" </dev/null >"$out/logs/$name.log" 2>&1 &
        local pid=$!
        stop_after_first_task "$out/$name" "$pid" && alarmed=1
        wait "$pid"
    else
        timeout --kill-after="$kill_after" "$limit" "$@" </dev/null >"$out/logs/$name.log" 2>&1
    fi
    rc=$?
    ms=$(( $(now_ms) - begin ))
    if (( rc == 0 )); then
        status=ok
    # Stopped by its time limit: ended after timeout's TERM, 124 (timeout's own: none of these commands exits 124);
    # still running after the grace and KILLed, 137 (timeout killed with it); 143 (TERM) should timeout itself end so.
    # 137 and 143 are also a kill from elsewhere (the kernel's, out of memory), so they are a time limit only once
    # the limit has passed, or gpu.sh's own stop (--cpu-smoke) sent timeout its ALRM
    elif (( rc == 124 || ((rc == 137 || rc == 143) && (alarmed || ms >= limit * 1000)) )); then
        status="timed out"
    else
        status="failed (exit $rc)"
    fi
    printf '%s\t%s\t%s\t%d.%d\t%s\t%s\n' "$name" "$status" "$rc" $(( ms / 1000 )) $(( ms % 1000 / 100 )) \
        "$limit" "$*" >>"$out/parts.tsv"
    printf '[%4d s] %-12s %s in %d s (limit %d s)\n' $(( begin / 1000 )) "$name" "$status" $(( ms / 1000 )) "$limit"
    if [[ $status != ok ]]; then
        # the reason, as the part's own last line (mgclip.py and speed.py end a failure with one line)
        echo "         $(last_line "$out/logs/$name.log")"
        return 1
    fi
}

if (( smoke )); then
    echo "gpu.sh: CPU smoke test, tiny CLIP -> $out"
else
    echo "gpu.sh: ViT-B-16 on CUDA -> $out"
fi

# 1. The missing packages, from the wheels carried along; not in the smoke test, which tests this environment
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ! smoke && ${#wheels[@]} > 0 )); then
    part install "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check \
        --target /tmp/site "${wheels[@]}" \
        || die "the wheels in .whl/ did not install: $(last_line "$out/logs/install.log")"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
require=()
(( smoke )) || require=(--require-cuda)
part env "$py" benchmarks/gpu_table.py env "$out" "${require[@]}" \
    || die "$(last_line "$out/logs/env.log")"

# measure KIND P: one part of steps 2-4
measure() {
    local kind=$1 p=$2
    case $kind in
        speed)
            local loader=(--loader-workers)  # none: no loader figure
            [[ $p == fp32 ]] && loader=("${loader_args[@]}")
            part "speed-$p" "$py" benchmarks/speed.py "${speed_args[@]}" "${loader[@]}" --precision "$p" \
                --out "$out/speed-$p.json"
            ;;
        timing)
            part "timing-$p" "$py" mgclip.py "${run_args[@]}" "${timing_args[@]}" --precision "$p" \
                --out "$out/timing-$p"
            ;;
        search)
            part "search-$p" "$py" mgclip.py "${run_args[@]}" "${search_args[@]}" --precision "$p" \
                --out "$out/search-$p"
            ;;
    esac
}

# 2-4. By kind, so that every precision has its speed.py figures before the long runs start. One at a time on the
# GPU, or they would time each other; the smoke test runs a kind's three side by side, since each process spends
# ~4 s importing torch on one core and the test checks the script, not the speed (~25 s instead of ~45 s on 2 cores).
for kind in speed timing search; do
    for p in "${precisions[@]}"; do
        if (( smoke )); then
            measure "$kind" "$p" &
        else
            measure "$kind" "$p"
        fi
    done
    wait
done

# 5. The table, and the logs' ends in one file
for log in "$out"/logs/*.log; do
    echo "===== $(basename "$log")"
    tail -n 60 "$log"
done >"$out/logs.txt"
part table "$py" benchmarks/gpu_table.py table "$out" || die "no table: $(last_line "$out/logs/table.log")"
echo
cat "$out/table.md"

# every part finished; but --cpu-smoke's stopped one timed out, or the table did not show a stopped run
unfinished=$(awk -F '\t' -v stopped="$stopped" '$2 != ($1 == stopped ? "timed out" : "ok") {
    printf "%s%s %s%s", sep, $1, $2, ($1 == stopped ? ", not stopped after its first task" : ""); sep = ", "
}' "$out/parts.tsv")
[[ -z "$unfinished" ]] || die "not every part finished ($unfinished); the table has the rest: $out/table.md"
echo "gpu.sh: done in $(( $(now_ms) / 1000 )) s: $out/table.md, $out/results.json"
