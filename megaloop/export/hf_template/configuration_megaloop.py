"""Configuration of an exported megaloop looped language model (Hugging Face format).

Self-contained: imports only transformers. The field names follow megaloop's ModelConfig (d_model,
n_heads, n_loop, arch, injection, ...) with the derived sizes already resolved (n_kv_heads, head_dim,
ffn_hidden and padded_vocab_size are always explicit here), plus the standard Hugging Face aliases
(hidden_size, num_attention_heads, max_position_embeddings, num_hidden_layers) that tools read.

Token mixers of the looped layers (megaloop/model/mixers.py): `mixer` is one name, a comma list tiling
the n_loop layers, or an "N:M" ratio (N `linear_mixer` layers then M "attn" layers). Names: "attn"
(softmax attention), "gdn" (Gated DeltaNet: conv_size, gdn_expand_v, gdn_chunk_size), "swa" (sliding
window attention: window), "dsa" (DeepSeek sparse attention: dsa_topk, dsa_index_heads, dsa_index_dim,
dsa_indexer_form, dsa_index_rope_dim).
The exporter writes the resolved comma list.

Inference-only fields (not in megaloop's ModelConfig):
  num_loops       default number of loop iterations R (megaloop's `loops`); forward/generate take
                  `num_loops=` to override it per call.
  noise_init      how the `noise` state init draws its random start at inference:
                    "seeded"     (default) a fixed truncated-normal draw per position, from
                                 `noise_seed`; deterministic, identical with and without the KV
                                 cache and for every batch row.
                    "global_rng" megaloop's own draw (torch's global RNG, one value per row, position
                                 and channel): call torch.manual_seed first for a reproducible run;
                                 cached generation then differs from uncached generation.
                    "zeros"      start from zeros.
  exit_strategy   default exit: null, "q_exit" (Ouro exit gate) or "kl" (convergence exit).
  exit_threshold  q of the Q-exit (default 0.5) or the KL threshold (default 1e-3).
  exit_kv         "copy" (default): stop computing once every token of a step has exited; the cache
                  slots of the skipped loops get the last computed loop's keys/values.
                  "compute": run all loops and only select the exit's logits (cached generation equals
                  uncached generation exactly; no compute saved).
"""
try:  # transformers >= 4.56 spells it PreTrainedConfig; older versions PretrainedConfig
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as _BaseConfig

ARCHITECTURES = ("recurrent", "flt", "lt_i", "lt_ia", "flt_res")
INJECTIONS = ("none", "add", "concat_adapter", "parcae")


