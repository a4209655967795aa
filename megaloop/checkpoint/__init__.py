"""Training checkpoints: their layout, saving/resuming a run, and reading one back as the one-process
LoopedLM.

layout  where checkpoints live (<output_dir>/checkpoints/step_NNNNNNNN/, `latest`, the completeness
        marker) and `resolve(path, step)`: which complete tag a run folder, checkpoint root or tag
        folder means (resume, export, generation and evaluation all go through it)
engine  save_training / load_training: DeepSpeed's save/load on every rank, per-rank RNG states, the
        marker and `latest` written only once every rank's files are complete; weights that are not
        finite are never saved (NonFiniteState)
integrity  checksums of a tag's files (recorded in the marker), verify_tag, resolve_intact (a damaged
        tag is refused naming the file; a run folder falls back to the previous intact tag)
async_save  CheckpointSaver (the trainer's saves): the same save written by a background thread per rank
        from host copies (train.async_save); marker and `latest` once every rank's write is done
reader  load / load_model / load_state_dict / load_config: any TP x PP x DP layout and ZeRO stage merged
        offline into LoopedLM names (and the plain torch.save'd format of plain.py)
training_state  TrainingStateReader: the AdamW state (fp32 weights, moments, step) of any layout, read one
        parameter's slice for a rank of another layout at a time; load_training_state: all of it merged
sharded_read  memory-mapped reads (load_mapped) and a TP slice cut from only the old shards it overlaps
relayout  load_training: resume a run on the checkpoint's layout (DeepSpeed's loader) or on another one
        (each rank reads its own slices, one parameter at a time)
init_weights  init_state_dict: a new run's first weights (init.from) from any checkpoint, checked key by key
        against this run's model (weights only: the optimizer starts fresh at step 0)

Errors are CheckpointError (a ValueError) with a one-line message naming the path or file.
"""
from megaloop.checkpoint.engine import NonFiniteState, load_training, save_training
from megaloop.checkpoint.layout import (COMPLETE, LATEST, TAG_RE, CheckpointError, complete_tags, is_complete,
                                        is_deepspeed_checkpoint, is_tag_dir, resolve, tag_for, tag_step)
from megaloop.checkpoint.plain import save_plain, save_plain_checkpoint
from megaloop.checkpoint.reader import (CheckpointInfo, checkpoint_config, expected_shapes, load, load_config,
                                        load_deepspeed_checkpoint, load_model, load_state_dict, read_info)

__all__ = ["NonFiniteState", "COMPLETE", "LATEST", "TAG_RE", "CheckpointError", "CheckpointInfo", "checkpoint_config",
           "complete_tags", "expected_shapes", "is_complete", "is_deepspeed_checkpoint", "is_tag_dir", "load",
           "load_config", "load_deepspeed_checkpoint", "load_model", "load_state_dict", "load_training",
           "read_info", "resolve", "save_plain", "save_plain_checkpoint", "save_training", "tag_for", "tag_step"]
