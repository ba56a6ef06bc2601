#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 530 s (RUNBOOK_SECONDS), on a machine that
# has only a copy of this repository and reaches no package registry (the lent GPU machines
# allow 600 s per command).
#
#     bash benchmarks/fetch_gpu_wheels.sh .whl      # beforehand, where pip works
#     bash benchmarks/pack_gpu_data.sh .gpu_data    # beforehand, where the MNIST files are
#     bash benchmarks/gpu_runbook.sh --wheels .whl --data .gpu_data [OUT_DIR]   # on the GPU machine
#     bash benchmarks/gpu_runbook.sh --dry-run [OUT_DIR]   # anywhere: every step at toy size, on the CPU
#
# --data DIR holds MNIST/raw in torchvision's layout, its files gzipped or not; they are
# unpacked into a scratch folder that becomes the package's data root. Without it the data root
# is NAIVEDIFFUSION_DATA, else ../shared/data. Either way the run stops before its first step,
# with exit code 2, when MNIST is not there.
#
# OUT_DIR defaults to $OUT when that is set, else runbook_out/. The run writes at most 8 files
# there:
#   runbook.log         every step's command, output, exit code and time, every skipped step
#                       with the reason, and last "N steps ran, M failed, K skipped"
#   env.txt             GPU, driver, Python, torch, and the wheels installed
#   speed_mnist.json    benchmarks/speed.py: the mnist preset, batch 128, bf16 at compile modes
#                       none and reduce-overhead, at none also with the data on the host and in
#                       NCHW, DDIM-50 of 1,000 images; under "fp32", the fp32 step at compile none
#   speed_cifar10.json  benchmarks/speed.py: ddpm-cifar10 (35.7M), batch 128, bf16, compile none,
#                       ours and diffusers' UNet2DModel, MFU and peak memory
#   pretrained.tar      an MNIST model trained for 75 s of steps at the GPU defaults (the mnist
#                       preset, CUDA graphs), exported by benchmarks/export_pretrained.py
#   targets.json        benchmarks/targets.py: that model and the shipped one (pretrained:mnist)
#                       against the shipped model's targets (smudges, score over 5 draws, bits/dim)
#   nbval.txt           the nbval step's own output: chapters 4-6 with the ci budget
# speed.py rewrites its JSON after each compile mode's rows, so a step stopped at its limit
# still leaves the rows it measured (with "complete": false).
#
# Time. Each step has a share of the budget, set once, in LIMIT below; the shares and RESERVE
# (the seconds spent between the steps) add up to at most the default budget, 530 s
# (tests/test_runbook.py checks it). A step runs under min(its share, what is left of the
# budget) and is killed 5 s after the SIGTERM that ends its time, so a slow step costs the steps
# after it at most those 5 s, and the whole run ends by about 540 s. The most valuable numbers
# come first: the speed of the mnist preset, the CIFAR-10 network beside diffusers', a short
# training run exported, its targets, the chapters. The CIFAR-10 comparison runs without
# torch.compile: cold compiles of the two 35.7M networks took about 130 s, a quarter of the
# budget. The chapters run with the ci budget: the gpu budget is sized for a T4 at about 10
# minutes a chapter, and the cpu budget trains chapter 4 on the CPU (its settings name the
# device), which checks nothing of the GPU, whereas under ci every chapter runs its cells on
# CUDA, chapter 4's tiny training run included, on a few seconds of compute each.
#
# A dry run (--dry-run) checks that every step runs, not how long it takes: at toy size, on the
# CPU, with every share and the default budget 6 times as long.
#
# A failing step is logged and the next one runs. A step that cannot run is skipped, logged
# and counted: one whose share the budget no longer holds, and export and targets when the
# training step left no ema.pt (a run stopped by a signal writes checkpoint.pt only). The exit
# code is the number of steps that failed, ran out of time or were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

# Each step's share of the budget, in seconds, in the order the steps run: set here and nowhere
# else (tests/test_runbook.py checks that every step has one, and that they and RESERVE add up to
# at most default_budget).
default_budget=530
RESERVE=20  # outside the steps: env.txt, unpacking MNIST, merging the fp32 rows, the tar
declare -A LIMIT=(
  [wheels]=30              # pip installs the 40 wheels (24 MB) into a folder, nothing compiled
  [wheels-import]=15       # imports them once
  [speed-mnist-bf16]=110   # 3 eager rows and the sampler, then a cold compile with CUDA graphs
  [speed-cifar10-bf16]=60  # ours and diffusers', eager: two 35.7M networks at batch 128
  [speed-mnist-fp32]=35    # one eager row
  [train-mnist]=115        # --max-minutes 1.25 of steps, then its grids, checkpoint and ema.pt
  [export]=15
  [targets]=60             # two models: bits/dim of 1,000 test images, 5 x 1,000 DDIM-50 samples
  [nbval]=70               # chapters 4-6 with the ci budget: three kernels' start, little compute
)

