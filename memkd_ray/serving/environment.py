"""Ray and Ray Serve settings for serving, read by each Ray process when it starts. No Ray here.

`memkd-ray serve` puts them in its environment before it starts a local Ray; a cluster that
the service joins sets them on its nodes (the KubeRay manifest does, on every pod).
"""

from __future__ import annotations

import os

THROUGHPUT_SETTINGS = {
    # Ray Serve's throughput mode (documented since Ray 2.56): user code on the replica's own
    # event loop, request logs buffered, the garbage collector frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but not its direct ingress, which has every replica listen on a port of its own
    # (30000 and up) for an HAProxy in front, where the service promises one port.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # The HTTP proxy hands requests to the replica over gRPC rather than as actor calls.
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    # Image bodies (100 KB to a few MB) pass between proxy and replica inline rather than
    # through the shared-memory object store (Ray's default limit is 100 KB).
    "RAY_max_direct_call_object_size": str(4 * 1024 * 1024),
}


def use_throughput_settings() -> None:
    """Put THROUGHPUT_SETTINGS in this process's environment, for the Ray it will start; a
    variable the user set stays as set."""
    for name, value in THROUGHPUT_SETTINGS.items():
        os.environ.setdefault(name, value)
