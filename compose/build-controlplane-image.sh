#!/usr/bin/env bash
# Build the gpulet control plane image (compose/Dockerfile.controlplane), the router of
# `controlplane compose` files, with no registry of images; or reuse it.
#
#   compose/build-controlplane-image.sh          # -> gpulet-controlplane:latest
#
# It is built on the CPU Triton image (compose/build-cpu-image.sh runs first, which reuses
# that image when its content hash matches). Idempotent: the image carries the label
# gpulet.content-hash, a hash of the Dockerfile, the base image's id, the requirements and
# every file of the project that goes in (pyproject.toml, controlplane/, profiler/,
# model_repository/, deployments/); an image with that hash is reused (~1 s). Else:
#   1. wheels: the project's dependencies that the base lacks, downloaded by the host's pip
#      (cached per requirement set in the image cache) under constraints taken from the base
#      image's `pip freeze`, so nothing the base has is upgraded;
#   2. `docker build` (legacy builder, no network), with the previous image as --cache-from,
#      so a change of the code alone rebuilds only the last layers (seconds).
#
# Environment:
#   IMAGE               image name (default gpulet-controlplane:latest)
#   BASE_IMAGE          base (default gpulet-triton-cpu:latest; BASE_IMAGE=... skips building it)
#   SKIP_DEPS           project dependencies not installed (default: torch torchvision matplotlib scipy
#                       nvidia-pytriton: the base has torch and tritonserver; the router needs none of the others)
#   PIP_EXTRA_ARGS      extra pip download arguments
#   GPULET_IMAGE_CACHE  cache directory (default ~/.cache/gpulet-images): the wheels
#   PYTHON              python whose pip downloads the wheels (default: python3)
#   FORCE=1             rebuild even if a matching image exists
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
IMAGE=${IMAGE:-gpulet-controlplane:latest}
SKIP_DEPS=${SKIP_DEPS:-"torch torchvision matplotlib scipy nvidia-pytriton"}
CACHE=${GPULET_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpulet-images}
PYTHON=${PYTHON:-python3}
SRC=(pyproject.toml controlplane profiler model_repository deployments)
export DOCKER_BUILDKIT=0

say() { echo "build-controlplane-image: $*" >&2; }
t0=$(date +%s)
mkdir -p "$CACHE"

docker info >/dev/null 2>&1 || { say "no Docker engine (run compose/start-dockerd.sh)"; exit 2; }

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=gpulet-triton-cpu:latest
    PYTHON=$PYTHON bash "$here/build-cpu-image.sh"
fi
base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null) \
    || { say "base image $BASE_IMAGE not found"; exit 1; }

exec 9>"$CACHE/build-controlplane.lock"
flock 9

# Files that go into the image (no caches, no bytecode), relative to the repository root.
files() {
    (cd "$root" && for p in "${SRC[@]}"; do
        [ -e "$p" ] || continue
        find "$p" \( -name __pycache__ -o -name '*.egg-info' -o -name '.*' \) -prune -o -type f ! -name '*.pyc' -print
    done | LC_ALL=C sort)
}

# Requirements: pyproject's dependencies less SKIP_DEPS.
requirements=$(cd "$root" && "$PYTHON" - "$SKIP_DEPS" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:               # Python < 3.11
    import tomli as tomllib
skip = {s.lower().replace("_", "-") for s in sys.argv[1].split()}
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower().replace("_", "-")
    if name in skip:
        continue
    if name == "tritonclient":     # the router needs its grpc and http clients, not the CUDA extras
        dep = "tritonclient[grpc,http]" + dep[len(re.match(r"[^;<>=!~ ]+", dep).group(0)):]
    print(dep)
EOF
)

hash=$( { cat "$here/Dockerfile.controlplane"; echo "$base_id"; echo "$requirements"
          (cd "$root" && files | tr '\n' '\0' | xargs -0 sha256sum); } | sha256sum | cut -c1-16)
label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

