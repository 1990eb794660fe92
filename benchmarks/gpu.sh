#!/usr/bin/env bash
# The prepared GPU benchmark (benchmarks/README.md, "GPU").
#
#   bash benchmarks/gpu.sh --wheels   # here, with the package index: the
#                                     # packages the device image lacks, into
#                                     # .whl/ (git-ignored; ~4.5 MB)
#   bash benchmarks/gpu.sh [ARGS]     # on the device machine (carry .whl):
#                                     # installs them offline, then
#                                     # benchmarks/gpu.py --out=$OUT [ARGS]
#
# The device image has jax (CUDA), flax, optax, orbax-checkpoint, PyTorch and
# Python 3.12 but not grain (with array-record, portpicker) or
# ml_collections; nothing can be fetched there.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grain==0.2.18 array-record==0.8.6 ml_collections==1.1.0
        portpicker==1.6.0)
if [[ "${1:-}" == "--wheels" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl || {
  echo "error: no wheels in .whl/: run 'bash benchmarks/gpu.sh --wheels' here" \
    "first and name .whl in the device call's carry" >&2; exit 1; }
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_bench}"
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "
import flax, jax, optax, torch
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
"; } >"$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"
python3 benchmarks/gpu.py --out="$OUT" "$@"