dry_run=0
wheels=""
data=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheels) wheels="$2"; shift ;;
    --wheels=*) wheels="${1#--wheels=}" ;;
    --data) data="$2"; shift ;;
    --data=*) data="${1#--data=}" ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    -*) echo "gpu_runbook.sh: unknown option $1; use --dry-run, --wheels DIR, --data DIR or an output folder" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
out="${out:-${OUT:-runbook_out}}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/runbook.log"
: > "$log"
scale=1
[ "$dry_run" = 1 ] && scale=6  # a CPU at toy size: the steps run, their time means nothing
budget=${RUNBOOK_SECONDS:-$((default_budget * scale))}
start=$SECONDS
ran=0
failed=0
skipped=0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python=${PYTHON:-python3}
command -v "$python" > /dev/null || python=python
export NAIVEDIFFUSION_DOWNLOAD=0
export NAIVEDIFFUSION_DATA="${NAIVEDIFFUSION_DATA:-$(cd "$repo/.." && pwd)/shared/data}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the package from this copy, installed or not

if [ "$dry_run" = 1 ]; then
  device=cpu; toy="--dry-run"
  train_flags=(--device cpu --model mnist --base-channels 8 --steps 20 --log-every 10 --sample-every 10 --checkpoint-every 10)
else
  device=cuda; toy=""
  # The GPU defaults of `train --dataset mnist`, with CUDA graphs, for 75 s of steps (the
  # compile's included): the step's share holds them and the start, grids and files around them.
  train_flags=(--device cuda --compile reduce-overhead --max-minutes 1.25)
fi

# skip NAME WHY: a step that does not run, logged and counted.
skip() {
  echo "== $1: skipped, $2" | tee -a "$log" "$scratch/$1.log"
  skipped=$((skipped + 1))
}

