"""Pretraining under DeepSpeed, one idea per file:

cli          the entry point (`pretrain_looped.py` -> `megaloop.training.cli.main`): flags, config, exit codes
trainer      the loop: steps, validation (evaluation), checkpoints, stopping, logging
settle       the one host read of the steps since the last sync; the non-finite loss stop
pipeline_step  one optimizer step through DeepSpeed's pipeline engine
progress     tokens, FLOPs, tokens seen and ETA between logging steps
engine       the model built, parallelised (TP, compile, pipeline) and wrapped by deepspeed.initialize
ds_config    the DeepSpeed config built from megaloop's config; layouts DeepSpeed cannot run are refused
optim        AdamW (or Muon + AdamW) groups and kernels, learning-rate schedules
data         training / validation batches with their loop counts, the tokenizer of a run
evaluation   validation / test sets at each train.eval_loops R and train.eval_exits exit, records per (set, R)
harness      train.harness_interval: lm-evaluation-harness on the current weights
stats        the numbers gathered on logging steps (per-loop diagnostics, memory per rank)
run_logging  console, metrics.jsonl, the trackers' scalars
trackers     train.loggers: TensorBoard, W&B, MLflow (config, git commit and layout logged once)
stopping     signals, the launcher watchdog (deepspeed, torchrun, srun), the agreed stop
time_limit   train.time_limit: stop with a checkpoint before the allocation ends, exit code 75
profiling    train.profile: torch.profiler trace, CUDA memory snapshot
init_from    init.from: a new run's starting weights
end_sample   train.sample_tokens: the end-of-run sample
distributed  process-group setup and the DP x PP x TP grid
faults       injected faults for the failure-handling tests (none in real runs)
Checkpoints (DeepSpeed save/load, the completeness marker, `latest`, per-rank RNG) are megaloop.checkpoint's.
"""
