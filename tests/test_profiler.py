"""Profiler tests (CPU only, fast): core-share tables, CSV validation, MPS detection, the pair fit."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from controlplane.profiles import COLUMNS, ProfileError, ProfileStore, read_csv
from profiler.common import cpu_device_name, existing_rows
from profiler.latency import check_mps, cores_for_share, profile_latency
from controlplane.runtime.mps import MPSNotActive, require_client, status


@pytest.fixture(scope="module")
def lenet_table(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("prof") / "latency.csv"
    events: list[dict] = []
    res = profile_latency(["lenet"], "cpu", shares=[50, 100], batches=[1, 32], out_csv=path, runs=30,
                          min_runs=8, warmup=3, point_budget_s=0.3, progress=events.append)
    assert len(res.measured) == 4
    return path, events


def test_lenet_core_share_table_is_well_formed(lenet_table):
    path, events = lenet_table
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    rows = read_csv(path)  # the scheduler's loader accepts it
    assert {(r.share, r.batch) for r in rows} == {(50, 1), (50, 32), (100, 1), (100, 32)}
    for r in rows:
        assert r.device == cpu_device_name() and r.model == "lenet" and r.precision == "fp32"
        assert 0 < r.p50_ms <= r.p99_ms
        assert r.mean_ms > 0 and r.runs >= 8
        assert r.tool_version.startswith("gpulet-profiler") and r.date
    store = ProfileStore.load(path)
    assert store.latency("lenet", 50, 32, "p50") == next(r.p50_ms for r in rows if (r.share, r.batch) == (50, 32))


def test_lenet_latency_grows_with_batch(lenet_table):
    # 32 images cost more than one at the same share: monotone where it must be.
    # On one core (50 %) strictly; over the whole table, the fastest batch of 32 is slower than
    # the fastest single image (two threads on a shared 2-core VM are too noisy for more).
    rows = read_csv(lenet_table[0])
    p = {r.batch: r.p50_ms for r in rows if r.share == 50}
    assert p[32] > p[1], p
    assert min(r.p50_ms for r in rows if r.batch == 32) > min(r.p50_ms for r in rows if r.batch == 1)


def test_core_shares_map_to_the_runtimes_cores(lenet_table):
    shares = {e["share"]: e["cores"] for e in lenet_table[1] if e.get("type") == "share"}
    n = len(os.sched_getaffinity(0))
    assert shares[100] == sorted(os.sched_getaffinity(0))
    assert len(shares[50]) == max(1, round(n / 2)) and cores_for_share(50) == shares[50]


def test_profiling_resumes_and_skips_measured_rows(lenet_table):
    path = lenet_table[0]
    before = path.read_text()
    events: list[dict] = []
    res = profile_latency(["lenet"], "cpu", shares=[50, 100], batches=[1, 32], out_csv=path, progress=events.append)
    assert res.measured == [] and path.read_text() == before
    assert events[0]["type"] == "plan" and events[0]["total"] == 0 and events[0]["done"] == 4


GOOD = "cpu-2c,lenet,100,1,0.2,0.3,0.25,50,0.2,fp32,t,2026-01-01"


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "latency.csv"
    p.write_text("\n".join([",".join(COLUMNS), *lines]) + "\n")
    return p


@pytest.mark.parametrize("bad, line, what", [
    ("cpu-2c,lenet,100,2,abc,0.3,0.25,50,0.2,fp32,t,2026-01-01", 3, "p50_ms"),       # corrupt number
    ("cpu-2c,lenet,100,4,0.2,0.3", 3, "columns"),                                    # partial row
    ("cpu-2c,lenet,100,8,0.5,0.3,0.25,50,0.2,fp32,t,2026-01-01", 3, "p99_ms"),       # p99 < p50
    ("cpu-2c,lenet,140,8,0.2,0.3,0.25,50,0.2,fp32,t,2026-01-01", 3, "share"),        # share > 100
])
def test_corrupt_or_partial_csv_is_rejected_with_its_line(tmp_path, bad, line, what):
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(ProfileError) as e:
        read_csv(p)
    assert f"{p}:{line}:" in str(e.value) and what in str(e.value)
    # A profiling run refuses to append to (and so hide) a corrupt file.
    with pytest.raises(ProfileError, match=f":{line}:"):
        existing_rows(p)
    with pytest.raises(ProfileError, match=f":{line}:"):
        profile_latency(["lenet"], "cpu", shares=[100], batches=[1], out_csv=p)


def test_wrong_header_is_rejected_at_line_1(tmp_path):
    p = tmp_path / "latency.csv"
    p.write_text("device,model,share,batch,p50\n" + GOOD + "\n")
    with pytest.raises(ProfileError, match=r":1: header"):
        read_csv(p)


def test_mps_not_running_is_detected_and_reported(tmp_path):
    pipe = tmp_path / "pipe"
    st = status(pipe)
    assert st.active is False and st.servers == []
    assert "control" in st.reason or "not installed" in st.reason
    with pytest.raises(MPSNotActive, match=r"shares \[20, 50\] need MPS"):
        check_mps([20, 50, 100], True, pipe)
    with pytest.raises(MPSNotActive, match="no MPS pipe directory"):
        check_mps([50], True, None)
    check_mps([100], True, None)       # a whole GPU needs no MPS
    check_mps([20, 50], False, None)   # CPU core shares need none
    with pytest.raises(MPSNotActive, match="CUDA_MPS_PIPE_DIRECTORY is not set"):
        require_client(40, None)
    with pytest.raises(MPSNotActive, match="MPS is not active"):
        require_client(40, pipe, wait_s=0)
    require_client(100, None)


def test_interference_fit_recovers_a_known_model_on_heldout_pairs():
    from profiler.interference import fit_and_evaluate, pair_configs

    models = ["a", "b", "c", "d", "e"]
    sens = {m: 0.02 * i for i, m in enumerate(models)}
    press = {m: 0.03 * (len(models) - i) for i, m in enumerate(models)}
    rng = random.Random(1)

    def sd(ma, sa, mb, sb):
        return 1 + 0.05 + sens[ma] + press[mb] + 0.1 * sb / 100 + rng.gauss(0, 0.002)

    rows = [{"device": "x", "model_a": ma, "share_a": sa, "batch_a": ba, "model_b": mb, "share_b": sb,
             "batch_b": bb, "slowdown_a": sd(ma, sa, mb, sb), "slowdown_b": sd(mb, sb, ma, sa)}
            for sa, sb, ma, ba, mb, bb in pair_configs(models, per_split=30)]
    fit, report = fit_and_evaluate(rows)
    assert report["n_test_pairs"] == round(0.25 * len(rows))
    assert report["heldout"]["mae"] < 0.01 < report["baseline_no_interference_heldout"]["mae"]
    assert fit.slowdown("e", 50, 4, [("a", 50, 4)]) > fit.slowdown("a", 50, 4, [("e", 50, 4)])


def test_plots_are_small(lenet_table, tmp_path):
    from profiler.plots import plot_tables

    paths = plot_tables(read_csv(lenet_table[0]), tmp_path)
    assert {p.name for p in paths} == {"latency_fp32.png", "throughput_fp32.png"}
    assert all(0 < p.stat().st_size < 200_000 for p in paths)


def test_plan_measures_a_missing_profile_only_when_asked_and_then_reuses_it(tmp_path):
    """`plan` on a device with no profile names what is missing; `--profile-missing` measures it once
    (into the deployment's profiles folder), and later plans reuse it."""
    import csv
    import os
    import subprocess
    import sys

    dep = tmp_path / "d.yaml"
    dep.write_text(f"""models:
  - {{name: lenet, rate: 20, slo_ms: 200}}
devices: cpu
profiles: {tmp_path / 'profiles'}
scheduler: {{shares: [50, 100], max_batch: 2}}
""")

    def plan(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "controlplane", "plan", "-f", str(dep), "--json", *extra],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})

    refused = plan()
    assert refused.returncode == 1 and "--profile-missing" in refused.stderr and not refused.stdout
    assert not (tmp_path / "profiles").exists() or not any((tmp_path / "profiles").rglob("*.csv"))
    first = plan("--profile-missing")
    assert first.returncode == 0, first.stderr
    assert "measuring them into" in first.stderr
    files = list((tmp_path / "profiles").glob("*/latency.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    assert sorted((int(r["share"]), int(r["batch"])) for r in rows) == [(50, 1), (50, 2), (100, 1), (100, 2)]
    assert all(r["model"] == "lenet" and float(r["p50_ms"]) > 0 for r in rows)
    second = plan()
    assert second.returncode == 0 and "measuring" not in second.stderr
    assert '"model": "lenet"' in second.stdout


def test_serving_profile_reads_tritons_time_per_batch(tmp_path):
    """Serving mode: b clients of one-row requests, Triton batches them into batches of b, and the row is
    Triton's own instance time per such batch (its batch_stats), resumable like the in-process table."""
    from profiler.serving import profile_serving

    csv = tmp_path / "latency.csv"
    res = profile_serving(["lenet"], device="cpu", shares=[50, 100], batches=[1, 4], out_csv=csv,
                          min_runs=3, warmup=1, point_budget_s=0.3)
    rows = {(r.model, r.share, r.batch): r for r in read_csv(csv)}
    assert set(rows) == {("lenet", s, b) for s in (50, 100) for b in (1, 4)}     # both shares' servers, started at once
    for r in rows.values():
        assert r.p50_ms > 0 and r.p50_ms == r.p99_ms == r.mean_ms and r.runs >= 1
        assert "batch_stats" in r.tool_version
    assert len(res.measured) == 4 and not res.skipped
    again = profile_serving(["lenet"], device="cpu", shares=[50, 100], batches=[1, 4], out_csv=csv)
    assert again.measured == []                       # resumed: nothing left to measure
    assert ProfileStore.load(csv).latency("lenet", 100, 4) > 0


def test_serving_profile_of_a_users_model_with_two_inputs(tmp_path):
    """A model of the user's repository (`repo add`), two inputs: the serving profile sends both, as
    `up` does on a GPU host for a model its profile lacks."""
    import torch

    from profiler.serving import profile_serving

    from helpers import run_cli

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    f = tmp_path / "pair.pt"
    torch.jit.save(torch.jit.script(Pair()), str(f))
    add = run_cli("repo", "add", "pair", "--torchscript", str(f), "--input", "A:FP32:3", "--input", "B:FP32:3",
                  "--max-batch", "4", "--repository", str(tmp_path / "repo"), timeout=120)
    assert add.returncode == 0, add.stdout + add.stderr
    csv = tmp_path / "latency.csv"
    res = profile_serving(["pair"], device="cpu", shares=[100], batches=[1, 2], out_csv=csv, min_runs=3, warmup=1,
                          point_budget_s=0.2, repository=tmp_path / "repo")
    assert not res.skipped and {(r.model, r.batch) for r in read_csv(csv)} == {("pair", 1), ("pair", 2)}


def test_profile_refuses_a_bad_pair_split_before_timing_anything(tmp_path):
    """``--splits``: shares past 100 % are refused by name before any latency is measured; a split whose
    shares add up to more than 100 % (clients running at once, each at its share) is a valid one."""
    from helpers import run_cli
    from profiler.cli import _splits
    from profiler.interference import pair_configs

    r = run_cli("profile", "--device", "cpu", "-m", "lenet", "--interference", "--splits", "20/200",
                "--out", str(tmp_path), timeout=120)
    assert r.returncode != 0 and "shares are 1-100 %, got '20/200'" in r.stdout + r.stderr
    assert not list(tmp_path.rglob("latency.csv"))
    assert _splits("20/20, 60/60,100/100") == [(20, 20), (60, 60), (100, 100)]
    cfgs = pair_configs(["a", "b"], [(60, 60)], batches=[1], per_split=3)
    assert len(cfgs) == 3 and all(c[:2] == (60, 60) for c in cfgs)


def test_interference_pairs_through_two_tritonservers(tmp_path):
    """``--interference --mode serving``: each pair's sides are gpu-let tritonservers (on the CPU side by
    side on its cores), each side timed alone and together from Triton's own statistics; the rows go to
    their own CSV, the fit beside them, and a second run measures nothing again (resumable)."""
    import csv
    import json

    from helpers import run_cli, tritonserver_pids

    args = ("profile", "--device", "cpu", "--mode", "serving", "-m", "lenet", "--interference", "--skip-latency",
            "--splits", "50/50", "--pairs-per-split", "2", "--pair-batches", "1,2", "--pair-duration-s", "0.3",
            "--no-plots", "--out", str(tmp_path))
    r = run_cli(*args, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [pairs] = list(tmp_path.rglob("interference_pairs_serving.csv"))
    rows = list(csv.DictReader(pairs.open()))
    assert len(rows) == 2 and not list(tmp_path.rglob("interference_pairs.csv"))
    for row in rows:
        assert (row["model_a"], row["share_a"], row["model_b"], row["share_b"]) == ("lenet", "50", "lenet", "50")
        assert row["batch_a"] in ("1", "2") and 0.2 < float(row["slowdown_a"]) < 10 and 0.2 < float(row["slowdown_b"]) < 10
    fit = json.loads((pairs.parent / "interference.json").read_text())
    assert fit["kind"] == "fitted-pairs" and fit["evaluation"]["n_pairs"] == 2
    assert fit["evaluation"]["pairs"] == "interference_pairs_serving.csv"
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0 and "0 point(s) to measure, 2 already done" in again.stdout + again.stderr
    assert len(list(csv.DictReader(pairs.open()))) == 2
    assert tritonserver_pids("gpulet-pairs-") == []
    bad = run_cli("profile", "--device", "cpu", "--mode", "bogus", "-m", "lenet", "--interference",
                  "--skip-latency", "--out", str(tmp_path / "x"), timeout=120)
    assert bad.returncode != 0 and "--mode must be inprocess or serving" in bad.stdout + bad.stderr
