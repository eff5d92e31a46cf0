#!/usr/bin/env bash
# Build the calm-edge C++ runtime from scratch: runtime/cpp/build.sh [BUILD_DIR]
#
# 1. the build tools and libraries from the system's package manager (only when run as root and
#    something is missing): cmake, g++, pkg-config, SentencePiece, PCRE2, nlohmann-json, OpenSSL;
# 2. ONNX Runtime: with ONNXRUNTIME_ROOT set, that install is used as it is. Otherwise an install
#    folder is assembled in BUILD_DIR from Debian trixie's libonnxruntime-dev headers and the
#    libonnxruntime.so.1.* that the onnxruntime Python wheel ships (ONNX Runtime's C API is
#    backward compatible, so the 1.21 headers work with the wheel's newer library);
# 3. cmake configure and build: library, calm-edge-generate, the README example, the tests.
#
# PYTHON picks the interpreter whose onnxruntime wheel is linked (default: python3).
set -euo pipefail

source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_dir=$(realpath -m "${1:-$source_dir/build}")
python=${PYTHON:-python3}
mkdir -p "$build_dir"

install_system_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v g++ >/dev/null || missing+=(g++)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    pkg-config --exists sentencepiece 2>/dev/null || missing+=(libsentencepiece-dev)
    pkg-config --exists libpcre2-8 2>/dev/null || missing+=(libpcre2-dev)
    [ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
    [ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "error: missing ${missing[*]}; install them with your package manager (Debian/Ubuntu:" \
             "sudo apt-get install ${missing[*]}) and run $0 again" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# An ONNXRUNTIME_ROOT layout (include/, lib/) from the Debian headers and the wheel's library.
assemble_onnxruntime() {
    local root="$build_dir/onnxruntime"
    "$source_dir/scripts/fetch_onnxruntime_headers.sh" "$build_dir"
    local wheel_dir
    if ! wheel_dir=$("$python" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"); then
        echo "error: $python cannot import onnxruntime; pip install onnxruntime (or set PYTHON, or" \
             "set ONNXRUNTIME_ROOT to an ONNX Runtime install)" >&2
        exit 1
    fi
    local library
    library=$(ls "$wheel_dir"/libonnxruntime.so.1.* 2>/dev/null | head -n 1)
    if [ -z "$library" ]; then
        echo "error: no libonnxruntime.so.1.* in $wheel_dir; reinstall the onnxruntime wheel or set ONNXRUNTIME_ROOT" >&2
        exit 1
    fi
    mkdir -p "$root/lib"
    ln -sfn "$build_dir/onnxruntime-headers/usr/include/onnxruntime" "$root/include"
    # The soname link that the loader looks for, and the plain name that the linker looks for.
    ln -sf "$library" "$root/lib/libonnxruntime.so.1"
    ln -sf "$library" "$root/lib/libonnxruntime.so"
    echo "$root"
}

install_system_packages
if [ -z "${ONNXRUNTIME_ROOT:-}" ]; then
    ONNXRUNTIME_ROOT=$(assemble_onnxruntime | tail -n 1)
fi
cmake -S "$source_dir" -B "$build_dir/cmake" -DONNXRUNTIME_ROOT="$ONNXRUNTIME_ROOT" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir/cmake" --parallel "${BUILD_JOBS:-2}"
echo "built: $build_dir/cmake/calm-edge-generate"
