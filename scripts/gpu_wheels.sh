#!/usr/bin/env bash
# Fetches, on a machine with a package index, the wheels scripts/gpu_check.sh installs on a GPU
# machine that has none: for its Python (GPU_PYTHON_VERSION, default 3.12), x86_64 Linux, at the
# lock's versions: bitsandbytes, datasets, trl, pydantic and their dependencies that such an
# image lacks. bitsandbytes' wheel (43 MB, a library for every CUDA release) is rebuilt with its
# CUDA 13 libraries and the CPU one only, so everything stays well under 64 MiB (~15 MB).
#   make gpu-wheels        # into .whl/ (ignored by git; carry it to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_CHECK_WHEELS:-.whl}
PYVER=${GPU_PYTHON_VERSION:-3.12}
LOCK=requirements/lock.txt
PACKAGES=(bitsandbytes datasets trl pydantic pydantic-core annotated-types typing-inspection dill multiprocess)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -Eio "^${name}==[^ ]+" "$LOCK") || { echo "gpu_wheels: $name is not in $LOCK" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "${pins[@]}"
for wheel in "$DEST"/bitsandbytes-*.whl; do
  drop=$(python3 -c 'import sys, zipfile; print("\n".join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if "/libbitsandbytes_" in n and not n.endswith(("_cuda130.so", "_cuda132.so", "_cpu.so"))))' "$wheel")
  if [[ -n "$drop" ]]; then
    python3 - "$wheel" <<'PY'
import sys, zipfile, os
path = sys.argv[1]
keep = ("_cuda130.so", "_cuda132.so", "_cpu.so")
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if "/libbitsandbytes_" in item.filename and not item.filename.endswith(keep):
            continue  # RECORD still lists it: pip installs what the archive holds
        dst.writestr(item, src.read(item.filename))
os.replace(tmp, path)
PY
  fi
done
du -sh "$DEST" >&2
ls "$DEST" >&2
