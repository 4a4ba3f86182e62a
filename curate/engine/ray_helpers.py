"""Ray Data's helper actors, answered in the driver when curate runs its own single-node Ray.

For any dataset it executes, Ray Data (2.5x) starts three detached actors:

- ``_StatsActor``: hands out dataset ids and collects every dataset's metrics for the Ray
  dashboard's Prometheus export;
- ``ActorLocationTracker``: which node each pool actor lives on, for locality-aware scheduling;
- ``AutoscalingCoordinator``: divides the cluster's resources between datasets running at once
  and asks the autoscaler for more.

Each is a worker process of its own that imports Ray Data (pandas, pyarrow: about 2.5 s of CPU)
and then serves calls the driver pickles for it (the stats actor gets every operator's metrics
several times a second). On a node that curate started for this run there is no dashboard to feed,
no autoscaler to ask and one node to be on, so the answers are known in advance: a dataset gets
the whole node, every actor is on it, ids count up. :func:`answer_in_driver` patches Ray Data's
three ``get_or_create`` points to return objects that answer exactly that, in this process.
Measured on a 20,000-image download run on 2 CPUs: the three processes had used 6.8 s of CPU
(6 % of the run's).

Each patch is applied only where Ray Data has the function or class it replaces, by the name and
signature it had when this was written; anything else (another Ray layout) keeps its actors, as
does a run with ``--debug`` or ``CURATE_RAY_LOGS=1``, and a run on a cluster.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

#: The resources a dataset is given (what Ray Data's coordinator reserves for one that asks for the
#: rest of the cluster): these four are all its resource manager reads.
STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class _Method:
    """An actor method as Ray Data calls it: ``.remote(...)`` gives an ``ObjectRef`` (or None for
    the calls whose result it never reads)."""

    def __init__(self, fn: Any, *, ref: bool) -> None:
        self._fn, self._ref = fn, ref

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        value = self._fn(*args, **kwargs)
        if not self._ref:
            return None
        import ray

        return ray.put(value)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


class LocalStats:
    """``_StatsActor`` for a run with no dashboard: dataset ids count up, metrics go nowhere."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def _next_id(self) -> str:
        with self._lock:
            return str(next(self._ids))

    @property
    def gen_dataset_id(self) -> _Method:
        return _Method(self._next_id, ref=True)

    register_dataset = update_execution_metrics = update_iteration_metrics = \
        property(lambda self: _Method(_ignore, ref=False))


class LocalLocations:
    """``ActorLocationTracker`` for one node: every actor is on it. Travels to the pool's actors (they
    report their node at start), where reporting does nothing."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    @property
    def update_actor_location(self) -> _Method:
        return _Method(_ignore, ref=False)

    @property
    def get_actor_locations(self) -> _Method:
        return _Method(lambda ids: {i: self.node_id for i in ids}, ref=True)


class LocalCoordinator:
    """The autoscaling coordinator for one node and no autoscaler: every request is granted the
    whole node, as Ray Data's own grants a dataset that asks for the rest of an idle cluster."""

    def __init__(self, node_id: str, resources: dict[str, float]) -> None:
        self._reserved = {node_id: {k: v for k, v in resources.items() if k in STANDARD_RESOURCES}}

    def request_resources(self, *args: Any, **kwargs: Any) -> None:
        return None

    def cancel_request(self) -> None:
        return None

    def get_reserved_resources(self) -> dict[str, dict[str, float]]:
        return {node: dict(res) for node, res in self._reserved.items()}


def _patch(module_name: str, attr: str, value: Any, patched: list[str]) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    if hasattr(module, attr):
        setattr(module, attr, value)
        patched.append(f"{module_name}.{attr}")


def answer_in_driver() -> list[str]:
    """Replace Ray Data's three helper actors with in-process answers for the single-node Ray this
    process started; returns what was patched (for the log and the test)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    stats, locations = LocalStats(), LocalLocations(node_id)
    patched: list[str] = []
    base = "ray.data._internal"
    _patch(f"{base}.stats", "get_or_create_stats_actor", lambda: stats, patched)
    for module in (f"{base}.execution.operators.actor_pool_map_operator", f"{base}.utils.cached_ray_internals"):
        _patch(module, "get_or_create_actor_location_tracker", lambda: locations, patched)

    def coordinator(*args: Any, **kwargs: Any) -> LocalCoordinator:
        return LocalCoordinator(node_id, resources)

    for module in (f"{base}.cluster_autoscaler.rate_based_cluster_autoscaler",
                   f"{base}.cluster_autoscaler.default_cluster_autoscaler_v2"):
        _patch(module, "DefaultAutoscalingCoordinator", coordinator, patched)
    log.debug("Ray Data's helper actors answered in the driver: %s", ", ".join(patched) or "none")
    return patched
