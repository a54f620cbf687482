"""What every command of the CLI shares: the consoles, the `-f` option, failing with a message,
reading a deployment file. Commands in other modules (compose, loadgen, profile) import it from
here rather than from each other."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from .spec import Deployment, SpecError, load_deployment

# Piped output (logs, `--detach`) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 160)

DEFAULT_DEPLOYMENT = "deployments/default.yaml"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

FileOpt = typer.Option(DEFAULT_DEPLOYMENT, "-f", "--file", help="deployment file (YAML)")


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print `error: msg` to stderr and exit with `code` (2: bad input, 1: cannot do it now)."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def read_deployment(path: str) -> Deployment:
    """The deployment file, its model names checked against its repository; exits 2 naming the
    file, the field and the problem when it is invalid."""
    from .repository import RepositoryError, SourceRepository, repository_for, with_repository_slos

    p = Path(path)
    if not p.exists() and path == DEFAULT_DEPLOYMENT and (PROJECT_ROOT / path).exists():
        p = PROJECT_ROOT / path
    try:
        raw = load_deployment(p)  # field errors first, then model names against the repository
        repo = SourceRepository(raw.repository)
        dep = load_deployment(p, known_models=repo.names())
        return with_repository_slos(dep, repository_for(dep), str(p))     # SLOs the file leaves to the repository
    except (SpecError, RepositoryError) as e:
        fail(str(e))


def plan_or_load(dep: Deployment, plan_file: Path | None, devices=None):
    """The plan in ``plan_file`` (JSON), else the deployment planned for ``devices`` (default: its own);
    exits 1 naming why it cannot be planned. For the commands that render a plan (compose, render)."""
    from .spec import load_plan

    if plan_file:
        return load_plan(plan_file)
    from . import devices as devmod
    from .planning import make_plan

    try:
        return make_plan(dep, devices or devmod.resolve(dep.devices), log=lambda m: err.print(m))
    except ValueError as e:
        fail(str(e), 1)