if [ "${FORCE:-0}" != 1 ] && [ "$(label "$IMAGE" gpulet.content-hash)" = "$hash" ]; then
    say "reusing $IMAGE (content hash $hash)"; exit 0
fi

# ---------------------------------------------------------------- 1. wheels (host pip)
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    [ -x "$CACHE/pip-venv/bin/python" ] || "$PYTHON" -m venv "$CACHE/pip-venv" \
        || { say "$PYTHON has no pip and cannot make a venv (apt-get install python3-venv)"; exit 1; }
    PYTHON="$CACHE/pip-venv/bin/python"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/wheels" "$ctx/src"
# What the base has, pinned: nothing installed there changes (tritonserver needs numpy<2, ...).
docker run --rm --network none --entrypoint /opt/venv/bin/pip "$BASE_IMAGE" freeze --all 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(pip|setuptools|wheel)==' >"$ctx/wheels/constraints.txt"
echo "$requirements" >"$ctx/wheels/requirements.txt"
deps_hash=$(cat "$ctx/wheels/constraints.txt" "$ctx/wheels/requirements.txt" | sha256sum | cut -c1-16)
wheels="$CACHE/controlplane-wheels-$deps_hash"
if [ ! -f "$wheels/.complete" ]; then
    rm -rf "$wheels"; mkdir -p "$wheels"
    plat=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none)
    for minor in $(seq 36 -1 17); do plat+=(--platform "manylinux_2_${minor}_x86_64"); done
    plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
    say "downloading wheels: $(echo "$requirements" | tr '\n' ' ')"
    "$PYTHON" -m pip download -q ${PIP_EXTRA_ARGS:-} "${plat[@]}" -d "$wheels" \
            -c "$ctx/wheels/constraints.txt" -r "$ctx/wheels/requirements.txt" >"$CACHE/controlplane-pip.log" 2>&1 \
        || { grep -v "is ignored: it is neither" "$CACHE/controlplane-pip.log" | tail -n 30 >&2; say "pip download failed"; exit 1; }
    # The base has these already; the install would skip them (smaller context).
    while IFS='=' read -r name _; do
        n=$(echo "$name" | tr 'A-Z.-' 'a-z__')
        find "$wheels" -maxdepth 1 -iname "${n}-[0-9]*.whl" -delete
    done <"$ctx/wheels/constraints.txt"
    touch "$wheels/.complete"
fi
find "$CACHE" -maxdepth 1 -name 'controlplane-wheels-*' ! -name "controlplane-wheels-$deps_hash" -exec rm -rf {} +
cp -al "$wheels"/*.whl "$ctx/wheels/" 2>/dev/null || cp -a "$wheels"/*.whl "$ctx/wheels/" 2>/dev/null || true
say "wheels ready: $(ls "$ctx/wheels" | grep -c '\.whl$') wheels, $(du -sh "$ctx/wheels" | cut -f1) ($(( $(date +%s) - t0 )) s)"

# ---------------------------------------------------------------- 2. project + docker build
(cd "$root" && files | while read -r f; do mkdir -p "$ctx/src/$(dirname "$f")"; cp -p "$f" "$ctx/src/$f"; done)
cp "$here/Dockerfile.controlplane" "$ctx/"
cache_from=()
docker image inspect "$IMAGE" >/dev/null 2>&1 && cache_from=(--cache-from "$IMAGE")
say "docker build $IMAGE (base $BASE_IMAGE)"
docker build -q --build-arg "BASE=$BASE_IMAGE" "${cache_from[@]}" -f "$ctx/Dockerfile.controlplane" \
    --label "gpulet.content-hash=$hash" --label "gpulet.base=$BASE_IMAGE" --label "gpulet.base-id=$base_id" \
    -t "$IMAGE" "$ctx" >"$CACHE/controlplane-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/controlplane-build.log" >&2; say "docker build failed"; exit 1; }
say "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'), $(( $(date +%s) - t0 )) s)"
# Earlier builds of this image (now untagged) and their layers.
docker image prune -f --filter "label=gpulet.base-id" >/dev/null 2>&1 || true
