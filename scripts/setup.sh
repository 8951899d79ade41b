#!/usr/bin/env bash
# Installs what building, testing and benchmarking DWCP needs on Debian: a C toolchain (zstd and lz4 are
# built from source by their -sys crates), iperf3 (the reference in the benchmarks), iproute2 (`ip netns`
# for the WAN test bed and its integration test), the guest packages below, and a Rust
# toolchain (edition 2024: Rust 1.85 or newer) with rustfmt and clippy when none is installed.
set -euo pipefail

# qemu-system-x86, linux-image-amd64 and busybox-static boot the test guests (QEMU as a migration client,
# Soft-RoCE for the RDMA path); libibverbs-dev, librdmacm-dev and libclang-dev build rdma-sys;
# ibverbs-providers (rxe), ibverbs-utils and perftest run inside the Soft-RoCE guest; zstd and lz4 are the
# command-line references of the HDE benchmark; cpio packs the guests' initramfs.
# etcd-server is the real etcd that the ACP etcd backend's tests start; protobuf-compiler (protoc)
# builds etcd-client's gRPC stubs.
packages=(build-essential pkg-config iperf3 iproute2 curl ca-certificates
    qemu-system-x86 linux-image-amd64 busybox-static cpio
    libibverbs-dev librdmacm-dev libclang-dev ibverbs-providers ibverbs-utils perftest
    zstd lz4 etcd-server protobuf-compiler)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi
if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo --version
