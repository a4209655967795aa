"""Pretraining under DeepSpeed: engine setup, ds_config builder, optimizer groups and LR schedules, the
train loop with validation, checkpointing (with resume), logging and failure handling.

Entry point: `pretrain_looped.py` (-> `megaloop.training.trainer.main`)."""
