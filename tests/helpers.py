"""Helpers for tests: run the CLI as a user would, find leftover servers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `controlplane ARGS` in a fresh interpreter, as a user would (``env``: added to the environment)."""
    proc = subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"controlplane {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tritonserver_pids(containing: str = "") -> list[int]:
    """PIDs of running tritonservers whose command line contains `containing` (e.g. a test's tmp dir,
    so that servers of other tests or other users of the machine do not count)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() != "tritonserver":
                    continue
                if containing in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def check_lenet(repo, url: str, n: int = 3, seed: int = 0) -> None:
    """One HTTP request of n lenet rows to url; its output must match the same TorchScript run here."""
    import numpy as np
    import torch
    import tritonclient.http as httpclient

    x = np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)
    c = httpclient.InferenceServerClient(url, network_timeout=60)
    try:
        inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("lenet", [inp]).as_numpy("OUTPUT")
    finally:
        c.close()
    ref = torch.jit.load(str(repo["lenet"].artifact())).eval()
    with torch.inference_mode():
        want = ref(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class Traffic:
    """lenet requests one after another over HTTP and over gRPC until stopped; every answer checked
    against lenet's TorchScript run in this process."""

    def __init__(self, http_url: str, grpc_url: str) -> None:
        import numpy as np
        import torch
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        from controlplane import zoo
        from controlplane.repository import SourceRepository

        self._np = np
        self.x = zoo.example_input("lenet", 2, seed=3).numpy()
        ts = torch.jit.load(str(SourceRepository()["lenet"].artifact()))
        with torch.no_grad():
            self.ref = ts(torch.from_numpy(self.x)).numpy()
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(m, url), daemon=True)
                         for m, url in ((httpclient, http_url), (grpcclient, grpc_url))]

    def _run(self, mod, url: str) -> None:
        np = self._np
        client = mod.InferenceServerClient(url)
        inp = mod.InferInput("INPUT", list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x)
        while not self._stop.is_set():
            try:
                out = client.infer("lenet", [inp]).as_numpy("OUTPUT")
                np.testing.assert_allclose(out, self.ref, rtol=1e-4, atol=1e-5)
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test
                self.failures.append(f"{mod.__name__}: {type(e).__name__}: {e}")

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """The router's /metrics at host:port as {(sample name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
