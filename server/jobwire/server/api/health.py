"""grpc.health.v1.Health: grpcio-health-checking's servicer, plus the List RPC it leaves unimplemented.

Health stays open to every caller (no credentials needed): load balancers and orchestrators probe it.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


class Health(HealthServicer):  # type: ignore[misc]  # grpc_health ships no type hints
    """Check, Watch and List; the statuses are set by the server as it starts and drains."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # The library keeps the statuses in _server_status and offers no accessor for all of them.
        statuses = {
            service: health_pb2.HealthCheckResponse(status=status)
            for service, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)
