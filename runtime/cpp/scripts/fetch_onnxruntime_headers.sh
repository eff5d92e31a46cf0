#!/usr/bin/env bash
# Put ONNX Runtime's C/C++ headers into a build folder, for machines without an ONNX Runtime
# install: Debian trixie's libonnxruntime-dev package is downloaded (not installed) with apt-get
# through a sources folder of its own, then unpacked with dpkg -x. The archive address is taken
# from the system's own /etc/apt/sources.list.d/debian.sources, so this works behind the same
# mirror or proxy as the rest of apt. The system's apt configuration is not changed.
#
#   fetch_onnxruntime_headers.sh BUILD_DIR    -> BUILD_DIR/onnxruntime-headers/usr/include/onnxruntime/*.h
set -euo pipefail

build_dir=$(realpath -m "${1:?usage: $0 BUILD_DIR}")
apt_dir="$build_dir/apt-trixie"
unpacked="$build_dir/onnxruntime-headers"
system_sources=/etc/apt/sources.list.d/debian.sources

if [ -f "$unpacked/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
    echo "ONNX Runtime headers already in $unpacked"
    exit 0
fi
if [ ! -f "$system_sources" ]; then
    echo "error: $system_sources not found; on a machine that is not Debian, install ONNX Runtime" \
         "and pass -DONNXRUNTIME_ROOT=<its folder> to cmake instead (see README.md, C++ runtime)" >&2
    exit 1
fi

# The first archive stanza's URI and key (not the security archive), re-aimed at trixie.
archive_uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$system_sources")
keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$system_sources")
if [ -z "$archive_uri" ]; then
    echo "error: no archive URI found in $system_sources; pass -DONNXRUNTIME_ROOT=<ONNX Runtime folder> to cmake" >&2
    exit 1
fi

mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/download"
cat > "$apt_dir/sources.list.d/trixie.sources" <<STANZA
Types: deb
URIs: $archive_uri
Suites: trixie
Components: main
Signed-By: ${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
STANZA

apt_options=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::State::status=/dev/null"
    -o "APT::Sandbox::User=root"
)
apt-get "${apt_options[@]}" -q update
(cd "$apt_dir/download" && apt-get "${apt_options[@]}" -q download libonnxruntime-dev)
deb=$(ls "$apt_dir"/download/libonnxruntime-dev_*.deb | head -n 1)
dpkg -x "$deb" "$unpacked"
echo "ONNX Runtime headers from $(basename "$deb") in $unpacked/usr/include/onnxruntime"
