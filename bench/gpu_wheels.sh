#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU image (CPython 3.12, x86-64) into .whl/ (ignored by
# git), building deepspeed's (the registry has only its source; DS_BUILD_OPS=0 gives a pure-Python wheel whose
# ops are compiled on first use). Then one pip command installs them on the GPU machine, offline:
#
#   bash bench/gpu_wheels.sh            # about a minute; WHL=.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
mkdir -p "$WHL"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$WHL" -r <(grep -v '^deepspeed==' bench/gpu_wheels.txt)
ds=$(grep '^deepspeed==' bench/gpu_wheels.txt)
if ! ls "$WHL"/deepspeed-"${ds#deepspeed==}"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$ds"
fi
# one version of each: two of the same package stop the offline install
dupes=$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "bench/gpu_wheels.sh: more than one wheel of: $dupes (delete the old ones in $WHL)" >&2; exit 2; }
echo "$(ls "$WHL"/*.whl | wc -l) wheels, $(du -sh "$WHL" | cut -f1) in $WHL"
