"""Faults under steady load: what clients see while servers, stubs, ports and the controller fail.

    python benchmarks/chaos.py [--duration 110] [--out DIR]

Runs `controlplane up` (CPU, three models, one gpu-let each, router in two processes on fixed
ports), sends each model a steady stream of requests from its own thread (tritonclient HTTP, 10 s
timeout, every answer checked), and injects on a schedule:

* **server kill**: SIGKILL of lenet's tritonserver;
* **stub kill**: SIGKILL of mobilenet_v2's python-backend stub (Triton keeps saying ready);
* **port steal**: SIGKILL of mnasnet1_0's tritonserver while someone binds its HTTP port;
* **controller kill + restart**: SIGKILL of `up` itself, then `up --detach` again (it cleans up
  what the killed one left and starts afresh).

For each fault: requests sent to the affected model from the fault until it recovered (plus 5 s),
how many succeeded and failed, their p99 latency, and the time to recover (from the fault to the
first success after which the model keeps answering). Prints a table and writes it to
docs/benchmarks.md (between ``<!-- chaos:begin -->`` and ``<!-- chaos:end -->``) with the
command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cli, report  # noqa: E402
from controlplane.runtime.base import free_ports  # noqa: E402

MODELS = {"lenet": 20.0, "mobilenet_v2": 4.0, "mnasnet1_0": 4.0}     # req/s each
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"


class Load:
    """One thread per model, requests at a steady rate; every request's (send time, latency s, ok)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.log: dict[str, list[tuple[float, float, bool]]] = {m: [] for m in MODELS}
        self.errors: dict[str, list[tuple[float, str]]] = {m: [] for m in MODELS}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(m, r), daemon=True) for m, r in MODELS.items()]

    def _run(self, model: str, rate: float) -> None:
        import tritonclient.http as http

        from controlplane import zoo

        x = zoo.example_input(model, 1, seed=1).numpy()
        inp = http.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client = http.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
        nxt = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                ok = client.infer(model, [inp]).as_numpy("OUTPUT").shape[0] == 1
            except Exception as e:  # noqa: BLE001 - a failed request is what is measured
                ok = False
                self.errors[model].append((t0, str(e)[:160]))
                client = http.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
            self.log[model].append((t0, time.monotonic() - t0, ok))
            nxt += 1.0 / rate
            time.sleep(max(0.0, nxt - time.monotonic()))


