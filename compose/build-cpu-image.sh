#!/usr/bin/env bash
# Build the gpulet CPU image (compose/Dockerfile.cpu) with no registry of images, or reuse it.
#
#   compose/build-cpu-image.sh            # -> gpulet-triton-cpu:latest
#   IMAGE=my/triton-cpu:1 compose/build-cpu-image.sh
#
# Idempotent. The image carries the label gpulet.content-hash: a hash of the Dockerfile,
# the tritonserver wrapper and the package specs below. Where an image of that name and
# hash exists it is reused; else a saved copy in the cache is loaded (`docker load`);
# else it is built:
#   1. base: a Debian root filesystem made by debootstrap (Debian's mirror), `docker
#      import`ed as gpulet-debian:<suite>-<hash> (the rootfs tarball is cached too);
#   2. wheels: downloaded into the build context by the host's pip (PyPI, or the index /
#      find-links the host's pip is configured with), for CPython 3.11 on manylinux x86_64;
#      torch: the first of TORCH_SPECS pip can get (a CPU-only build first: ~180 MB
#      against several GB for PyPI's CUDA build, which also runs on CPU);
#   3. `docker build` (legacy builder, no network needed) and `docker save` into the cache.
#
# Environment:
#   IMAGE               image name (default gpulet-triton-cpu:latest)
#   TORCH_SPECS         torch requirements to try in order (default "torch==2.13.0+cpu torch<=2.14.1")
#   PIP_EXTRA_ARGS      extra pip download arguments, e.g. --extra-index-url https://download.pytorch.org/whl/cpu
#   PYTRITON_SPEC       default nvidia-pytriton==0.7.0 (Triton 2.51 with the python backend)
#   DEBIAN_SUITE        default bookworm (Python 3.11; another suite needs DEBIAN_PACKAGES with its libpython3.X)
#   DEBIAN_MIRROR       default http://deb.debian.org/debian
#   GPULET_IMAGE_CACHE  cache directory (default ~/.cache/gpulet-images): rootfs tarball, wheels, docker save
#   GPULET_IMAGE_SAVE   1 (default): keep a `docker save` of the image in the cache; 0: don't
#   PYTHON              python whose pip downloads the wheels (default: python3; a throwaway venv if it has no pip)
#   FORCE=1             rebuild even if a matching image exists
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE=${IMAGE:-gpulet-triton-cpu:latest}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=${DEBIAN_PACKAGES:-python3,python3-venv,libpython3.11,ca-certificates,curl,procps}   # libpython3.11: the stub links it
PYTRITON_SPEC=${PYTRITON_SPEC:-nvidia-pytriton==0.7.0}
NUMPY_SPEC='numpy<2'
ONNXRUNTIME_SPEC=${ONNXRUNTIME_SPEC:-onnxruntime}   # a user's ONNX models (`repo add --onnx`) run through it
TORCH_SPECS=${TORCH_SPECS:-"torch==2.13.0+cpu torch<=2.14.1"}
CACHE=${GPULET_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpulet-images}
PYTHON=${PYTHON:-python3}
export DOCKER_BUILDKIT=0          # the legacy builder: no buildx plugin needed

say() { echo "build-cpu-image: $*" >&2; }
t0=$(date +%s)
mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
flock 9                            # one build at a time

docker info >/dev/null 2>&1 || { say "no Docker engine (run compose/start-dockerd.sh)"; exit 2; }

hash=$( { cat "$here/Dockerfile.cpu" "$here/tritonserver"
          echo "$SUITE $PACKAGES $PYTRITON_SPEC $NUMPY_SPEC $TORCH_SPECS $ONNXRUNTIME_SPEC"; } | sha256sum | cut -c1-16)
label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

if [ "${FORCE:-0}" != 1 ]; then
    if [ "$(label "$IMAGE" gpulet.content-hash)" = "$hash" ]; then
        say "reusing $IMAGE (content hash $hash)"; exit 0
    fi
    saved="$CACHE/gpulet-triton-cpu-$hash.tar"
    if [ -s "$saved" ]; then
        say "loading $saved"
        src=$(docker load -q -i "$saved" | sed -n 's/^Loaded image: //p' | tail -n 1)
        [ -n "$src" ] && [ "$src" != "$IMAGE" ] && docker tag "$src" "$IMAGE"
        if [ "$(label "$IMAGE" gpulet.content-hash)" = "$hash" ]; then
            say "reusing $IMAGE from the cache ($(( $(date +%s) - t0 )) s)"; exit 0
        fi
    fi
