#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a device session: fills .whl/ (git-ignored) with the wheels
# benchmarks/gpu_check.sh installs on the H200, which has no network (Python 3.12, x86_64).
# lark is required (memdsl's parser; the GPU image lacks it); the rest are peers for benchmarks.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
fetch lark
fetch flash-linear-attention fla-core || echo "flash-linear-attention: not fetched (peer rows will say so)"
fetch titans-pytorch assoc-scan axial-positional-embedding einx hyper-connections rotary-embedding-torch \
  x-transformers tensordict || echo "titans-pytorch: not fetched (peer rows will say so)"
ls -la .whl
