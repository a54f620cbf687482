"""`controlplane loadgen`: open-loop load through the router (CLI glue over controlplane.loadgen)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def loadgen(
    file: str = typer.Option("deployments/default.yaml", "-f", "--file", help="deployment file (rates, SLOs, router)"),
    url: Optional[str] = typer.Option(None, "--url", help="host:port; default: the running deployment's router"),
    protocol: str = typer.Option("http", "--protocol", help="http or grpc"),
    rate: Optional[list[str]] = typer.Option(None, "--rate", help="MODEL=REQ_PER_S (repeatable); default: the deployment's rates"),
    duration: float = typer.Option(10.0, "--duration", help="seconds of load"),
    arrival: str = typer.Option("poisson", "--arrival", help="poisson or constant"),
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="processes sending the load; default: enough for the offered load "
                                       "(~400 req/s or ~150 MB/s each), at most the CPU count; 1: this process"),
    timeout: float = typer.Option(30.0, "--timeout", help="client timeout per request in seconds (then an error)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON (stdout) instead of the table"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the result as JSON to this file"),
    png: Optional[Path] = typer.Option(None, "--png", help="write a latency CDF plot"),
) -> None:
    """Send Poisson (or constant-rate) load per model; report offered and sent rate, throughput, p50/p99,
    SLO attainment, drops, and BEHIND where the load generator could not keep its schedule."""
    from rich.console import Console

    from . import loadgen as lg
    from .cli_base import fail, read_deployment
    from .deploy import read_state
    from .paths import RunPaths

    dep = read_deployment(file)
    rates = {m.name: m.rate for m in dep.models}
    if rate:
        rates = {}
        for item in rate:
            name, _, value = item.partition("=")
            try:
                rates[name] = float(value)
            except ValueError:
                fail(f"--rate {item!r}: expected MODEL=REQ_PER_S")
    if url is None:
        state = read_state(RunPaths.for_deployment(dep))
        if not state:
            fail(f"deployment {dep.name!r} is not running; start it with `controlplane up -f {file}` or pass --url", 1)
        r = state.router
        url = f"{r.host}:{r.grpc_port if protocol == 'grpc' else r.http_port}"
    slo = {m.name: m.slo_ms for m in dep.models}
    try:
        result = lg.run(url, rates, duration, protocol=protocol, arrival=arrival, slo_ms=slo, seed=seed,
                        timeout_s=timeout, workers=workers)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result.to_dict(False), indent=2))
    else:
        Console().print(lg.render_table(result))
    if out:
        lg.write_json(result, out)
    if png:
        lg.write_cdf_png(result, png)
