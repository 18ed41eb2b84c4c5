#!/usr/bin/env bash
# Assemble an ONNX Runtime release layout (include/, lib/) for building runtime/cpp here:
# the shared library from the installed `onnxruntime` wheel and the C/C++ API headers from the npm
# package com.github.asus4.onnxruntime (ORT 1.29 headers, MIT). The C API is versioned, so these
# headers work with the newer library. Real users point ONNXRUNTIME_ROOT at an official release instead.
set -euo pipefail
out="${1:?usage: make_ort_root.sh OUT_DIR}"
python_bin="${PYTHON:-python}"
capi="$("$python_bin" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
mkdir -p "$out/include" "$out/lib"
cp "$capi"/libonnxruntime.so.* "$out/lib/"
if [ ! -f "$out/include/onnxruntime_cxx_api.h" ]; then
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent com.github.asus4.onnxruntime@0.4.9 >/dev/null && tar xzf ./*.tgz)
  cp "$work"/package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/*.h "$out/include/"
  rm -rf "$work"
fi
echo "ONNX Runtime root: $out"
