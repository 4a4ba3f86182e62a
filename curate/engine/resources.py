"""How much of the cluster each stage of a phase gets, so that every stage can run at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from curate.engine.plan import stage_name
from curate.stages.base import Resources, Stage, StageConfig
from curate.stages.registry import stage_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fitted:
    """A stage's config with the resources it gets on this cluster."""

    cfg: StageConfig
    res: Resources

    def stage_class(self) -> type[Stage]:
        return stage_class(self.cfg.use)

    @property
    def is_actor(self) -> bool:
        """Model and I/O stages keep state per worker: they run in an actor pool."""
        return self.stage_class().stateful

    @property
    def holds_cpus(self) -> bool:
        """An actor pool on CPUs holds its CPU shares for the whole phase."""
        return self.is_actor and not self.res.num_gpus


def fit_resources(stages: list[StageConfig], cluster: dict[str, float]) -> list[Fitted]:
    """Each stage's resources, adjusted so every stage of a phase can run at once on this cluster.

    A stage that asks for a GPU on a cluster without one runs on CPU. Actor pools hold
    their CPUs for the whole phase, so if the smallest pools (one actor each) plus one
    task of the largest task stage do not fit, the actors' CPU shares are scaled down
    (the CPU count is a scheduling token in Ray; the threads are the OS's) — otherwise
    a small machine would deadlock with every CPU held by idle actors.
    """
    have_gpu = cluster.get("GPU", 0) > 0
    cpus = cluster.get("CPU", 1.0)
    out = []
    for cfg in stages:
        res = cfg.resources
        if res.num_gpus and not have_gpu:
            log.warning("stage %s asks for %s GPU but the cluster has none: running it on CPU",
                        stage_name(cfg), res.num_gpus)
            res = res.model_copy(update={"num_gpus": 0.0})
        out.append(Fitted(cfg, res))
    held = sum(f.res.num_cpus * (f.res.concurrency or 1) for f in out if f.holds_cpus)
    task_need = min(max([f.res.num_cpus for f in out if not f.is_actor] + [0.0]), cpus / 2)
    if any(f.holds_cpus for f in out) and held + task_need > cpus:
        factor = (cpus - task_need) / held
        out = [Fitted(f.cfg, f.res.model_copy(update={"num_cpus": round(f.res.num_cpus * factor, 3)}))
               if f.holds_cpus else f for f in out]
        log.info("scaled actor CPU shares by %.2f to fit %s CPUs", factor, cpus)
    return [Fitted(f.cfg, f.res.model_copy(update={"num_cpus": task_need}))
            if not f.is_actor and f.res.num_cpus > task_need > 0 else f for f in out]


def pool_bounds(f: Fitted, fitted: list[Fitted], cluster: dict[str, float]) -> tuple[int, int, int]:
    """(min, max, initial) actors of a stage's pool.

    A fixed ``concurrency`` is used as given. Otherwise the pool may grow to what the cluster
    holds, and starts with every actor that fits beside one actor of every other pool and one
    task: the autoscaler would add the second only after the first has loaded its model.
    """
    if f.res.concurrency:
        return f.res.concurrency, f.res.concurrency, f.res.concurrency
    if f.res.num_gpus:
        hi = int(cluster.get("GPU", 0) // f.res.num_gpus)
    else:
        hi = int(cluster.get("CPU", 1) // max(f.res.num_cpus, 0.01))
    hi = max(1, hi)
    cpus = cluster.get("CPU", 1.0)
    others = sum(o.res.num_cpus * (o.res.concurrency or 1) for o in fitted if o is not f and o.holds_cpus)
    tasks = max([o.res.num_cpus for o in fitted if not o.is_actor] + [0.0])
    free = max(1, int((cpus - others - tasks) // max(f.res.num_cpus, 0.01)))
    return 1, hi, max(1, min(hi, free))
