"""Training batches: the data pipeline's datasets and loader (megaloop.data.build_data_loader: the
resumable sampler, collate_samples, `data.num_workers` reader processes), plus the loop count R of each
micro-batch, attached in the main process.

A micro-batch is `((tokens, loops), labels)`: DeepSpeed's pipeline engine feeds element 0 to the first
stage and element 1 to the loss on the last stage. `loops` is a long tensor [R_total, R_grad] drawn by
`sample_loops(loop_cfg, seed, step, m)` for optimizer step `step` and gradient-accumulation index m
(under loop.granularity='sequence' a (B, 2) tensor, one [R_b, R_grad_b] per row: `loops_tensor`). It
is drawn where the data enters, is a pure function of its position in the run (so a resumed run draws
the same R), and travels with the activations to the stage that holds the looped block: every stage
and every TP rank of a replica agrees on R, and activation checkpointing's recompute cannot change it.
Integer tensors cross pipeline stages without gradients (DeepSpeed skips them in the backward send).

All data-parallel replicas run the same R for micro-batch m (R does not depend on the DP rank):
  - bucketed gradient reduction (DeepSpeed's DP all-reduce, ZeRO 1/2 reduce-scatter) needs the same
    set of parameters to have gradients on every rank, and which parameters are used depends on R
    (e.g. the outer norm between loops is unused when R = 1): different R per rank deadlocks or
    corrupts the collective;
  - a synchronous step waits for the slowest replica, so equal R keeps the replicas in lock-step.
Consequence: data parallel 2 and one rank with 2 accumulated micro-batches read the same samples in
the same order, and with a fixed R they compute the same update; with a sampled R they draw different
(equally distributed) loop counts.
"""
from __future__ import annotations

from typing import Optional

import torch

from megaloop.config import Config
from megaloop.model.loop_schedule import fixed_loops_tensor, loops_tensor
from megaloop.training.documents import eod_loss_mask_id, mask_eod_labels


def build_task_datasets(cfg: Config, num_train: int, num_valid: int) -> dict:
    """data.task: generated examples (megaloop.tasks) instead of a corpus; validation draws from another
    seed (train.seed + 1), so it scores examples the run was not trained on."""
    from megaloop.config import ConfigError
    from megaloop.tasks import TaskDataset, build_task
    d = cfg.data
    try:
        train_task = build_task(d.task, seed=cfg.train.seed, **d.task_params)
        valid_task = build_task(d.task, seed=cfg.train.seed + 1, **d.task_params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.task={d.task!r} with data.task_params={d.task_params!r}: {e}") from None
    if train_task.seq_len != d.seq_len:
        raise ConfigError(f"data.task={d.task!r} makes sequences of {train_task.seq_len} tokens but data.seq_len="
                          f"{d.seq_len}: set data.seq_len={train_task.seq_len}")
    if train_task.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.task={d.task!r} uses {train_task.vocab_size} token ids but model.vocab_size="
                          f"{cfg.model.vocab_size}: set model.vocab_size >= {train_task.vocab_size}")
    if not cfg.model.causal and train_task.answers_in_tokens:
        raise ConfigError(f"data.task={d.task!r} also writes each answer into the tokens after its position "
                          f"(teacher forcing), which a bidirectional model (model.causal=false) reads directly: "
                          f"use model.causal=true for this task")
    out = {"train": TaskDataset(train_task, max(1, int(num_train)))}
    if num_valid:
        out["valid"] = TaskDataset(valid_task, int(num_valid))
    return out


def _split(sample: torch.Tensor):
    """(tokens, labels) of a collated batch: [B, T+1] corpus windows shift by one; [B, 2, T] task examples
    carry their own answer-only labels."""
    from megaloop.data.sampler import inputs_and_labels
    from megaloop.tasks.base import task_inputs_and_labels
    return task_inputs_and_labels(sample) if sample.dim() == 3 else inputs_and_labels(sample)


def build_split_datasets(cfg: Config, num_train: int, num_valid: int, tokenizer=None) -> dict:
    if cfg.data.task:
        return build_task_datasets(cfg, num_train, num_valid)
    from megaloop.data import build_datasets, parse_data_paths
    from megaloop.data.dataset_tokenizer import check_dataset_tokenizer
    if not cfg.data.data_path:
        raise ValueError("data.data_path is empty: point it at a preprocessed dataset prefix "
                         "(see tools/preprocess_data.py), e.g. data.data_path=[data/demo_text_document]")
    # A dataset whose {prefix}.tokenizer.json names another tokenizer is refused (ConfigError, one line);
    # build_datasets then checks that the token ids fit the tokenizer's vocabulary.
    for prefix in parse_data_paths(cfg.data.data_path)[0]:
        check_dataset_tokenizer(prefix, tokenizer if tokenizer is not None else cfg)
    num = {"train": int(num_train)}
    if num_valid:
        num["valid"] = int(num_valid)
    return build_datasets(cfg.data.data_path, split=cfg.data.split, seq_len=cfg.data.seq_len,
                          num_samples=num, seed=cfg.train.seed, cache_dir=cfg.data.cache_dir,
                          tokenizer=tokenizer)