fi

# ---------------------------------------------------------------- 1. base image (debootstrap)
base_hash=$(echo "$SUITE $PACKAGES" | sha256sum | cut -c1-12)
BASE="gpulet-debian:$SUITE-$base_hash"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    rootfs_tar="$CACHE/debian-$SUITE-$base_hash.tar"
    if [ ! -s "$rootfs_tar" ]; then
        if ! command -v debootstrap >/dev/null; then
            say "installing debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
                || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
        fi
        root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        trap 'rm -rf "$root"' EXIT
        say "debootstrap $SUITE ($PACKAGES) from $MIRROR"
        debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
        # Slim it: apt lists and caches, docs, man pages.
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
               "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
        echo "deb $MIRROR $SUITE main" >"$root/etc/apt/sources.list"
        tar -C "$root" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
        rm -rf "$root"; trap - EXIT
    fi
    say "docker import $BASE"
    docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/bash"]' -m "debootstrap $SUITE: $PACKAGES" "$rootfs_tar" "$BASE" >/dev/null
fi
say "base $BASE ready ($(( $(date +%s) - t0 )) s)"

# ---------------------------------------------------------------- 2. wheels (host pip)
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    [ -x "$CACHE/pip-venv/bin/python" ] || "$PYTHON" -m venv "$CACHE/pip-venv" \
        || { say "$PYTHON has no pip and cannot make a venv (apt-get install python3-venv)"; exit 1; }
    PYTHON="$CACHE/pip-venv/bin/python"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile.cpu" "$here/tritonserver" "$ctx/"
wheels="$CACHE/wheels-$hash"
mkdir -p "$wheels"
plat=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none)
for minor in $(seq 36 -1 17); do plat+=(--platform "manylinux_2_${minor}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
torch_spec=
for spec in $TORCH_SPECS; do
    if "$PYTHON" -m pip download -q --no-deps ${PIP_EXTRA_ARGS:-} "${plat[@]}" -d "$wheels" "$spec" >/dev/null 2>&1; then
        torch_spec=$spec; break
    fi
    say "pip cannot get $spec; trying the next"
done
[ -n "$torch_spec" ] || { say "no torch wheel from: $TORCH_SPECS"; exit 1; }
printf '%s\n' "$PYTRITON_SPEC" "$NUMPY_SPEC" "$torch_spec" "$ONNXRUNTIME_SPEC" >"$wheels/requirements.txt"
say "downloading wheels ($PYTRITON_SPEC, $NUMPY_SPEC, $torch_spec, $ONNXRUNTIME_SPEC)"
"$PYTHON" -m pip download -q ${PIP_EXTRA_ARGS:-} "${plat[@]}" -d "$wheels" -r "$wheels/requirements.txt" \
        >"$CACHE/pip-download.log" 2>&1 \
    || { grep -v "is ignored: it is neither" "$CACHE/pip-download.log" | tail -n 30 >&2; say "pip download failed"; exit 1; }
cp -al "$wheels" "$ctx/wheels" 2>/dev/null || cp -a "$wheels" "$ctx/wheels"
say "wheels ready: $(du -sh "$wheels" | cut -f1) ($(( $(date +%s) - t0 )) s)"

# ---------------------------------------------------------------- 3. docker build (+ save)
say "docker build $IMAGE"
docker build -q --build-arg "BASE=$BASE" -f "$ctx/Dockerfile.cpu" \
    --label "gpulet.content-hash=$hash" --label "gpulet.torch=$torch_spec" \
    --label "gpulet.pytriton=$PYTRITON_SPEC" --label "gpulet.base=$BASE" \
    -t "$IMAGE" "$ctx" >"$CACHE/docker-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/docker-build.log" >&2; say "docker build failed"; exit 1; }
rm -rf "$ctx"; trap - EXIT
say "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'), $(( $(date +%s) - t0 )) s)"
if [ "${GPULET_IMAGE_SAVE:-1}" = 1 ]; then
    rm -f "$CACHE"/gpulet-triton-cpu-*.tar
    docker save -o "$CACHE/gpulet-triton-cpu-$hash.tar.tmp" "$IMAGE" \
        && mv "$CACHE/gpulet-triton-cpu-$hash.tar.tmp" "$CACHE/gpulet-triton-cpu-$hash.tar" \
        && say "saved to $CACHE/gpulet-triton-cpu-$hash.tar ($(( $(date +%s) - t0 )) s)"
fi
docker image prune -f --filter "label=gpulet.content-hash" >/dev/null 2>&1 || true
