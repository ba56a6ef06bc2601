#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 9 minutes, on a machine that has only a
# copy of this repository and reaches no package registry.
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
#   runbook.log         every step's command, output, exit code and time
#   env.txt             GPU, driver, Python, torch, and the wheels installed
#   speed_mnist.json    benchmarks/speed.py: the mnist preset, batch 128, bf16 and fp32, compile
#                       modes none and reduce-overhead, data on the device and on the host,
#                       channels_last and NCHW,
#                       DDIM-50 of 1,000 images
#   speed_cifar10.json  benchmarks/speed.py: ddpm-cifar10 (35.7M), batch 128, bf16, ours and
#                       diffusers' UNet2DModel, MFU and peak memory
#   pretrained.tar      the shipped MNIST model trained at the GPU defaults (10,000 steps of the
#                       mnist preset), exported by benchmarks/export_pretrained.py
#   targets.json        benchmarks/targets.py: that model and the shipped one (pretrained:mnist)
#                       against the shipped model's targets (smudges, score over 5 draws, bits/dim)
#   nbval.txt           chapters 4-6 executed through nbval with the gpu budget
#
# The steps run in that order, each under a time limit and under what is left of the whole
# budget (RUNBOOK_SECONDS, default 530), so a slow step cannot cost the steps after it more
# than its own share; a failing step is logged and the next one runs. The exit code is the
# number of steps that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

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
budget=${RUNBOOK_SECONDS:-530}
start=$SECONDS
failed=0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python=${PYTHON:-python3}
command -v "$python" > /dev/null || python=python
export NAIVEDIFFUSION_DOWNLOAD=0
export NAIVEDIFFUSION_DATA="${NAIVEDIFFUSION_DATA:-$(cd "$repo/.." && pwd)/shared/data}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the package from this copy, installed or not

if [ "$dry_run" = 1 ]; then
  device=cpu; toy="--dry-run"; budget_name=ci
  train_flags=(--device cpu --model mnist --base-channels 8 --steps 20 --log-every 10 --sample-every 10 --checkpoint-every 10)
else
  device=cuda; toy=""; budget_name=gpu
  # The GPU defaults of `train --dataset mnist`, with CUDA graphs; at most 2.5 minutes of training.
  train_flags=(--device cuda --compile reduce-overhead --max-minutes 2.5)
fi

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND under min(LIMIT, what is left), log it all.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget of $budget s is spent" | tee -a "$log"
    failed=$((failed + 1))
    return
  fi
  echo "== $name (at most $limit s): $*" | tee -a "$log"
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - t)) s" | tee -a "$log"
  [ $rc -ne 0 ] && failed=$((failed + 1))
}

# 1. What machine this is, and the wheels it lacks.
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
  if [ "$dry_run" = 1 ]; then
    # Here the packages are installed already; check that pip reads the folder and resolves.
    step "wheels (resolve only)" 60 "$python" -m pip install --no-index --find-links "$wheels" --dry-run nbval ipykernel ipywidgets diffusers
  else
    # Into a folder of their own, put first on the path, as the GPU machine's notes prescribe: its
    # Python's own environment may not be writable. --no-deps, because the folder holds every
    # wheel the packages need that the machine lacks (fetch_gpu_wheels.sh resolved them).
    step wheels 90 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$scratch/site" "$wheels"/*.whl
    export PYTHONPATH="$scratch/site:$PYTHONPATH"
    step "wheels import" 60 "$python" -c "import nbval, ipykernel, ipywidgets, diffusers; print('imported from', diffusers.__file__)"
  fi
fi
"$python" -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|diffusers|nbval|ipykernel|ipywidgets) " >> "$out/env.txt"

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

# 2. Speed: the mnist preset (steps/s at batch 128, bf16 against fp32, the sampler).
step "speed mnist bf16" 110 "$python" benchmarks/speed.py $toy --device $device --model mnist --batch-size 128 \
  --precision bf16 --compile none,reduce-overhead --data-on-host --contiguous --no-diffusers --sampling 1000 --json "$out/speed_mnist.json"
step "speed mnist fp32" 70 "$python" benchmarks/speed.py $toy --device $device --model mnist --batch-size 128 \
  --precision fp32 --compile none,reduce-overhead --no-diffusers --json "$scratch/speed_mnist_fp32.json"
# 3. Speed: the paper's network beside diffusers', MFU and memory.
step "speed ddpm-cifar10 bf16" 130 "$python" benchmarks/speed.py $toy --device $device --model ddpm-cifar10 \
  --batch-size 128 --precision bf16 --compile none,reduce-overhead --json "$out/speed_cifar10.json"
if [ -f "$scratch/speed_mnist_fp32.json" ] && [ -f "$out/speed_mnist.json" ]; then
  # One file for the mnist preset: the fp32 rows go in beside the bf16 ones.
  "$python" - "$out/speed_mnist.json" "$scratch/speed_mnist_fp32.json" <<'EOF'
import json, sys
bf16, fp32 = (json.load(open(p)) for p in sys.argv[1:])
bf16["fp32"] = fp32
json.dump(bf16, open(sys.argv[1], "w"), indent=1)
EOF
fi

# 4. The shipped MNIST model at the GPU defaults, exported with its provenance.
run_dir="$scratch/runs/mnist"
step "train mnist" 200 "$python" -m naivediffusion train --dataset mnist --run-dir "$run_dir" --seed 0 --no-progress "${train_flags[@]}"
if [ -f "$run_dir/ema.pt" ]; then
  gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null)
  mkdir -p "$scratch/pretrained"
  step export 30 "$python" benchmarks/export_pretrained.py "$run_dir" --name mnist --out-dir "$scratch/pretrained" \
    --command "python -m naivediffusion train --dataset mnist --run-dir runs/mnist --seed 0 ${train_flags[*]}" \
    --hardware "$gpu, torch $("$python" -c 'import torch; print(torch.__version__)')" \
    --note "trained by benchmarks/gpu_runbook.sh$([ "$dry_run" = 1 ] && echo ' --dry-run (toy size, not a model to ship)')"
  tar -C "$scratch/pretrained" -cf "$out/pretrained.tar" .
  # Is it better than the model that ships now? Both, measured the same way in the same run.
  step targets 120 "$python" benchmarks/targets.py $toy --device $device --checkpoint "$run_dir/ema.pt" \
    --checkpoint pretrained:mnist --json "$out/targets.json"
fi

# 5. Chapters 4-6 with the gpu budget, through nbval (the ci budget in a dry run).
step "nbval chapters 4-6 ($budget_name budget)" 600 env NAIVEDIFFUSION_BUDGET=$budget_name MPLBACKEND=Agg \
  "$python" -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env -q \
  notebooks/04_training.ipynb notebooks/05_sampling.ipynb notebooks/06_evaluation.ipynb
grep -E "passed|failed|error" "$log" | tail -1 > "$out/nbval.txt"
sed -n '/== nbval/,$p' "$log" | tail -40 >> "$out/nbval.txt"

echo "== done in $((SECONDS - start)) s; $failed step(s) failed or ran out of time; results in $out" | tee -a "$log"
exit $failed
