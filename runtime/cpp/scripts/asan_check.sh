#!/usr/bin/env bash
# Build runtime/cpp with AddressSanitizer + UBSan and run its ctest suite and the pytest C++ tests
# (token parity and bad-input cases) against that build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$here/build-asan}"
"$here/scripts/make_ort_root.sh" "$build/onnxruntime"
cmake -S "$here" -B "$build" -DONNXRUNTIME_ROOT="$build/onnxruntime" -DCBART_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
cmake --build "$build" -j 2
# ONNX Runtime itself is not instrumented; leak checks would report its process-lifetime allocations.
export ASAN_OPTIONS=detect_leaks=0
(cd "$build" && ctest --output-on-failure)
cd "$here/../.."
CBART_CPP_BUILD="$build" python -m pytest tests/test_cpp_runtime.py -q
