"""The statistics pass (docs/algorithm.md, "Statistics"): hooks and accumulators (:mod:`.hooks`), the
pass over batches (:mod:`.statistics_pass`) and its reduction over the ranks of a process group
(:mod:`.reduce`). The engine (:mod:`lora_da_fast.engine`) drives them."""
from .hooks import Accumulators, input_group_probe
from .reduce import reduce_over_ranks
from .statistics_pass import StatisticsPass, per_example_loss_sum, run_pass

__all__ = ["Accumulators", "StatisticsPass", "input_group_probe", "per_example_loss_sum", "reduce_over_ranks",
           "run_pass"]
