"""How the pipeline layers are split into stages ("loop_weighted", parallel.pipeline_partition).

Each layer is weighted by its FLOPs (forward+backward, + recompute), the looped block by n_loop x E[R], and
the stages are the contiguous split minimising the heaviest one. DeepSpeed's "parameters" method is wrong for
a looped block: it weighs the block like n_loop layers although it runs n_loop x R of them, and it weighs the
embedding / head by their (large) parameter count although the lookup costs nothing.
"""
from __future__ import annotations

from typing import Optional

from megaloop.config import Config
from megaloop.model.loop_schedule import expected_loop_counts
from megaloop.parallel.pipeline import layer_names


def balanced_partition(weights, num_parts: int) -> list:
    """Contiguous split of `weights` into num_parts non-empty parts minimising the heaviest part
    (ties: the lighter first parts, i.e. put work late, where the loss is). Returns DeepSpeed's
    `parts` (num_parts + 1 boundaries)."""
    n = len(weights)
    if num_parts > n:
        raise ValueError(f"cannot split {n} pipeline layers into {num_parts} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    INF = float("inf")
    best = [[INF] * (num_parts + 1) for _ in range(n + 1)]
    cut = [[0] * (num_parts + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, num_parts) + 1):
            for k in range(j - 1, i):
                cost = max(best[k][j - 1], prefix[i] - prefix[k])
                if cost < best[i][j] - 1e-12 * max(1.0, cost):
                    best[i][j], cut[i][j] = cost, k
    parts, i = [n], n
    for j in range(num_parts, 0, -1):
        i = cut[i][j]
        parts.append(i)
    return parts[::-1]


def looped_pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class LoopedPipelineModule(PipelineModule):
        """PipelineModule with the loop-weighted partition (DeepSpeed has no explicit-weights method)."""

        def __init__(self, layers, layer_weights, partition_method, **kwargs):
            object.__setattr__(self, "_megaloop_weights", list(layer_weights))
            super().__init__(layers, partition_method=partition_method, **kwargs)

        def _partition_layers(self, method="uniform"):
            if method != "loop_weighted":
                return super()._partition_layers(method=method)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = balanced_partition(self._megaloop_weights, self.num_stages)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return LoopedPipelineModule


def layer_flop_weights(cfg: Config, names) -> list:
    """Each named pipeline layer's share of the step's FLOPs (the looped block weighted by its expected
    loop counts): what the loop-weighted partition balances, and what the planner reports per stage."""
    from megaloop.model.flops import pipeline_layer_weights

    return pipeline_layer_weights(cfg, names, *expected_loop_counts(cfg))


def stage_plan(cfg: Config, num_stages: int, method: Optional[str] = None) -> list:
    """Which layer names each stage holds under the loop-weighted partition (for logs and tests)."""
    names = layer_names(cfg.model)
    parts = balanced_partition(layer_flop_weights(cfg, names), num_stages)
    return [names[parts[s]:parts[s + 1]] for s in range(num_stages)]
