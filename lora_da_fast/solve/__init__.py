"""The solve (docs/algorithm.md, "Solve"): the steps of the per-module problem (:mod:`.steps`), the dense
float64 reference (:mod:`.reference`), the batched solver (:mod:`.batched`), the local solve that picks
one of them (:mod:`.local`) and the sharded solve that spreads it over ranks (:mod:`.sharded`)."""
from .batched import BatchedOptions, solve_batched
from .local import check_solvable, solve_local
from .reference import solve_reference
from .sharded import assign_groups, estimate_cost, solve_sharded

__all__ = ["BatchedOptions", "assign_groups", "check_solvable", "estimate_cost", "solve_batched", "solve_local",
           "solve_reference", "solve_sharded"]
