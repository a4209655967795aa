"""The looped language model: embedding -> prelude (-> prelude norm) -> looped block x R (-> coda norm) -> coda
-> final norm -> head.

`model(tokens, loops=R)` runs any R >= 1, whatever R it was trained with. The model is plain
PyTorch; tensor and pipeline parallelism are applied to it from outside (`megaloop.parallel`), which
is why the pieces are exposed as three stages: `embed` (+ prelude), `block`, and `head` (+ coda).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megaloop.config import ModelConfig
from megaloop.model.documents import DocumentPacking, document_ids, packed_rope
from megaloop.model.initial_values import draw_init_seed, initialize_parameters
from megaloop.model.layers import RMSNorm, TransformerLayer, rope_cache
from megaloop.model.looped_block import LoopedBlock
from megaloop.model.value_embeddings import attach_value_embeddings
from megaloop.model import loop_losses


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, vocab): last loop's, or the exit-selected loop's per token
    loss: Optional[torch.Tensor] = None
    loops: int = 0  # iterations run
    per_loop_logits: Optional[list] = None  # when a per-loop loss or an exit needed them
    exit_probs: Optional[torch.Tensor] = None  # (R, B, T), Ouro exit distribution
    exit_loops: Optional[torch.Tensor] = None  # (B, T) loop index (1-based) each token exited at
    diagnostics: Optional[dict] = None


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: str = "last", exit_entropy_weight: float = 0.05):
        super().__init__()
        # Drawn first (before any submodule's constructor touches the global generator), so that a model
        # built on the meta device gets the same init seed as one built on the host.
        self.init_seed = draw_init_seed()
        self.cfg = cfg
        self.loss_mode = loss
        self.exit_entropy_weight = exit_entropy_weight
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.padded_vocab_size, d)
        self.embed_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_scale) if cfg.embed_norm else None
        self.prelude = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.n_prelude))
        # e = norm(P(emb(x))): the injected signal leaves the prelude normalised (Parcae's prelude_norm).
        self.prelude_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_scale) if cfg.use_prelude_norm else None
        self.block = LoopedBlock(cfg)
        # Huginn: the loop's output is normalised before the coda (model.coda_norm).
        self.coda_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_scale) if cfg.coda_norm else None
        self.coda = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.n_coda))
        if cfg.value_embeddings:  # Parcae's (nanochat's) per-layer tables gated into the attention values
            attach_value_embeddings(self.prelude, self.block.layers, self.coda, cfg)
        self.final_norm = RMSNorm(d, cfg.norm_eps, cfg.norm_scale)
        self.head = nn.Linear(d, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        self.exit_gate = nn.Linear(d, 1) if cfg.exit_gate else None
        # Per-token cross-entropy over the (unpadded) vocabulary; tensor parallelism swaps in the
        # vocab-parallel version, which never materialises full-vocabulary logits on one rank.
        self.token_loss_fn = loop_losses.token_cross_entropy
        # KL between successive loops' next-token distributions (Huginn's exit); TP swaps it too.
        self.successive_kl_fn = loop_losses.successive_kl
        # Packed documents (data.reset_attention_mask / reset_position_ids): set by the training set-up
        # (megaloop/training/documents.py); None: every row is one sequence (inference, generation).
        self.packing: Optional[DocumentPacking] = None
        self.init_weights()

    # ------------------------------------------------------------------------------------------
    def init_weights(self):
        """Every parameter's initial value, drawn from its own generator keyed by (init_seed, its name):
        megaloop/model/initial_values.py, which also documents model.init_scheme's rules. Parameters on the
        meta device are materialised later, per rank's shard (megaloop/parallel/materialize.py)."""
        initialize_parameters(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- the three stages ---------------------------------------------------------------------
    def rope(self, seq_len: int, device, tokens: Optional[torch.Tensor] = None):
        """The `rope` argument of every layer: (cos, sin), or with packed documents (self.packing and the
        tokens given) a RopeCache that also carries the document structure of `tokens`, computed here
        once per forward and reused by every layer and loop (megaloop/model/documents.py)."""
        if tokens is None or self.packing is None:
            return rope_cache(seq_len, self.cfg.attn_head_dim, self.cfg.rope_theta, device)
        return self.packed_rope(document_ids(tokens, self.packing.eod_id))

    def packed_rope(self, doc_ids: torch.Tensor):
        return packed_rope(self.packing, doc_ids, self.cfg.attn_head_dim, self.cfg.rope_theta)

    def embed(self, tokens: torch.Tensor, rope) -> torch.Tensor:
        """Token ids -> the injected signal e (embedding x embed_scale, its norm, the prelude, then the prelude norm)."""
        e = self.embedding(tokens)
        if self.cfg.embed_scale != 1:  # Huginn: sqrt(d_model)
            e = e * self.cfg.embed_scale
        if self.embed_norm is not None:
            e = self.embed_norm(e)
        for layer in self.prelude:
            e = layer(e, rope, tokens=tokens)
        if self.prelude_norm is not None:
            e = self.prelude_norm(e)
        return e

    def head_logits(self, x: torch.Tensor, rope, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A loop output -> logits over the real (unpadded) vocabulary (tokens: for value embeddings)."""
        if self.coda_norm is not None:
            x = self.coda_norm(x)
        for layer in self.coda:
            x = layer(x, rope, tokens=tokens)
        if not self.block.outer_is_final:  # Ouro: the block already applied the (shared) final norm
            x = self.final_norm(x)
        return self.output_logits(x)

    # --- shared with the pipeline stages ------------------------------------------------------
    # megaloop/parallel/pipeline.py's layer classes borrow these methods (they hold the attributes the
    # methods read: cfg, head, exit_gate, real_vocab_logits, loss_mode, token_loss_fn,
    # exit_entropy_weight), so the pipeline computes logits, exit probabilities and the loss with this
    # very code.
    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head: a final (normed) state -> softcapped logits over the real (unpadded) vocabulary."""
        logits = self.head(x)
        cap = self.cfg.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return self.real_vocab_logits(logits)

    def real_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Drop the padded vocabulary columns. Tensor parallelism replaces this (per instance) by masking
        the padded columns of its vocab shard to the lowest value, which keeps shards equal-sized."""
        return logits[..., : self.cfg.vocab_size]

    def exit_distribution(self, states) -> torch.Tensor:
        """Ouro's exit distribution (R, B, T) over the loops whose outputs `states` are (the exit gate
        lambda = sigmoid(gate(h)) of each, turned into the probability of exiting at each loop)."""
        lambdas = [torch.sigmoid(self.exit_gate(x).squeeze(-1).float()) for x in states]
        return loop_losses.exit_distribution(torch.stack(lambdas))

    def loss(self, logits, labels: torch.Tensor, exit_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training loss. logits: the last loop's logits (loss "last"), or the list of per-loop
        logits (the loss mode `loss_mode` picks how they combine)."""
        if torch.is_tensor(logits):
            return loop_losses.mean_token_loss(self.token_loss_fn(logits, labels), labels)
        return loop_losses.loop_loss(self.loss_mode, logits, labels, self.token_loss_fn, exit_probs,
                                     self.exit_entropy_weight)

    # ------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loops: Optional[int] = None, grad_loops: Optional[int] = None,
                return_diagnostics: bool = False, exit: Optional[str] = None,
                exit_threshold: Optional[float] = None,
                noise_generator: Optional[torch.Generator] = None, return_per_loop: bool = False) -> LMOutput:
        """tokens: (B, T) ids. labels: (B, T) targets (negative = ignored); gives `.loss`.

        loops:      R for this call (default: the config's `model.loops`), or a (B,) tensor: one R per sequence.
        grad_loops: gradients through the last k loops only (the first R-k run under no_grad); per sequence
                    a (B,) tensor too.
        exit:       None, "q_exit" (Ouro, threshold = cumulative exit probability) or "kl"
                    (Huginn's convergence exit, threshold = KL between successive loops).
        noise_generator: RNG for a random initial loop state (model.state_init=noise).
        return_per_loop: also give `per_loop_logits` (every loop carrying gradients), whatever the loss
                    (distillation's per-loop KL).
        """
        cfg = self.cfg
        per_row = torch.is_tensor(loops) and loops.dim() > 0  # one depth per sequence (loop.granularity=sequence)
        loops = cfg.loops if loops is None else (loops if per_row else int(loops))
        if tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}")
        stage = getattr(self, "train_stage", None)  # set by megaloop.training.stages (train.stage)
        if stage is not None and labels is not None:
            from megaloop.model.stage_losses import stage_forward
            return stage_forward(self, stage, tokens, labels, loops, noise_generator)
        rope = self.rope(tokens.shape[1], tokens.device, tokens)
        e = self.embed(tokens, rope)
        ve_tokens = tokens if cfg.value_embeddings else None  # the looped / coda layers need them only then
        need_per_loop = return_per_loop or exit is not None or (labels is not None and self.loss_mode != "last")
        if per_row and need_per_loop:
            raise ValueError("per-sequence loop counts support loop.loss='last' without an exit only")
        block_out = self.block(e, rope, loops, grad_loops, collect=need_per_loop,
                               diagnostics=return_diagnostics, final_norm=self.final_norm,
                               generator=noise_generator, tokens=ve_tokens)
        out = LMOutput(logits=None, loops=int(loops.max()) if per_row else loops, diagnostics=block_out.diagnostics)

        if not need_per_loop:
            out.logits = self.head_logits(block_out.out, rope, ve_tokens)
            if labels is not None:
                out.loss = self.loss(out.logits, labels)
            return out

        per_loop = [self.head_logits(x, rope, ve_tokens) for x in block_out.per_loop]
        out.per_loop_logits = per_loop
        out.logits = per_loop[-1]
        if self.exit_gate is not None:
            # Over the loops that have outputs here (all of them unless truncated backprop is on).
            out.exit_probs = self.exit_distribution(block_out.per_loop)
        if exit is not None:
            out.logits, out.exit_loops = loop_losses.select_exit(per_loop, exit, exit_threshold, out.exit_probs,
                                                                 kl_fn=self.successive_kl_fn)
            out.exit_loops = out.exit_loops + (loops - len(per_loop))
        if labels is not None:
            out.loss = self.loss(per_loop, labels, out.exit_probs)
        return out


def build_model(config) -> LoopedLM:
    """Build the model from a full `Config` (loss settings from its loop schedule) or a `ModelConfig`."""
    if isinstance(config, ModelConfig):
        return LoopedLM(config)
    return LoopedLM(config.model, loss=config.loop.loss, exit_entropy_weight=config.loop.exit_entropy_weight)