# step NAME COMMAND...: run COMMAND under min(LIMIT[NAME], what is left), log it all; its own
# part of the log is also kept in $scratch/NAME.log. Returns COMMAND's exit code.
step() {
  local name=$1
  shift
  if [ -z "${LIMIT[$name]:-}" ]; then
    echo "gpu_runbook.sh: step $name has no share in LIMIT" | tee -a "$log" >&2
    exit 2
  fi
  local limit=$((LIMIT[$name] * scale)) left=$((budget - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    skip "$name" "the budget of $budget s is spent"
    return 1
  fi
  local from
  from=$(wc -c < "$log")
  echo "== $name (at most $limit s): $*" | tee -a "$log"
  local t=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local how="exit $rc"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then how="out of time (exit $rc)"; fi
  echo "   $name: $how after $((SECONDS - t)) s" | tee -a "$log"
  tail -c +$((from + 1)) "$log" > "$scratch/$name.log"
  ran=$((ran + 1))
  [ $rc -ne 0 ] && failed=$((failed + 1))
  return $rc
}

# 1. What machine this is; the wheels and the data, checked before any step.
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} > "$out/env.txt" 2>&1
if [ -n "$wheels" ]; then
  if [ ! -d "$wheels" ]; then
    echo "gpu_runbook.sh: wheel folder $wheels does not exist; make it with benchmarks/fetch_gpu_wheels.sh" | tee -a "$log"
    exit 2
  fi
  for needed in nbval ipykernel ipywidgets diffusers; do
    ls "$wheels/$needed"-[0-9]*.whl > /dev/null 2>&1 || { echo "gpu_runbook.sh: no $needed wheel in $wheels; run benchmarks/fetch_gpu_wheels.sh $wheels" | tee -a "$log"; exit 2; }
  done
fi

# MNIST, which every step after the speed tables reads: unpacked from --data, or already in the
# data root. Checked before the first step, so that a missing file costs no GPU time.
mnist_files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
if [ -n "$data" ]; then
  if [ ! -d "$data/MNIST/raw" ]; then
    echo "gpu_runbook.sh: no folder $data/MNIST/raw; make it with benchmarks/pack_gpu_data.sh $data" | tee -a "$log"
    exit 2
  fi
  mkdir -p "$scratch/data/MNIST/raw"
  for name in $mnist_files; do
    if [ -f "$data/MNIST/raw/$name.gz" ]; then
      gzip -dc "$data/MNIST/raw/$name.gz" > "$scratch/data/MNIST/raw/$name"
    elif [ -f "$data/MNIST/raw/$name" ]; then
      cp "$data/MNIST/raw/$name" "$scratch/data/MNIST/raw/$name"
    fi
  done
  export NAIVEDIFFUSION_DATA="$scratch/data"
fi
for name in $mnist_files; do
  if [ ! -s "$NAIVEDIFFUSION_DATA/MNIST/raw/$name" ]; then
    echo "gpu_runbook.sh: no MNIST file $name in ${data:-$NAIVEDIFFUSION_DATA}; pass --data DIR made by benchmarks/pack_gpu_data.sh" | tee -a "$log"
    exit 2
  fi
done
echo "MNIST from ${data:-$NAIVEDIFFUSION_DATA}" >> "$out/env.txt"

# The wheels, installed once MNIST is known to be there.
if [ -z "$wheels" ]; then
  echo "no --wheels: nothing to install; the packages installed here are used" | tee -a "$log"
elif [ "$dry_run" = 1 ]; then
  # Here the packages are installed already; check that pip reads the folder and resolves
  # (wheels-import does not run).
  step wheels "$python" -m pip install --no-index --find-links "$wheels" --dry-run nbval ipykernel ipywidgets diffusers
else
  # Into a folder of their own, put first on the path, as the GPU machine's notes prescribe: its
  # Python's own environment may not be writable. --no-deps, because the folder holds every
  # wheel the packages need that the machine lacks (fetch_gpu_wheels.sh resolved them).
  step wheels "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$scratch/site" "$wheels"/*.whl
  export PYTHONPATH="$scratch/site:$PYTHONPATH"
  step wheels-import "$python" -c "import nbval, ipykernel, ipywidgets, diffusers; print('imported from', diffusers.__file__)"
fi
"$python" -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|diffusers|nbval|ipykernel|ipywidgets) " >> "$out/env.txt"

# 2. Speed: the mnist preset (steps/s at batch 128, bf16 eager and with CUDA graphs, the sampler).
step speed-mnist-bf16 "$python" benchmarks/speed.py $toy --device $device --model mnist --batch-size 128 \
  --precision bf16 --compile none,reduce-overhead --data-on-host --contiguous --no-diffusers --sampling 1000 \
  --json "$out/speed_mnist.json"
# 3. Speed: the paper's network beside diffusers', MFU and memory; eager (see the header).
step speed-cifar10-bf16 "$python" benchmarks/speed.py $toy --device $device --model ddpm-cifar10 \
  --batch-size 128 --precision bf16 --compile none --json "$out/speed_cifar10.json"
# 4. Speed: the mnist preset in fp32, eager.
step speed-mnist-fp32 "$python" benchmarks/speed.py $toy --device $device --model mnist --batch-size 128 \
  --precision fp32 --compile none --no-diffusers --json "$scratch/speed_mnist_fp32.json"
if [ -f "$scratch/speed_mnist_fp32.json" ]; then
  # One file for the mnist preset: the fp32 rows go in beside the bf16 ones (if any), atomically.
  "$python" - "$out/speed_mnist.json" "$scratch/speed_mnist_fp32.json" <<'EOF'
import json, os, sys
path, fp32 = sys.argv[1], json.load(open(sys.argv[2]))
mnist = json.load(open(path)) if os.path.exists(path) else {}
mnist["fp32"] = fp32
with open(path + ".tmp", "w") as f:
    json.dump(mnist, f, indent=1)
os.replace(path + ".tmp", path)
EOF
fi

# 5. The mnist preset trained at the GPU defaults, exported with its provenance.
run_dir="$scratch/runs/mnist"
step train-mnist "$python" -m naivediffusion train --dataset mnist --run-dir "$run_dir" --seed 0 --no-progress "${train_flags[@]}"
if [ -f "$run_dir/ema.pt" ]; then
  gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null)
  mkdir -p "$scratch/pretrained"
  if step export "$python" benchmarks/export_pretrained.py "$run_dir" --name mnist --out-dir "$scratch/pretrained" \
    --command "python -m naivediffusion train --dataset mnist --run-dir runs/mnist --seed 0 ${train_flags[*]}" \
    --hardware "$gpu, torch $("$python" -c 'import torch; print(torch.__version__)')" \
    --note "trained by benchmarks/gpu_runbook.sh$([ "$dry_run" = 1 ] && echo ' --dry-run (toy size, not a model to ship)')"; then
    tar -C "$scratch/pretrained" -cf "$out/pretrained.tar" .
  fi
  # Is it better than the model that ships now? Both, measured the same way in the same run.
  step targets "$python" benchmarks/targets.py $toy --device $device --checkpoint "$run_dir/ema.pt" \
    --checkpoint pretrained:mnist --json "$out/targets.json"
else
  why="train-mnist left no $run_dir/ema.pt (it was skipped, failed or was stopped at its limit)"
  skip export "$why"
  skip targets "$why"
fi

# 6. Chapters 4-6 through nbval, with the ci budget (see the header).
step nbval env NAIVEDIFFUSION_BUDGET=ci MPLBACKEND=Agg \
  "$python" -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env -q \
  notebooks/04_training.ipynb notebooks/05_sampling.ipynb notebooks/06_evaluation.ipynb
# Its own output only: pytest's summary line first, then the last 40 lines (or the line that
# says why it was skipped).
{
  grep -E "passed|failed|error" "$scratch/nbval.log" | tail -1
  tail -40 "$scratch/nbval.log"
} > "$out/nbval.txt"

echo "== done in $((SECONDS - start)) s: $ran steps ran, $failed failed, $skipped skipped; results in $out" | tee -a "$log"
exit $((failed + skipped))
