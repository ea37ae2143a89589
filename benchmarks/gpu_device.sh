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
#   python3 -m pip download --no-deps -d .whl py-spy    # for GIL=..., see below
#
# (keep one version of each; pydantic-core must be the one that pydantic pins), then run
# this script through the device tool with `carry: [".whl"]` and a timeout of 590 s:
#
#   bash benchmarks/gpu_device.sh            # GPU tests, the rows (GPU, then CPU), the suite
#   ROWS="sum ties dare" NO_CPU=1 bash benchmarks/gpu_device.sh
#   AGAINST=ab-old ROWS="sum" NO_CPU=1 bash benchmarks/gpu_device.sh   # A/B against old code
#   GIL="sum ties" ROWS=sum NO_CPU=1 bash benchmarks/gpu_device.sh   # + benchmarks/gil.py on the CPU
#   RUN="sum ties cluster_basis" ROWS=sum NO_CPU=1 RESERVE=0 bash benchmarks/gpu_device.sh
#       # + benchmarks/run.py's table on that machine's CPU (--repeat ${REPEAT:-3}), first
#
# (AGAINST: a folder holding another commit's package, made here with `mkdir ab-old && git
# archive COMMIT tvrecipe | tar -x -C ab-old`; untracked, so the device tool copies it.)
#
# It installs the wheels and tvrecipe (no dependencies fetched), runs the tests that need
# CUDA, then `benchmarks/gpu.py --size large` for the rows (every row on the GPU, then on that
# machine's CPU), then the whole suite in the time left, writing the logs under $OUT (they
# come back). Making the large checkpoints is part of the rows' time (about 50 s on 2 cores,
# 16.5 s on the H200 machine). The whole suite took 178 s there on 16 xdist workers: give it
# that (RESERVE=200), or run it in a call of its own.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, tvrecipe; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"
# The tests that skip without CUDA (marked gpu), with a budget of their own.
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests 2>&1 | tee "$OUT/tests.log" \
  | tail -8
# RUN: benchmarks/run.py's rows on this machine's CPU, the issues' ratios on its cores (three
# rows of three rounds, checkpoints made first, took about 160 s on the 16-core H200 machine,
# whose Python started in 2.7-4.5 s).
if [ -n "${RUN:-}" ]; then
  # shellcheck disable=SC2086
  timeout $(( ${LIMIT:-560} - SECONDS )) python3 benchmarks/run.py --size "${SIZE:-large}" \
    --only $RUN --cache off --repeat "${REPEAT:-3}" 2>&1 | tee "$OUT/run.log" | tail -22
fi
# The rows on the GPU, then on this machine's CPU, against the floor of reading onto the GPU.
# No row starts once LIMIT - RESERVE seconds of the script have passed; all ends by LIMIT.
LIMIT=${LIMIT:-560}
left=$(( LIMIT - SECONDS ))
# shellcheck disable=SC2086
timeout "$left" python3 benchmarks/gpu.py --size "${SIZE:-large}" \
  --deadline $(( left - ${RESERVE:-130} )) ${NO_CPU:+--no-cpu} ${ROWS:+--only $ROWS} \
  ${DEVICE_ROWS:+--device-only $DEVICE_ROWS} ${AGAINST:+--against $AGAINST} 2>&1 \
  | tee "$OUT/gpu_rows.log"
# GIL: the seconds each CPU run of these rows holds the GIL on this machine's cores (py-spy).
if [ -n "${GIL:-}" ]; then
  # shellcheck disable=SC2086
  timeout $(( LIMIT - SECONDS )) python3 benchmarks/gil.py --size "${SIZE:-large}" --rounds 1 \
    --only $GIL ${AGAINST:+--against $AGAINST} 2>&1 | tee "$OUT/gil.log"
fi
# The whole suite on a CUDA machine (`device: auto` picks the GPU there), in what time is left.
left=$(( LIMIT - SECONDS ))
if [ "$left" -gt 30 ]; then
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -rf --maxfail=30 -n 16 tests > "$OUT/suite.log" 2>&1
  echo "suite: exit $? after ${left}s budget"; tail -15 "$OUT/suite.log"
fi
