#!/usr/bin/env bash
# Put the wheels that the GPU check carries (benchmarks/gpu_wheels.txt) into .whl/ at the root of
# this checkout, for Python 3.12 on manylinux x86_64 (the lent GPU machine's image), and say how
# much the device call will carry: the working tree that travels plus .whl/, at most 64 MiB.
# Run it in the checkout that makes the device call. Needs pip and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))

git check-ignore -q .whl/ || { echo "gpu_wheels: .whl/ is not git-ignored; it would travel twice" >&2; exit 1; }
rm -rf .whl && mkdir .whl
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu_wheels.txt | grep -v '^$')
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux2010_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wanted[@]}"

# One wheel per requirement, no more: two versions of one package stop the install there.
count=$(find .whl -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#wanted[@]}" ]; then
    echo "gpu_wheels: ${#wanted[@]} requirements but $count wheels in .whl/" >&2
    exit 1
fi
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
ls -l .whl/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 1048576, $NF}'
awk -v w="$wheels" -v t="$tree" 'BEGIN { m = 1048576
    printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a call carries\n", w / m, t / m, (w + t) / m }'
if [ $((wheels + tree)) -gt "$LIMIT" ]; then
    echo "gpu_wheels: over the 64 MiB a device call carries" >&2
    exit 1
fi
