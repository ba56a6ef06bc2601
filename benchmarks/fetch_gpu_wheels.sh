#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels that benchmarks/gpu_runbook.sh
# installs on a GPU machine that reaches none: what nbval needs to run the chapters, ipywidgets
# for their widgets and diffusers for the speed comparison, built for that machine's Python
# (3.12, x86-64 Linux). Wheels of packages that machine already has are deleted again, to stay
# well under the 64 MiB that travel with the repository.
#
#     bash benchmarks/fetch_gpu_wheels.sh [DIR]       # default: .whl/ (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
python_version="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p "$dir"
python -m pip download -q --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$dir" nbval ipykernel ipywidgets diffusers
# Installed on the GPU machine (the device library's KINDS.md lists its packages): pip there
# keeps these, so their wheels would only take space.
present="numpy pillow pyyaml regex safetensors huggingface_hub hf_xet requests urllib3 idna certifi
charset_normalizer filelock fsspec tqdm typing_extensions packaging pytest pluggy iniconfig pygments
coverage jinja2 markupsafe psutil attrs six python_dateutil zipp setuptools click rich markdown_it_py
mdurl shellingham typer anyio h11 httpcore httpx sniffio annotated_doc colorama"
for name in $present; do
  rm -f "$dir/$name"-[0-9]*.whl
done
echo "$(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
