"""Unrolled export to a plain LlamaForCausalLM: exact where representable, refused clearly elsewhere."""
import pytest
import torch

from megaloop.export import ExportError
from megaloop.export.llama_export import export_llama
from export_support import perturbed_model, tiny_config


@pytest.mark.parametrize("name,overrides,loops", [
    ("lt", ["model.normalization=inner"], 3),          # a plain loop of pre-norm SwiGLU layers, any R
    ("lt", ["model.normalization=inner", "model.tie_embeddings=false", "model.n_prelude=1",
            "model.n_coda=1", "model.norm_scale=false"], 2),
    ("lt", [], 1),                                     # outer norm never applies at R = 1
    ("flt", [], 1),                                    # FLT at R = 1 is the plain transformer
    ("plain", [], 1),
])
def test_llama_logits_equal_megaloop(tmp_path, name, overrides, loops):
    from transformers import LlamaForCausalLM

    cfg = tiny_config(name, overrides)
    model = perturbed_model(cfg)
    out = export_llama(model.state_dict(), cfg, cfg.data, tmp_path / "llama", loops=loops)
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    assert llama.config.num_hidden_layers == cfg.model.n_prelude + loops * cfg.model.n_loop + cfg.model.n_coda
    x = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(x).logits, model(x, loops=loops).logits, rtol=0, atol=1e-5)
        a = llama.generate(x[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=257)
        assert a.shape == (2, 12)


@pytest.mark.parametrize("name,loops,pattern", [
    ("lt", 3, "normalization='outer' normalises the residual stream between loops"),
    ("inject_add_inner", 2, "injection='add' feeds the input embedding back"),
    ("flt", 2, "restarts every loop from e"),
    ("ouro", 1, "norm_style='sandwich'"),
    ("parcae", 1, "mlp='relu2'"),
    ("lt2_gates", 1, "loop_residual_gate"),
])
def test_unrepresentable_architectures_are_refused(tmp_path, name, loops, pattern):
    cfg = tiny_config(name)
    with pytest.raises(ExportError, match=pattern):
        export_llama(perturbed_model(cfg).state_dict(), cfg, cfg.data, tmp_path / "llama", loops=loops)
    assert list(tmp_path.iterdir()) == []


def test_export_tool_llama_format(tmp_path, capsys):
    from megaloop.checkpoint import save_plain_checkpoint
    from tools.export_hf import main

    cfg = tiny_config("lt", ["model.normalization=inner"])
    save_plain_checkpoint(perturbed_model(cfg), cfg, tmp_path / "run" / "model.pt")
    assert main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "l"), "--format", "llama",
                 "--loops", "2"]) == 0
    assert (tmp_path / "l" / "config.json").is_file()
    cfg = tiny_config("lt")
    save_plain_checkpoint(perturbed_model(cfg), cfg, tmp_path / "run2" / "model.pt")
    assert main(["--checkpoint", str(tmp_path / "run2"), "--output", str(tmp_path / "l2"), "--format",
                 "llama"]) == 2
    assert "not exactly a Llama model" in capsys.readouterr().err
