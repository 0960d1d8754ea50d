"""``ray start`` that keeps ``127.0.0.1`` as the node address (run as a script by cluster.local).

Ray 2.60's ``ray start`` replaces ``localhost``/``127.0.0.1`` in ``--node-ip-address`` and
``--address`` by the machine's routable IP (``services.resolve_ip_for_localhost``), so the GCS,
raylets and agents would listen on every interface. Ray's C++ servers bind loopback only when
the node address *is* ``127.0.0.1``; that is what a one-machine test cluster wants. This wrapper
keeps the address as given and allows worker nodes although the node processes carry
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which makes every Ray client on this machine resolve
``127.0.0.1`` to itself). Everything else is the stock ``ray start``; Ray is pinned (==2.60.0)
and the attributes are checked so a Ray upgrade fails loudly here instead of silently binding
the public interface.
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main


def _keep_loopback(host: str) -> str:
    """``resolve_ip_for_localhost`` replacement: ``localhost`` -> ``127.0.0.1``, else as given."""
    if not host:
        raise ValueError(f"Malformed host: {host!r}")
    return "127.0.0.1" if host == "localhost" else host


if __name__ == "__main__":
    for module, name in ((services, "resolve_ip_for_localhost"), (ray_constants, "ENABLE_RAY_CLUSTER")):
        if not hasattr(module, name):
            sys.exit(
                f"cluster._raystart: {module.__name__}.{name} is gone (Ray upgraded?); refusing to start"
            )
    services.resolve_ip_for_localhost = _keep_loopback
    ray_constants.ENABLE_RAY_CLUSTER = True  # several nodes on one machine is the point here
    sys.argv[0] = "ray"
    sys.exit(main())
