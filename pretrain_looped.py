"""Pretrain a looped LM with DeepSpeed.

    deepspeed [launcher flags] pretrain_looped.py --config yaml_configs/demo_cpu.yaml [section.key=value ...]
    python pretrain_looped.py --config ... [section.key=value ...]      # one rank, no launcher

The run writes checkpoints, TensorBoard events, metrics.jsonl and the resolved config under
train.output_dir, and resumes from the newest complete checkpoint there (or --load PATH).
"""
import sys

from megaloop.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
