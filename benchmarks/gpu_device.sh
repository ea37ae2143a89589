#!/usr/bin/env bash
# One device-tool call's worth of GPU checks (issues #16 and #17), for a session lent a GPU.
#
# The lent machines hold python3 with a CUDA torch, numpy, safetensors, networkx, click,
# pyyaml, scikit-learn, tqdm, filelock, xxhash, pytest and hypothesis, but not pydantic, and
# they reach no network. So, once, here (in the repo root, on the machine with network):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions
#
# (keep one version of each; pydantic-core must be the one that pydantic pins), then run
# this script through the device tool with `carry: [".whl"]`, e.g. a timeout of 590 s:
#
#   bash benchmarks/gpu_device.sh            # GPU tests, then the GPU rows and the floor
#   ROWS="sum ties dare" bash benchmarks/gpu_device.sh
#
# It installs the wheels and tvrecipe (no dependencies fetched), runs the tests that need
# CUDA, then `benchmarks/gpu.py --size large --no-cpu` for the rows (the CPU rows of this
# 2-core project box are in benchmarks/README.md; rerun them with the CPU rows when time
# allows), writing everything under $OUT (logs come back). Making the large checkpoints is
# part of the run (about 50 s on 2 cores here).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, tvrecipe; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"
# The tests that skip without CUDA (their names say cuda or gpu), with a budget of their own.
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" tests/ops/test_basis.py \
  tests/ops/test_decompose.py tests/ops/test_sparsify.py tests/test_light.py tests/test_lora.py \
  2>&1 | tee "$OUT/tests.log" | tail -8
# The rows on the GPU against the floor of reading onto it.
# shellcheck disable=SC2086
timeout 400 python3 benchmarks/gpu.py --size large --no-cpu ${ROWS:+--only $ROWS} 2>&1 | tee "$OUT/gpu_rows.log"
