"""``cbart serve --ray``: the same FastAPI server as a Ray Serve deployment, one runtime and scheduler (with its
in-flight batching) per replica, replicas sized by threads and scaled by Ray Serve's autoscaler.

On one machine ``ray.init()`` starts a local cluster. For several machines start Ray on each (``ray start
--head`` on one, ``ray start --address HEAD:6379`` on the others) and pass ``--ray-address auto``; every node
needs cbart installed and the export directory at the same path.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Any

from cbart.serving.app import create_app
from cbart.serving.config import ServerConfig


@dataclass
class RayServeOptions:
    replicas: int = 1
    max_replicas: int | None = None
    """Autoscale between ``replicas`` and ``max_replicas`` on ongoing requests per replica; None: fixed."""
    target_ongoing_requests: float = 8.0
    address: str | None = None
    """A running cluster (``auto`` or ``ray://host:10001``); None starts a local one."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")


def deployment(config: ServerConfig, options: RayServeOptions) -> Any:
    """The bound Ray Serve application: each replica builds the app (and loads the runtime) when it starts."""
    from ray import serve

    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }

    def build_app() -> Any:  # a plain function: Ray Serve calls builders (not partials) on each replica
        return create_app(config)

    ingress = serve.ingress(build_app)
    replica = serve.deployment(
        ingress(),
        name="cbart",
        ray_actor_options={"num_cpus": config.threads or 1},
        # the replica's own bounded queue answers 503 beyond this; Ray Serve's queue stays short
        max_ongoing_requests=config.max_queue + config.max_rows,
        **scaling,
    )
    return replica.bind()


def serve_on_ray(config: ServerConfig, options: RayServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start (or join) Ray, run the deployment behind Ray Serve's HTTP proxy on ``host:port``, block until
    SIGINT/SIGTERM, then shut the application down."""
    import ray
    from ray import serve

    ray.init(address=options.address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(config, options), name="cbart", route_prefix="/")
    stop = threading.Event()
    for sign in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sign, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
