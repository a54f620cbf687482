"""The router: KServe v2 (HTTP and gRPC) in front of the gpu-lets; requests pass through to Triton.

Public API::

    table = RoutingTable.from_plan(plan, endpoints, repo, deployment)
    server = RouterServer(table, deployment.router)
    await server.serve(stop_event)          # or: server.start_in_thread(); ...; server.stop()
    app = create_app(table, deployment.router)   # the HTTP side alone (FastAPI)
"""

from .core import Router, RouterOptions
from .errors import Dropped, RouterError
from .http import create_app
from .server import RouterServer
from .table import GpuletRoute, ModelRoute, RoutingTable

__all__ = ["RouterServer", "create_app", "RoutingTable", "ModelRoute", "GpuletRoute", "Router",
           "RouterOptions", "RouterError", "Dropped"]
