#!/usr/bin/env bash
# Pack, here, the MNIST files that benchmarks/gpu_runbook.sh needs on a GPU machine. The data
# folder beside this repository does not travel to that machine and torchvision may not
# download there, so the four files go along gzipped (11 MB instead of 53), in torchvision's
# layout; the runbook's --data DIR unpacks them.
#
#     bash benchmarks/pack_gpu_data.sh [DIR]     # default: .gpu_data/ (ignored by git)
#
# The files are read from NAIVEDIFFUSION_DATA (the package's data root), else ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu_data}"
root="${NAIVEDIFFUSION_DATA:-$(cd .. && pwd)/shared/data}"
files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
for name in $files; do
  if [ ! -f "$root/MNIST/raw/$name" ]; then
    echo "pack_gpu_data.sh: no $root/MNIST/raw/$name; set NAIVEDIFFUSION_DATA to the folder that holds MNIST/raw" >&2
    exit 2
  fi
done
mkdir -p "$dir/MNIST/raw"
for name in $files; do
  gzip -c "$root/MNIST/raw/$name" > "$dir/MNIST/raw/$name.gz.tmp"
  mv "$dir/MNIST/raw/$name.gz.tmp" "$dir/MNIST/raw/$name.gz"
done
echo "MNIST, $(du -sh "$dir" | cut -f1) in $dir"
