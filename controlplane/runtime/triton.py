"""Finding a tritonserver and preparing what it needs to run the python backend.

The pip-installable Triton is the one inside the ``nvidia-pytriton`` wheel
(Triton 2.51, python backend only). Its python backend needs a stub binary built
for the Python that runs ``model.py``; the wheel ships one per Python version
under ``python_backend_stubs/<ver>/``. Rather than writing into site-packages,
we assemble a backend directory in the cache (links to the wheel's backend plus
the stub that matches the running interpreter) and pass it with
``--backend-directory``.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir


class TritonNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path | None       # --backend-directory, or None to use the binary's default
    lib_dirs: tuple[Path, ...]    # prepended to LD_LIBRARY_PATH


def _pytriton_root() -> Path | None:
    """The wheel's tritonserver folder, found without importing pytriton (which pulls in its client deps)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).resolve() / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _python_backend_dir(root: Path) -> Path:
    """A backend directory whose python backend has the stub for this interpreter."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonNotFound(f"nvidia-pytriton has no python-backend stub for Python {ver} ({stub})")
    dest = cache_dir() / "triton-backends" / ver
    py = dest / "python"
    if not (py / "triton_python_backend_stub").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "python").mkdir(parents=True)
        for f in (root / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / "python" / f.name)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def find_tritonserver(explicit: str | None = None) -> TritonInstall:
    """The deployment's binary if given, else nvidia-pytriton's, else one on PATH."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")
    lib_dirs: tuple[Path, ...] = (libdir,)   # the stub links against libpython of this interpreter
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise TritonNotFound(f"tritonserver not found at {explicit}")
        return TritonInstall(path, None, lib_dirs)
    root = _pytriton_root()
    if root is not None:
        # The wheel's binaries find their bundled libraries through $ORIGIN-relative rpaths,
        # which the copied stub loses: name that folder explicitly.
        bundled = root.parent.parent / "nvidia_pytriton.libs"
        return TritonInstall(root / "bin" / "tritonserver", _python_backend_dir(root), (bundled, *lib_dirs))
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, lib_dirs)
    raise TritonNotFound(
        "no tritonserver found: install the nvidia-pytriton wheel (pip install nvidia-pytriton), "
        "put tritonserver on PATH, or set runtime.tritonserver in the deployment"
    )


def python_env() -> dict[str, str]:
    """Environment so the python-backend stub imports this interpreter's packages (torch, numpy)."""
    prefix = Path(sys.prefix)
    env = {"PATH": f"{prefix / 'bin'}:{os.environ.get('PATH', '')}"}
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = str(prefix)
    return env
