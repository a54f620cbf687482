#!/usr/bin/env bash
# CI: a Docker engine and the CPU Triton image for tests/test_docker_runtime.py.
# Called by .ci/run before the tests. Never fails the CI run: where no engine can be
# started the docker tests skip and print why; where the image cannot be built they fail
# with the build's output (the test fixture runs compose/build-cpu-image.sh again).
#
# Time: engine ~5 s; image reused (same content hash) ~1 s, loaded from the cache
# (~/.cache/gpulet-images, GPULET_IMAGE_CACHE) ~15 s, built from scratch ~2-3 min.
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
    echo "== docker: ready in $(( $(date +%s) - t0 )) s"
else
    echo "== docker: image build failed after $(( $(date +%s) - t0 )) s (the docker tests will say why)"
fi
exit 0
