"""RouterServer: the HTTP (uvicorn) and gRPC (grpc.aio) sides on one event loop, one Router;
with ``workers`` > 1, that many processes share the ports.

One Python process forwarded about 1,650 gRPC requests/s of the gpu-run mix (mostly
600 KB images) on an H200 host (docs/benchmarks.md, "Serving"): below what one GPU serves. So the router runs as
several processes, each a full router (its own connections, health checks and
event loop) on the same HTTP and gRPC ports (``SO_REUSEPORT``: the kernel spreads
connections over them); their metrics are summed through prometheus_client's
multiprocess mode. The process that starts them (in ``up``, the controller) is
one of them; the others are children that die with it (PR_SET_PDEATHSIG: with the thread
that started them, i.e. when this router stops or its process dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import grpc
import uvicorn

from ..spec import RouterSpec
from .core import Router, RouterOptions, multiprocess_metrics
from .grpc_service import add_to_server
from .http import create_app
from .table import RoutingTable

log = logging.getLogger("controlplane.router")

GRPC_MAX_MESSAGE = 256 * 1024 * 1024
TABLE_FILE = "table.pkl"     # (generation, RoutingTable), written by update(); trusted: the router's own temp dir
TABLE_POLL_S = 0.1
CHILD_POLL_S = 0.5       # how often the first router process looks for dead ones to replace
CONTROLLER_METRICS = "controller.prom"   # the controller's metrics (text format), appended to every process's /metrics


def _ack(table_dir: Path, pid: int) -> int:
    """The last table generation router process ``pid`` took up (0: none yet)."""
    try:
        return int((table_dir / f"ack-{pid}").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def default_workers() -> int:
    """One router process per 2 CPU cores, 1 to 8.

    An image request costs a router process about 1 ms of CPU (receiving and re-sending 600 KB over
    loopback TCP; `benchmarks/router_cpu.py --model mobilenet_v2`), and a tight-SLO model's small request
    that arrives behind it on the same event loop waits: fewer requests per process, shorter waits."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphaned router workers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(table: RoutingTable, spec: RouterSpec, options: RouterOptions, metrics_dir: str,
                 table_dir: str) -> None:
    """A router process beside the first one: same ports (SO_REUSEPORT), metrics to the shared directory,
    new routing tables from ``table_dir``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C goes to the controller, which stops us
    server = RouterServer(table, spec, options)
    server.options = options                          # its share of the in-flight limits: 1 / processes
    server._reuse_port = True
    server._metrics_dir = metrics_dir
    server._own_metrics_dir = False
    server._table_dir = table_dir
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.run_until_complete(server.serve(stop))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where installed (a large share of the router's per-request cost is the loop), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: the owner of ``stop`` decides when to exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class RouterServer:
    """The router: ``await serve(stop)`` on the current loop, or ``start_in_thread()`` / ``stop()``.

    Ports 0 pick free ports; the bound ones are in ``http_port`` / ``grpc_port``
    once ``await started()`` returns (or after ``start_in_thread()``).
    """

    def __init__(self, table: RoutingTable, spec: RouterSpec | None = None,
                 options: RouterOptions | None = None) -> None:
        self.table = table
        self.spec = spec or RouterSpec()
        self.options = options or RouterOptions(max_body_bytes=self.spec.max_body_bytes)
        self.host = self.spec.host
        self.http_port: int = self.spec.http_port
        self.grpc_port: int = self.spec.grpc_port
        self.router: Router | None = None
        self.workers = self.spec.workers or default_workers()
        if self.options.processes != self.workers:
            self.options = dataclasses.replace(self.options, processes=self.workers)
        self._reuse_port = self.workers > 1
        self._children: list[multiprocessing.Process] = []
        self._metrics_dir: str | None = None
        self._own_metrics_dir = True
        self._table_dir: str | None = None      # where update() publishes tables; every process watches it
        self._generation = 0
        self._started: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread_started = threading.Event()

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    async def started(self) -> None:
        while self._started is None:
            await asyncio.sleep(0.01)
        await self._started.wait()

    async def serve(self, stop: asyncio.Event) -> None:
        self._started = asyncio.Event()
        self._stop = stop
        own_table_dir = self._table_dir is None
        if own_table_dir:
            self._table_dir = tempfile.mkdtemp(prefix="gpulet-router-table-")
        if self.workers > 1 and self._metrics_dir is None:
            self._metrics_dir = tempfile.mkdtemp(prefix="gpulet-router-metrics-")
        if self._metrics_dir is not None:
            with multiprocess_metrics(self._metrics_dir):
                router = self.router = Router(self.table, self.options, self._metrics_dir)
                await router.start()
        else:
            router = self.router = Router(self.table, self.options)
            await router.start()
        # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections (with proto 0 it
        # does not, and every response then waits ~40 ms on delayed ACKs); set it here too.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        grpc_server = None
        watch = keep = None
        try:
            sock.bind((self.host, self.http_port))
            sock.listen(2048)
            sock.setblocking(False)
            self.http_port = sock.getsockname()[1]
            grpc_server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", min(self.options.max_body_bytes, GRPC_MAX_MESSAGE)),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ])
            add_to_server(grpc_server, router)
            port = grpc_server.add_insecure_port(f"{self.host}:{self.grpc_port}")
            if port == 0:
                raise OSError(f"cannot bind gRPC port {self.host}:{self.grpc_port}")
            self.grpc_port = port
            await grpc_server.start()
            router.metrics.extra_path = Path(self._table_dir) / CONTROLLER_METRICS
            app = create_app(self.table, self.spec, router=router)
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=2, loop="none")
            server = _Uvicorn(config)
            task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            if task.done():
                task.result()
                raise RuntimeError("HTTP server exited at start")
            self._start_children()
            watch = asyncio.get_running_loop().create_task(self._watch_table(router), name="router-table")
            if self._children:
                keep = asyncio.get_running_loop().create_task(self._keep_children(), name="router-processes")
            log.info("router: HTTP on %s, gRPC on %s, %d process(es)", self.http_url, self.grpc_url, self.workers)
            self._started.set()
            stop_wait = asyncio.get_running_loop().create_task(stop.wait())
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            stop_wait.cancel()
            await task
        finally:
            for t in (watch, keep):
                if t is not None:
                    t.cancel()
            self._stop_children()
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            sock.close()
            await router.close()
            if self._metrics_dir is not None and self._own_metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if own_table_dir:
                shutil.rmtree(self._table_dir, ignore_errors=True)
                self._table_dir = None

    # ------------------------------------------------------------------ new routing tables

    async def _watch_table(self, router: Router) -> None:
        """Take up each table :meth:`update` publishes, then say so (``ack-<pid>`` holds its generation)."""
        path = Path(self._table_dir) / TABLE_FILE
        stamp = None
        seen = 0
        while True:
            await asyncio.sleep(TABLE_POLL_S)
            try:
                st = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if st == stamp:
                continue
            stamp = st
            gen, table = pickle.loads(path.read_bytes())
            if gen <= seen:
                continue
            await router.set_table(table)
            self.table, seen = table, gen
            ack = Path(self._table_dir) / f"ack-{os.getpid()}"
            tmp = ack.with_name(f".{ack.name}.tmp")
            tmp.write_text(str(gen))
            tmp.replace(ack)
            log.info("router: routing table %d (%d model(s))", gen, len(table.models))

    def update(self, table: RoutingTable, timeout: float = 30.0) -> None:
        """Route by ``table`` in every router process; return once all of them do (TimeoutError if not).

        Thread-safe; for the process that started the router. Each process checks for a new table
        every TABLE_POLL_S: a gpu-let that leaves the table gets no request once this returns."""
        if self._table_dir is None:
            raise RuntimeError("the router is not running")
        self._generation += 1
        gen = self._generation
        d = Path(self._table_dir)
        tmp = d / f".{TABLE_FILE}.{gen}.tmp"
        tmp.write_bytes(pickle.dumps((gen, table)))
        tmp.replace(d / TABLE_FILE)
        procs = list(self._children)       # a replacement started from now on reads this table at its start
        deadline = time.monotonic() + timeout
        while True:
            late = [pid for pid in [os.getpid()] + [p.pid for p in procs if p.is_alive()] if _ack(d, pid) < gen]
            if not late:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"router process(es) {late} did not take up routing table {gen} in {timeout:g} s")
            time.sleep(TABLE_POLL_S / 2)
        self.table = table

    def publish_metrics(self, text: bytes) -> None:
        """Metrics of whoever runs the router (the controller's re-planning), in Prometheus text format:
        every router process's ``/metrics`` ends with them from now on."""
        if self._table_dir is None:
            raise RuntimeError("the router is not running")
        path = Path(self._table_dir) / CONTROLLER_METRICS
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(text)
        tmp.replace(path)

    def _start_children(self) -> None:
        """The other router processes, on the ports this one bound (known only now when 0 was asked)."""
        for i in range(self.workers - 1):
            self._children.append(self._child(i))

    def _child(self, i: int) -> multiprocessing.Process:
        spec = self.spec.model_copy(update={"http_port": self.http_port, "grpc_port": self.grpc_port, "workers": 1})
        p = multiprocessing.get_context("spawn").Process(
            target=_worker_main, args=(self.table, spec, self.options, self._metrics_dir, self._table_dir),
            name=f"router-{i + 1}", daemon=True)
        p.start()
        return p

    def alive(self) -> bool:
        """Whether the router (its first process, in this one) still serves."""
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def _keep_children(self) -> None:
        """Start a new router process for each one that dies (same ports; it takes up the current table
        from the table directory). This runs in the first process's own loop, apart from the controller's
        supervision, where restarting a gpu-let can take tens of seconds."""
        while True:
            await asyncio.sleep(CHILD_POLL_S)
            for i, p in enumerate(self._children):
                if not p.is_alive():
                    log.warning("router process %s (pid %s) exited with %s; starting another", p.name, p.pid,
                                p.exitcode)
                    self._children[i] = self._child(i)
                    log.warning("router process %s: pid %s", p.name, self._children[i].pid)

    def _stop_children(self) -> None:
        for p in self._children:
            if p.is_alive():
                p.terminate()
        for p in self._children:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)
        self._children.clear()

    # ------------------------------------------------------------------ thread wrapper

    def start_in_thread(self, timeout: float = 30.0) -> "RouterServer":
        """Run the router in a background thread with its own event loop; return once it listens."""

        def run() -> None:
            loop = new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            stop = asyncio.Event()
            self._stop = stop
            self._thread_started.set()
            try:
                loop.run_until_complete(self.serve(stop))
            except BaseException as e:  # noqa: BLE001
                self._error = e
                if self._started is not None and self._started.is_set():  # startup errors go to the caller
                    log.exception("router stopped with an error")
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="router", daemon=True)
        self._thread.start()
        self._thread_started.wait(timeout)
        deadline = timeout

        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline:
            if self._error is not None:
                raise RuntimeError(f"router failed to start: {self._error}") from self._error
            if self._started is not None and self._started.is_set():
                return self
            if not self._thread.is_alive():
                raise RuntimeError(f"router failed to start: {self._error}")
            time.sleep(0.01)
        self.stop()
        raise TimeoutError("router did not start in time")

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "RouterServer":
        return self.start_in_thread()

    def __exit__(self, *exc) -> None:
        self.stop()
