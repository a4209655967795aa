"""Pretraining under DeepSpeed, one idea per file:

cli          the entry point (`pretrain_looped.py` -> `megaloop.training.cli.main`): flags, config, exit codes
trainer      the loop: steps, validation, checkpoints, stopping, logging
engine       the model built, parallelised (TP, compile, pipeline) and wrapped by deepspeed.initialize
ds_config    the DeepSpeed config built from megaloop's config; layouts DeepSpeed cannot run are refused
optim        AdamW groups and kernels, learning-rate schedules
data         training / validation batches with their loop counts, the tokenizer of a run
stats        the numbers gathered on logging steps (per-loop diagnostics, memory per rank)
run_logging  console, TensorBoard, metrics.jsonl
distributed  process-group setup and the DP x PP x TP grid
faults       injected faults for the failure-handling tests (none in real runs)
Checkpoints (DeepSpeed save/load, the completeness marker, `latest`, per-rank RNG) are megaloop.checkpoint's.
"""