class MegaloopConfig(_BaseConfig):
    model_type = "megaloop"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "intermediate_size": "ffn_hidden",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(
        self,
        vocab_size=258,
        padded_vocab_size=None,
        tie_word_embeddings=True,
        embed_norm=True,
        embed_scale=1.0,
        max_seq_len=256,
        d_model=64,
        n_heads=4,
        n_kv_heads=None,
        head_dim=None,
        ffn_hidden=None,
        mlp="swiglu",
        norm_style="pre",
        norm_eps=1e-6,
        norm_scale=True,
        qk_norm=False,
        rope_theta=10000.0,
        logit_softcap=None,
        init_std=0.02,
        mixer="attn",
        linear_mixer="gdn",
        conv_size=4,
        gdn_expand_v=1.0,
        gdn_chunk_size=64,
        window=64,
        dsa_topk=64,
        dsa_index_heads=4,
        dsa_index_dim=32,
        dsa_indexer_form="v3.2",
        dsa_index_rope_dim=None,
        n_prelude=0,
        n_loop=2,
        n_coda=0,
        num_loops=4,
        max_loops=64,
        arch="recurrent",
        injection="none",
        recall="standard",
        internal_recall_site="pre_mlp",
        internal_recall_layers="first",
        normalization="outer",
        state_init="embed",
        state_init_std=None,
        share_outer_final_norm=False,
        prelude_norm=None,
        coda_norm=False,
        exit_gate=False,
        loop_residual_gate=False,
        attn_output_gate=False,
        value_embeddings=False,
        noise_init="seeded",
        noise_seed=0,
        exit_strategy=None,
        exit_threshold=None,
        exit_kv="copy",
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size
        self.embed_norm = embed_norm
        self.embed_scale = embed_scale  # the token embedding is multiplied by this (Huginn: sqrt(d_model))
        self.max_seq_len = max_seq_len
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if ffn_hidden is None:
            ffn_hidden = 64 * -(-8 * d_model // (3 * 64)) if mlp == "swiglu" else 4 * d_model
        self.ffn_hidden = ffn_hidden
        self.mlp = mlp
        self.norm_style = norm_style
        self.norm_eps = norm_eps
        self.norm_scale = norm_scale
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.logit_softcap = logit_softcap
        self.init_std = init_std
        self.mixer = mixer
        self.linear_mixer = linear_mixer
        self.conv_size = conv_size
        self.gdn_expand_v = gdn_expand_v
        self.gdn_chunk_size = gdn_chunk_size
        self.window = window
        self.dsa_topk = dsa_topk
        self.dsa_index_heads = dsa_index_heads
        self.dsa_index_dim = dsa_index_dim
        self.dsa_indexer_form = dsa_indexer_form
        # channels of the indexer's q/k under RoPE; None: half of dsa_index_dim (v3.2), 0 for the legacy form
        if dsa_index_rope_dim is None:
            dsa_index_rope_dim = dsa_index_dim // 2 if dsa_indexer_form == "v3.2" else 0
        self.dsa_index_rope_dim = int(dsa_index_rope_dim)
        self.n_prelude = n_prelude
        self.n_loop = n_loop
        self.n_coda = n_coda
        self.num_loops = num_loops
        self.max_loops = max_loops
        self.arch = arch
        self.injection = injection
        self.recall = recall
        self.internal_recall_site = internal_recall_site
        self.internal_recall_layers = internal_recall_layers
        self.normalization = normalization
        self.state_init = state_init
        self.state_init_std = state_init_std
        self.share_outer_final_norm = share_outer_final_norm
        # RMSNorm after the prelude (e = norm(P(emb(x)))); None: megaloop's default (on for Parcae unless
        # n_prelude = 0 and embed_norm already normalises e). The exporter writes the resolved value.
        if prelude_norm is None:
            prelude_norm = injection == "parcae" and (n_prelude > 0 or not embed_norm)
        self.prelude_norm = bool(prelude_norm)
        self.coda_norm = coda_norm  # RMSNorm on the loop's output before the coda (Huginn)
        self.exit_gate = exit_gate
        self.loop_residual_gate = loop_residual_gate
        self.attn_output_gate = attn_output_gate
        self.value_embeddings = value_embeddings  # per-layer token tables gated into the attention values
        self.noise_init = noise_init
        self.noise_seed = noise_seed
        self.exit_strategy = exit_strategy
        self.exit_threshold = exit_threshold
        self.exit_kv = exit_kv
        self.use_cache = use_cache
        # Distinct layers (the looped ones count once); the effective depth is n_prelude + n_loop * R + n_coda.
        self.num_hidden_layers = n_prelude + n_loop + n_coda
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self.check()

    def check(self):
        """Refuse values this modeling file cannot run, naming the field."""
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"MegaloopConfig.{name}={value!r} is not one of {list(options)}")
        choice("arch", ARCHITECTURES)
        choice("injection", INJECTIONS)
        choice("mlp", ("swiglu", "relu2"))
        choice("norm_style", ("pre", "sandwich", "huginn"))
        choice("recall", ("standard", "internal"))
        choice("internal_recall_site", ("pre_attn", "pre_mlp"))
        choice("internal_recall_layers", ("first", "all"))
        choice("normalization", ("inner", "outer"))
        choice("state_init", ("embed", "zeros", "noise"))
        choice("noise_init", ("seeded", "global_rng", "zeros"))
        choice("exit_strategy", (None, "q_exit", "kl"))
        choice("exit_kv", ("copy", "compute"))
        choice("dsa_indexer_form", ("v3.2", "legacy"))
        if self.dsa_index_rope_dim % 2 or not 0 <= self.dsa_index_rope_dim <= self.dsa_index_dim or (
                self.dsa_indexer_form == "legacy" and self.dsa_index_rope_dim):
            raise ValueError(f"MegaloopConfig.dsa_index_rope_dim={self.dsa_index_rope_dim} must be even, in [0, "
                             f"dsa_index_dim={self.dsa_index_dim}], and 0 for dsa_indexer_form='legacy'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"MegaloopConfig: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        for name in ("conv_size", "gdn_chunk_size", "window", "dsa_topk", "dsa_index_heads", "dsa_index_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MegaloopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.gdn_expand_v <= 0 or not float(self.head_dim * self.gdn_expand_v).is_integer():
            raise ValueError(f"MegaloopConfig.gdn_expand_v={self.gdn_expand_v} must be > 0 and give an integer "
                             f"value head dim (head_dim={self.head_dim})")
        if self.num_loops < 1:
            raise ValueError(f"MegaloopConfig.num_loops must be >= 1, got {self.num_loops}")
        if self.exit_strategy == "q_exit" and not self.exit_gate:
            raise ValueError("MegaloopConfig.exit_strategy='q_exit' needs exit_gate=True")


__all__ = ["MegaloopConfig"]
