#!/usr/bin/env bash
# Installs what tensor_parallel needs to build and test, from Debian's archive only.
# Idempotent: installs only what is missing and prints what it installs; returns in
# well under 5 s when everything is present. No other downloads.
set -euo pipefail

packages=(
  bazel-bootstrap
  g++
  libabsl-dev
  libgoogle-glog-dev
  libgtest-dev
  libgmock-dev
  libgloo-dev
  libopenblas-dev
  nlohmann-json3-dev
  libbenchmark-dev
  libopenmpi-dev
  openmpi-bin
  clang
  libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "bootstrap: all ${#packages[@]} packages present"
  exit 0
fi

echo "bootstrap: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "bootstrap: done"
