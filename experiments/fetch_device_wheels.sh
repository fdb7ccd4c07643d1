#!/usr/bin/env bash
# Fetch, on a CPU machine with PyPI, the wheels the GPU device run needs (docs/gpu_device_run.md) into
# .whl/ at the repository root. .whl/ is ignored through .git/info/exclude (never committed) and travels
# to the device machine with `carry: [".whl"]`, where the run installs it with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
# The device image (Python 3.12, jax 0.11.2 + CUDA 13 plugin, torch 2.11, triton 3.6, einops, packaging,
# transformers, ...) lacks only flash-linear-attention's kernels: the `fla-core` wheel (pure Python,
# package `fla`; `fla.ops.*` are the Triton chunk kernels the benchmark compares with). The
# `flash-linear-attention` distribution adds layers and models (and needs transformers) that the run
# does not use, so it is not fetched. Each wheel's Requires-Dist (extras left out) is checked against
# the device image's package list below; a requirement it lacks is fetched too (again with --no-deps).
#
#   bash experiments/fetch_device_wheels.sh             # FLA_VERSION=0.6.0 by default
#   FLA_VERSION=0.5.1 bash experiments/fetch_device_wheels.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
FLA_VERSION=${FLA_VERSION:-0.6.0}
LIMIT_MIB=64  # everything a device call carries: the working tree plus carried paths

mkdir -p "$DEST" .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

PLATFORM_FLAGS=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# The device image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17), normalized names.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

fetched=()
queue=("fla-core==$FLA_VERSION")
while [ ${#queue[@]} -gt 0 ]; do
  spec=${queue[0]}
  queue=("${queue[@]:1}")
  echo "fetching $spec"
  if ! log=$("$PY" -m pip download -q --no-deps "${PLATFORM_FLAGS[@]}" -d "$DEST" "$spec" 2>&1); then
    echo "$log" >&2
    echo "pip could not download $spec" >&2
    exit 1
  fi
  echo "$log" | grep -v -e "is ignored: it is neither" -e '^$' || true
  name=$(echo "$spec" | sed -E 's/[<>=!~ ;\[].*//' | tr 'A-Z_.' 'a-z--')
  wheel=$(ls -t "$DEST"/*.whl | while read -r w; do
    n=$(basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--'); [ "$n" = "$name" ] && echo "$w" && break; done)
  [ -n "$wheel" ] || { echo "no wheel for $spec in $DEST" >&2; exit 1; }
  fetched+=("$wheel")
  # Requires-Dist without an `extra ==` marker: what the wheel needs at run time.
  while read -r req; do
    [ -n "$req" ] || continue
    rname=$(echo "$req" | sed -E 's/[<>=!~ ;\[(].*//' | tr 'A-Z_.' 'a-z--')
    if echo " $DEVICE_HAS " | tr '\n' ' ' | grep -q " $rname "; then
      echo "  needs $req: in the device image"
    else
      echo "  needs $req: NOT in the device image, fetching it too"
      queue+=("$(echo "$req" | sed -E 's/ *;.*//')")
    fi
  done < <(unzip -p "$wheel" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra *==' || true)
done

# Only one version of each distribution may lie in .whl (two stop the whole install): once the new one
# is here, drop other versions of what this script fetched; leave anyone else's wheels alone.
for w in "${fetched[@]}"; do
  dist=$(basename "$w" | cut -d- -f1)
  for old in "$DEST/$dist"-*.whl; do
    [ "$old" = "$w" ] || { echo "removing $old"; rm -f "$old"; }
  done
done

echo
echo "wheels fetched for the device run:"
for w in "${fetched[@]}"; do printf '  %8d bytes  %s\n' "$(stat -c %s "$w")" "$w"; done
whl_bytes=$(cat "$DEST"/*.whl | wc -c)
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "all of $DEST: $(ls "$DEST"/*.whl | wc -l) wheel(s), $((whl_bytes / 1024)) KiB"
echo "working tree that travels (tracked + untracked, not ignored): $((tree_bytes / 1024)) KiB"
total=$((whl_bytes + tree_bytes))
echo "together: $((total / 1024 / 1024)) MiB of the ${LIMIT_MIB} MiB a device call may carry"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "TOO LARGE for one device call" >&2
  exit 1
fi
