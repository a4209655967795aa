"""One optimizer step under pipeline parallelism: DeepSpeed's pipeline engine runs the micro-batches
(`train_batch`); megaloop records each micro-batch's R for the logs and, on diagnostics steps, lets the
looped stage report its per-loop diagnostics and the training diagnostics peek at the first micro-batch."""
from __future__ import annotations

from megaloop.model.loop_schedule import logged_loops


def pipeline_train_batch(te, batches, diagnostics, step: int, want_diag: bool):
    """Returns (loss of the global batch as a device scalar, R per micro-batch, the block's diagnostics | None)."""
    layer = te.looped_layer()
    if layer is not None:
        layer.want_diagnostics = want_diag
        layer.last_diagnostics = None
    rs, it = [], batches
    if diagnostics is not None and diagnostics.due(step + 1):  # (peeks at the first micro-batch)
        it = diagnostics.run_pipeline(step + 1, batches)
    loss = te.engine.train_batch(data_iter=_Recording(it, rs))
    diag = layer.last_diagnostics if layer is not None else None
    if layer is not None:
        layer.want_diagnostics = False
    return loss.detach().float().reshape(()), rs, diag


class _Recording:
    """Passes batches through, recording each micro-batch's R (for the logs)."""

    def __init__(self, it, rs: list):
        self.it, self.rs = it, rs

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.rs.append(logged_loops(batch[0][1]))  # R, or the mean of the rows' R (loop.granularity=sequence)
        return batch