def recovery(log: list[tuple[float, float, bool]], t_fault: float, t_next: float) -> float | None:
    """Seconds from the fault to the first success after which no request failed before the next
    fault (``t_next``); 0 if none failed, None if it never recovered."""
    after = [(t, ok) for t, _, ok in log if t_fault <= t < t_next]
    if all(ok for _, ok in after):
        return 0.0
    last_fail = max(t for t, ok in after if not ok)
    nxt = [t for t, ok in after if ok and t > last_fail]
    return (nxt[0] - t_fault) if nxt else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpulet-chaos-"))
    env = {**os.environ, "CONTROLPLANE_STATE": str(work / "state"), "COLUMNS": "200"}
    hport, gport = free_ports(2)
    dep = work / "chaos.yaml"
    dep.write_text("name: chaos\nmodels:\n" + "".join(
        f"  - {{name: {m}, rate: {r}, slo_ms: 2000}}\n" for m, r in MODELS.items()) +
        f"devices: cpu\nrouter: {{http_port: {hport}, grpc_port: {gport}, workers: 2}}\n"
        "scheduler: {algorithm: trivial}\n")
    state_file = work / "state" / "runs" / "chaos" / "state.json"

    def state() -> dict:
        return json.loads(state_file.read_text())

    def gpulet_of(model: str) -> str:
        s = state()
        return next(g["id"] for g in s["plan"]["gpulets"] if any(a["model"] == model for a in g["models"]))

    up = cli("up", "-f", str(dep), "--detach", env=env)
    if up.returncode != 0:
        sys.exit(f"up failed: {up.stdout}\n{up.stderr}")
    load = Load(f"127.0.0.1:{hport}")
    for t in load.threads:
        t.start()
    t0 = time.monotonic()
    faults: list[dict] = []
    squatter = None

    def at(sec: float) -> None:
        time.sleep(max(0.0, t0 + sec - time.monotonic()))

    def server_kill(model: str) -> int:
        pid = state()["gpulets"][gpulet_of(model)]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    try:
        d = args.duration
        at(0.1 * d)
        server_kill("lenet")
        faults.append({"fault": "server kill", "model": "lenet", "t": time.monotonic()})

        at(0.3 * d)
        import psutil

        srv = psutil.Process(state()["gpulets"][gpulet_of("mobilenet_v2")]["pid"])
        stub = next(c for c in srv.children(recursive=True) if c.name().startswith("triton_python_b"))
        stub.kill()
        faults.append({"fault": "stub kill", "model": "mobilenet_v2", "t": time.monotonic()})

        at(0.5 * d)
        g = state()["gpulets"][gpulet_of("mnasnet1_0")]
        port = int(g["http"].rsplit(":", 1)[1])
        server_kill("mnasnet1_0")
        faults.append({"fault": "port steal", "model": "mnasnet1_0", "t": time.monotonic()})
        squatter = socket.socket()
        for _ in range(50):
            try:
                squatter.bind(("127.0.0.1", port))
                squatter.listen(1)
                break
            except OSError:
                time.sleep(0.1)

        at(0.7 * d)
        os.kill(state()["pid"], signal.SIGKILL)
        faults.append({"fault": "controller kill + restart", "model": "all", "t": time.monotonic()})
        again = cli("up", "-f", str(dep), "--detach", env=env)
        faults[-1]["restart_output"] = (again.stdout + again.stderr)[-2000:]
        at(d)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(15)
        if squatter is not None:
            squatter.close()
        cli("down", "-f", str(dep), env=env)

    rows = []
    t_end = time.monotonic()
    for i, f in enumerate(faults):
        models = list(MODELS) if f["model"] == "all" else [f["model"]]
        t_next = faults[i + 1]["t"] if i + 1 < len(faults) else t_end
        rec = [recovery(load.log[m], f["t"], t_next) for m in models]
        worst = None if any(r is None for r in rec) else max(rec)
        end = min(t_next, f["t"] + (worst if worst is not None else 1e9) + 5.0)
        win = [(lat, ok) for m in models for t, lat, ok in load.log[m] if f["t"] <= t <= end]
        lats = [lat for lat, ok in win if ok]
        errs: dict[str, int] = {}
        for m in models:
            for t, e in load.errors[m]:
                if f["t"] <= t < t_next:
                    key = e.split(":")[0][:80] if "]" not in e else e[:e.index("]") + 1] + " " + e[e.index("]") + 1:][:70]
                    errs[key] = errs.get(key, 0) + 1
        last_fail = max((t for m in models for t, e in load.errors[m] if f["t"] <= t < t_next), default=None)
        rows.append({"fault": f["fault"], "model": f["model"], "errors": errs,
                     "last_failure_s": None if last_fail is None else round(last_fail - f["t"], 1),
                     "window_s": round(t_next - f["t"], 1),
                     "sent": len(win), "ok": sum(ok for _, ok in win),
                     "failed": sum(not ok for _, ok in win),
                     "p99_ms": round(1000 * float(np.percentile(lats, 99)), 1) if lats else None,
                     "recovery_s": None if worst is None else round(worst, 1)})
    total = {m: (len(v), sum(ok for _, _, ok in v)) for m, v in load.log.items()}
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{platform.node()} "
           f"({os.cpu_count()} cores)", "command": "python benchmarks/chaos.py " + " ".join(sys.argv[1:]),
           "duration_s": args.duration, "rates": MODELS, "faults": rows,
           "total": {m: {"sent": n, "ok": k, "failed": n - k} for m, (n, k) in total.items()}}
    report(render(doc), doc, args.out / "chaos.json" if args.out else None,
           None if args.no_docs else (BEGIN, END, "## Chaos: faults under steady load (issue 14)"))


def render(doc: dict) -> str:
    lines = [f"Run {doc['date']} on {doc['machine']}; `{doc['command']}`; {doc['duration_s']:g} s of load at "
             + ", ".join(f"{m} {r:g}/s" for m, r in doc["rates"].items()) + " (SLO 2 s; a request fails on an error "
             "or after 10 s).", "",
             "| fault | model | sent (fault to recovery + 5 s, or the next fault) | succeeded | failed | p99 of successes (ms) | recovered after (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["faults"]:
        lines.append(f"| {r['fault']} | {r['model']} | {r['sent']} | {r['ok']} | {r['failed']} | {r['p99_ms']} | "
                     f"{'never' if r['recovery_s'] is None else r['recovery_s']} |")
    lines += ["", "Whole run: " + "; ".join(f"{m} {t['ok']}/{t['sent']} succeeded" for m, t in doc["total"].items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
