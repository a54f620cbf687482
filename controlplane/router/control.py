"""The repository API's way from a router process to the controller: files in one directory.

``POST /v2/repository/models/{m}/load`` and ``/unload`` (and their gRPC twins) change what runs, and
only the controller can do that (re-plan, start and stop gpu-lets, new routing tables). The router
process that gets the request leaves ``req-<id>.json`` in the deployment's control directory; the
controller's supervision loop takes requests one at a time (within a second), applies them like
``controlplane apply`` and leaves ``res-<id>.json``; the router process answers from it. Files, not
a socket, because any of the router's processes may take the request and the controller already
watches its run directory for ``apply``. ``/v2/repository/index`` reads the repository's directory
itself (a model added with `controlplane repo add` while the deployment runs is listed at once).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from ..paths import write_json
from .errors import RouterError

#: how long a router process waits for the controller to load a model (profiling it where its
#: profile is missing, then starting its gpu-lets)
LOAD_TIMEOUT_S = 900.0
POLL_S = 0.1


class RepositoryControl:
    """A router process's side: send load/unload requests, read the repository index."""

    def __init__(self, root: str | Path, repository: str | Path, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.root = Path(root)
        self.repository = Path(repository)
        self.timeout_s = timeout_s

    def models(self) -> list[str]:
        """The names of the repository's models (directories with a config.pbtxt)."""
        return sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt"))

    async def request(self, action: str, model: str, override: dict | None = None) -> str:
        """Ask the controller to ``action`` ('load' or 'unload') ``model`` (``override``: slo_ms, rate,
        max_batch from a load's config); its message on success.

        Raises :class:`RouterError` with the controller's status and message when it refuses, 504 when
        it does not answer within ``timeout_s``."""
        rid = uuid.uuid4().hex
        write_json(self.root / f"req-{rid}.json", {"action": action, "model": model, "override": override or {}})
        res = self.root / f"res-{rid}.json"
        deadline = time.monotonic() + self.timeout_s
        while not res.exists():
            if time.monotonic() > deadline:
                (self.root / f"req-{rid}.json").unlink(missing_ok=True)
                raise RouterError(504, f"{action} of {model!r}: the controller did not answer within "
                                       f"{self.timeout_s:g} s")
            await asyncio.sleep(POLL_S)
        doc = json.loads(res.read_text())
        res.unlink(missing_ok=True)
        if not doc.get("ok"):
            raise RouterError(int(doc.get("status", 400)), doc.get("error", f"{action} of {model!r} failed"))
        return doc.get("message", "")


def take_requests(root: Path) -> list[tuple[Path, dict]]:
    """The controller's side: pending requests, oldest first (each file is removed when answered)."""
    out = []
    for p in sorted(root.glob("req-*.json"), key=lambda p: p.stat().st_mtime if p.exists() else 0):
        try:
            out.append((p, json.loads(p.read_text())))
        except (FileNotFoundError, ValueError):
            continue
    return out


def answer(req: Path, ok: bool, status: int = 200, message: str = "", error: str = "") -> None:
    """Leave the result beside a request and remove the request."""
    rid = req.name.removeprefix("req-").removesuffix(".json")
    write_json(req.with_name(f"res-{rid}.json"), {"ok": ok, "status": status, "message": message, "error": error})
    req.unlink(missing_ok=True)