def build_run_datasets(cfg: Config, num_train: int, num_valid: int, num_test: int = 0, tokenizer=None) -> tuple:
    """(train dataset, {validation set name: dataset}, {test set name: dataset}). Validation is data.split's
    valid documents (the set "valid"; a task's seed + 1 stream), or the named sets of data.valid_data_path;
    test sets come from data.test_data_path only (data.split's test documents are left unread, as before)."""
    from megaloop.config.schema import named_blends
    d = cfg.data
    valid_paths, test_paths = named_blends(d.valid_data_path, "valid"), named_blends(d.test_data_path, "test")
    split = build_split_datasets(cfg, num_train, 0 if valid_paths else num_valid, tokenizer)
    valid = {"valid": split["valid"]} if split.get("valid") is not None else {}
    if num_valid and valid_paths:
        valid = {name: _whole_dataset(cfg, blend, "valid", num_valid, tokenizer) for name, blend in valid_paths.items()}
    test = {name: _whole_dataset(cfg, blend, "test", num_test, tokenizer)
            for name, blend in test_paths.items()} if num_test else {}
    return split["train"], valid, test


def _whole_dataset(cfg: Config, blend: list, kind: str, num: int, tokenizer):
    """Every document of a blend (data.valid_data_path / test_data_path) as `num` samples of the kind's split."""
    from megaloop.data import build_datasets, parse_data_paths
    from megaloop.data.dataset_tokenizer import check_dataset_tokenizer
    for prefix in parse_data_paths(blend)[0]:
        check_dataset_tokenizer(prefix, tokenizer if tokenizer is not None else cfg)
    split = "0,1,0" if kind == "valid" else "0,0,1"
    return build_datasets(blend, split=split, seq_len=cfg.data.seq_len, num_samples={kind: int(num)},
                          seed=cfg.train.seed, cache_dir=cfg.data.cache_dir, tokenizer=tokenizer)[kind]


class TrainBatches:
    """Iterator over this rank's training micro-batches, starting after `consumed_samples`.

    Reads through megaloop.data's loader (build_data_loader: the PretrainingSampler, the same global
    sample order as Megatron-LM, with `data.num_workers` worker processes reading ahead; 0 reads in this
    process) and adds the loop count here, in the main process, from the micro-batch's position in the run.
    In a pipeline, the first and the last stage each own one of these and draw the same sequence; middle
    stages never read data, and the loader (its workers) starts on the first read, so they start none."""

    def __init__(self, dataset, cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        from megaloop.data import build_data_loader
        t = cfg.train
        self.dataset, self.cfg = dataset, cfg
        self.mbs, self.gas, self.dp_rank, self.dp_size = t.micro_batch_size, t.grad_accum_steps, dp_rank, dp_size
        global_batch = self.mbs * self.gas * dp_size
        if consumed_samples % global_batch:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of the global batch "
                             f"{global_batch}: the run was resumed with another batch layout")
        self.loader = build_data_loader(dataset, consumed_samples, self.mbs, dp_rank, dp_size,
                                        num_workers=cfg.data.num_workers)
        self.sampler = self.loader.batch_sampler
        self.eod_mask = eod_loss_mask_id(cfg)  # data.eod_mask_loss
        self._it = None
        self._micro = consumed_samples // (self.mbs * dp_size)  # global micro-batch counter

    def __iter__(self):
        return self

    def loops_for(self, step: int, m: int) -> torch.Tensor:
        return loops_tensor(self.cfg.loop, self.cfg.train.seed, step, m, self.mbs)

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        sample = next(self._it)
        step, m = divmod(self._micro, self.gas)
        self._micro += 1
        tokens, labels = _split(sample)
        if self.eod_mask is not None:
            labels = mask_eod_labels(tokens, labels, self.eod_mask)
        return (tokens, self.loops_for(step, m)), labels


class EvalBatches:
    """The first `iters` micro-batches of this rank's share of the validation split, every time (so
    validation losses are comparable across the run), with a fixed R.

    Read through the same loader (collate_samples), in this process: the trainer builds one per
    evaluation, and worker processes started for a few micro-batches would cost more than they save."""

    def __init__(self, dataset, cfg: Config, dp_rank: int, dp_size: int, iters: int, loops: int):
        from megaloop.data.sampler import data_loader
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, cfg.train.micro_batch_size, dp_rank, dp_size
        self.cfg, self.iters, self.loops = cfg, iters, loops
        n, mbs = len(dataset), self.mbs
        # Rank r's k-th micro-batch: the samples after k global micro batches and r slices (wrapping).
        indices = [[((k * dp_size + dp_rank) * mbs + b) % n for b in range(mbs)] for k in range(iters)]
        self.loader = data_loader(dataset, indices, num_workers=0)
        self.eod_mask = eod_loss_mask_id(cfg)  # data.eod_mask_loss
        self.reset()

    def reset(self):
        self._it = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        tokens, labels = _split(next(self._it))
        if self.eod_mask is not None:
            labels = mask_eod_labels(tokens, labels, self.eod_mask)
        return (tokens, fixed_loops_tensor(self.cfg.loop, self.loops, tokens.shape[0])), labels


def samples_needed(cfg: Config, dp_size: int) -> tuple:
    """(train, valid per validation set, test per test set) samples."""
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * dp_size
    per_eval = t.eval_iters * t.micro_batch_size * dp_size
    return t.steps * global_batch, per_eval if t.eval_interval else 0, per_eval if cfg.data.test_data_path else 0


def tokenizer_reference(cfg: Config) -> dict:
    ref = {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model}
    if cfg.data.tokenizer_eod:
        ref["eod"] = cfg.data.tokenizer_eod
    return ref


def build_tokenizer_for(cfg: Config) -> Optional[object]:
    from megaloop.data import build_tokenizer
    return build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, eod_token=cfg.data.tokenizer_eod)
