"""Evaluation of a looped model against its test-time loop count R, on one process (the tools) and shared with
the trainer's validation (megaloop/training/evaluation.py):

inputs   the model (a checkpoint of any layout, or an exported HF folder) with its tokenizer, and the
         evaluation tokens (an indexed dataset's validation documents, or raw text)
loops    mean NLL / perplexity, or a synthetic task's exact match, at each R and exit strategy
report   the tables as printed, CSV, JSON and PNG
harness  lm-evaluation-harness through the HF export, each R as the exported config's num_loops

tools/eval_loops.py and tools/eval_harness.py are thin command lines over these.
"""
