#!/usr/bin/env bash
# The GPU checks of issue 16 in one prepared run (docs/gpu.md): `pytest -m gpu` and the quick benchmark.
#
# The lent GPU machine reaches no package registry. What zsad needs beyond torch travels with the working
# tree as wheels in the git-ignored folder wheels/ (carry it: run(..., carry=["wheels"])):
#
#   benchmarks/gpu_check.sh download        # HERE, with registry access: fill wheels/ (about 10 MB)
#   benchmarks/gpu_check.sh download-all    # also numpy/scipy/scikit-learn/pandas/... (about 150 MB: more
#                                           # than one carry holds; only for a machine that lacks them)
#   benchmarks/gpu_check.sh                 # THERE: install what is missing from wheels/ (pip --no-index),
#                                           # run the gpu tests and the quick benchmark, results under $OUT
#
# Results: $OUT/gpu-env.txt (card, driver, versions), $OUT/gpu-tests.txt and gpu-tests.xml (pytest -m gpu),
# $OUT/bench/bench_gpu.{csv,md} (benchmarks/bench_gpu.py --quick). Budget: the tests take a few minutes on
# one H100 and the quick grid is sized to fit ten minutes; BENCH_TIMEOUT / TEST_TIMEOUT (seconds) cap them.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=wheels
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"

# Runtime imports of zsad beyond torch/torchvision, as pip names (the import name where it differs).
SMALL=(open_clip_torch ftfy wcwidth timm huggingface_hub filelock fsspec safetensors tqdm packaging
  typing_extensions click httpx2 httpcore2 anyio h11 idna truststore)
BINARY=(regex pyyaml hf-xet)
SCIENCE=(numpy scipy scikit-learn joblib threadpoolctl pandas python-dateutil pytz tzdata six pillow
  scikit-image imageio tifffile lazy_loader networkx matplotlib contourpy cycler fonttools kiwisolver
  pyparsing pytest pluggy iniconfig)

# The versions installed here (the tested ones) where the package is installed, else the newest.
pinned() {
  local name version
  for name in "$@"; do
    version=$(pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    echo "$name${version:+==$version}"
  done
}

download() {
  mkdir -p "$WHEELS"
  pip download --dest "$WHEELS" --no-deps --only-binary=:all: $(pinned "${SMALL[@]}") || exit 1
  # Compiled wheels for the Python versions a GPU image may have (the newest each version has).
  for py in 3.10 3.11 3.12 3.13; do
    pip download --dest "$WHEELS" --no-deps --only-binary=:all: --python-version "$py" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "${BINARY[@]}" "$@" || exit 1
  done
  du -sh "$WHEELS"
}

case "${1:-check}" in
  download) download; exit 0 ;;
  download-all) download "${SCIENCE[@]}"; exit 0 ;;
  check) ;;
  *) echo "usage: $0 [download|download-all|check]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
{
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} >"$OUT/gpu-env.txt" 2>&1
cat "$OUT/gpu-env.txt"
"$PY" -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA here: nothing to check" >&2; exit 3; }

# A venv over the machine's own torch (system site packages), zsad and the missing packages from wheels/.
VENV=${VENV:-/tmp/zsad-gpu-venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || exit 1
missing=()
for pair in open_clip_torch:open_clip ftfy:ftfy regex:regex timm:timm huggingface_hub:huggingface_hub \
  safetensors:safetensors tqdm:tqdm pyyaml:yaml numpy:numpy scipy:scipy scikit-learn:sklearn pandas:pandas \
  pillow:PIL scikit-image:skimage matplotlib:matplotlib pytest:pytest; do
  "$VENV/bin/python" -c "import ${pair#*:}" 2>/dev/null || missing+=("${pair%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from $WHEELS/: ${missing[*]}"
  "$VENV/bin/pip" install --no-index --find-links "$WHEELS" "${missing[@]}" || {
    echo "some packages are not in $WHEELS/ (run '$0 download' or 'download-all' where a registry is" \
      "reachable, and carry wheels/)" >&2
    exit 4
  }
fi
"$VENV/bin/pip" install --no-index --no-deps --no-build-isolation -e . >/dev/null || exit 1
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|open.clip|numpy|scipy|scikit|pandas) " \
  >>"$OUT/gpu-env.txt"

export MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2
timeout "${TEST_TIMEOUT:-300}" "$VENV/bin/python" -m pytest -m gpu -p no:randomly -q -rs \
  --junitxml "$OUT/gpu-tests.xml" tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
tests=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-240}" "$VENV/bin/python" benchmarks/bench_gpu.py --quick --out "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
echo "pytest -m gpu exit $tests; bench_gpu --quick exit $bench; results in $OUT"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
