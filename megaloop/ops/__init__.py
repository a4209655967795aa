"""Pure-PyTorch numerical kernels for the linear-time mixers (LT2, looped_models.md section 6).

Standalone functions with no dependency on the rest of megaloop; the mixer modules wrap them.
- gated_delta: the gated delta rule (Gated DeltaNet), recurrent reference + chunkwise form.
- short_conv: the causal depthwise short convolution GDN applies to q/k/v.
- dense_attention: the attention layout (grouped-query heads) and masked dense references.
- sliding_window: sliding-window causal attention.
- lightning_indexer: DSA's indexer scores and its exact blockwise top-k key selection.
- sparse_attention: DeepSeek-style top-k sparse attention (DSA) over the selected keys.
- indexer_loss: the indexer's KL training loss.
"""
from megaloop.ops.gated_delta import gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent
from megaloop.ops.short_conv import causal_depthwise_conv1d, causal_depthwise_conv1d_step
from megaloop.ops.indexer_loss import indexer_kl_loss
from megaloop.ops.lightning_indexer import lightning_indexer_scores, lightning_indexer_topk, select_topk_keys
from megaloop.ops.sliding_window import sliding_window_attention
from megaloop.ops.sparse_attention import sparse_attention_from_indices, topk_sparse_attention

__all__ = [
    "causal_depthwise_conv1d",
    "causal_depthwise_conv1d_step",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "indexer_kl_loss",
    "lightning_indexer_scores",
    "lightning_indexer_topk",
    "select_topk_keys",
    "sliding_window_attention",
    "sparse_attention_from_indices",
    "topk_sparse_attention",
]
