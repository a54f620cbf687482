#!/usr/bin/env bash
# CI: a Docker engine, the CPU Triton image and the control plane image for
# tests/test_docker_runtime.py and tests/test_compose_up.py.
# Called by .ci/run before the tests. Never fails the CI run: where no engine can be
# started the docker tests skip and print why; where the image cannot be built they fail
# with the build's output (the test fixture runs compose/build-cpu-image.sh again).
#
# Time: engine ~5 s; CPU image reused (same content hash) ~1 s, loaded from the cache
# (~/.cache/gpulet-images, GPULET_IMAGE_CACHE) ~15 s, built from scratch ~2-3 min; control
# plane image (compose/build-controlplane-image.sh) reused ~1 s, built ~15 s.
set -u
cd "$(dirname "$0")/.."
t0=$(date +%s)
echo "== docker: engine"
bash compose/start-dockerd.sh
if ! docker info >/dev/null 2>&1; then
    echo "== docker: no engine; docker-runtime tests will skip"
    exit 0
fi
echo "== docker: CPU image"
if bash compose/build-cpu-image.sh; then
    echo "== docker: CPU image ready in $(( $(date +%s) - t0 )) s"
    # The router image of compose deployments, on top of the CPU image: reused when its content
    # hash (Dockerfile, base image id, requirements, project files) matches, else ~15 s.
    echo "== docker: control plane image"
    if BASE_IMAGE=gpulet-triton-cpu:latest bash compose/build-controlplane-image.sh; then
        echo "== docker: ready in $(( $(date +%s) - t0 )) s"
    else
        echo "== docker: control plane image build failed after $(( $(date +%s) - t0 )) s (the compose test will say why)"
    fi
else
    echo "== docker: image build failed after $(( $(date +%s) - t0 )) s (the docker tests will say why)"
fi
exit 0
