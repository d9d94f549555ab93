"""Settings of `rugpt serve --replicas N` and their mapping onto Ray Serve's own deployment options.

Nothing here imports Ray: the mapping is a plain dict, so `--help` and the tests work without it. The
fields' descriptions are the `rugpt serve --help` texts of these options (cli/options.py makes them). Each
option says which Ray Serve setting it becomes; rugpt re-implements none of them (routing, queueing in
front of the replicas, autoscaling, restarting a dead replica are Ray Serve's).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rugpt.errors import UsageError
from rugpt.serve.settings import ServerSettings

# Requests a replica takes beyond what its scheduler holds (running rows plus waiting requests): room for a
# DELETE, /metrics or /health call, and for a request its scheduler answers 429 at once, while it is full.
CONTROL_HEADROOM = 8
# Ray's backpressure answer cannot know when a replica frees up; one second is rugpt's "retry soon".
BACKPRESSURE_RETRY_AFTER = 1.0


class ClusterSettings(BaseModel):
    """Where and how many copies of the server run; the server's own settings stay in ServerSettings."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, le=256, description=(
        "serve on Ray Serve with this many replicas, each loading the model with its own batching scheduler, "
        "behind Ray's HTTP proxy (Ray Serve's num_replicas; the starting count when autoscaling); without it and "
        "the options below, one process without Ray"))
    min_replicas: int | None = Field(None, ge=1, description=(
        "autoscale: fewest replicas (Ray Serve's autoscaling_config.min_replicas)"))
    max_replicas: int | None = Field(None, ge=1, description=(
        "autoscale: most replicas; Ray adds one while replicas hold more than a full batch each "
        "(autoscaling_config.max_replicas, target_ongoing_requests = --max-batch)"))
    ray_address: str | None = Field(None, description=(
        "join this running Ray cluster (e.g. auto, or the head's ray://HOST:10001) instead of starting a local one"))
    max_ongoing_per_replica: int | None = Field(None, ge=1, description=(
        "most requests Ray hands one replica at once (Ray Serve's max_ongoing_requests; default: --max-batch + "
        f"--max-waiting + {CONTROL_HEADROOM}, room for cancel, health and metrics calls)"))
    max_queued: int | None = Field(None, ge=1, description=(
        "most requests each Ray HTTP proxy holds while every replica is at --max-ongoing-per-replica; more are "
        "answered 429 with Retry-After (Ray Serve's max_queued_requests; default: --max-waiting, at least 1)"))
    cpus_per_replica: float = Field(1.0, gt=0, description=(
        "CPU cores Ray reserves for each replica; its torch uses as many threads (ray_actor_options.num_cpus)"))
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica (num_gpus)")

    @model_validator(mode="after")
    def _bounds_hold(self) -> ClusterSettings:
        low, high = self.replica_bounds()
        if low > high:
            raise ValueError(f"--min-replicas {low} is more than --max-replicas {high}")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas: both `replicas` unless autoscaling bounds are given."""
        if not self.autoscaling:
            return self.replicas, self.replicas
        low = self.min_replicas or 1
        return low, self.max_replicas or max(self.replicas, low)

    def deployment_options(self, server: ServerSettings) -> dict:
        """Keyword arguments of `serve.deployment(...)` for replicas that serve with `server`'s settings."""
        options = {
            "max_ongoing_requests": self.max_ongoing_per_replica
            or server.max_batch + server.max_waiting + CONTROL_HEADROOM,
            "max_queued_requests": self.max_queued or max(1, server.max_waiting),
            # Ray's own refusal (every replica full, the proxy's queue too) is a 429 with Retry-After, like
            # rugpt's; cluster_proxy.py gives its body OpenAI's error shape.
            "backpressure_config": {"status_code": 429, "retry_after_s": BACKPRESSURE_RETRY_AFTER},
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            # A replica whose decode loop died fails its health check within seconds and is replaced.
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": server.shutdown_grace + 5,
        }
        if self.autoscaling:
            low, high = self.replica_bounds()
            options["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": server.max_batch}
        else:
            options["num_replicas"] = self.replicas
        return options

    def torch_threads(self) -> int:
        return max(1, math.floor(self.cpus_per_replica))


CLUSTER_OPTIONS = tuple(ClusterSettings.model_fields)


def cluster_from_options(options: dict) -> ClusterSettings | None:
    """The cluster settings of the options given on the command line; None when none was (one process)."""
    given = {name: options[name] for name in CLUSTER_OPTIONS if options.get(name) is not None}
    if not given:
        return None
    try:
        return ClusterSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise UsageError(where + first["msg"].removeprefix("Value error, ")) from None
