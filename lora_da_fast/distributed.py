"""torch.distributed support, public face: what a script run under ``torchrun`` (or ``accelerate
launch``) needs, gathered from the layers that implement it.

- Process group: :func:`init_from_env`, :func:`shutdown`, :func:`is_active`, :func:`rank`,
  :func:`world_size`, :func:`is_main`, :func:`barrier`, :func:`broadcast_from_main`,
  :func:`min_over_ranks`; :func:`local_devices` and :func:`max_memory_for_rank` for a model split over
  this rank's GPUs. Failure handling: :func:`guard`, :func:`step`, :func:`report_failure`,
  :class:`DistributedError` (see :mod:`lora_da_fast.comm`, whose ``BUCKET_BYTES`` sets the bucket size).
- Data-parallel statistics: the engine gives each rank a round-robin :func:`shard` of the usable
  examples and :func:`reduce_over_ranks` sums the accumulators (one triangle of each ``Z``, bucketed);
  ``collect_statistics``, ``initialize_lora_da`` and the CLI do this by themselves under a process group.
- Sharded solve: :func:`solve_sharded` assigns the input groups to ranks by estimated cost
  (:func:`assign_groups`, :func:`estimate_cost`), solves each share locally and gathers the factors.

docs/distributed.md has the launch commands and the memory arithmetic for large models.
"""
from .comm import (DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, barrier, broadcast_from_main, guard,
                   init_from_env, is_active, is_main, local_devices, max_memory_for_rank, min_over_ranks, rank,
                   report_failure, shard, shutdown, step, world_size)
from .errors import DistributedError
from .solve.sharded import assign_groups, estimate_cost, solve_sharded
from .statistics.reduce import reduce_over_ranks

__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT_S", "DistributedError", "assign_groups",
           "barrier", "broadcast_from_main", "estimate_cost", "guard", "init_from_env", "is_active", "is_main",
           "local_devices", "max_memory_for_rank", "min_over_ranks", "rank", "reduce_over_ranks", "report_failure",
           "shard", "shutdown", "solve_sharded", "step", "world_size"]
