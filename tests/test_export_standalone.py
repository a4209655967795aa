"""The exported folder loads in a fresh process that has transformers but not megaloop; with megaloop
installed the classes are registered, so no remote code is needed."""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from megaloop.export import export_hf, register_hf
from export_support import perturbed_model, tiny_config

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.append({site!r})            # transformers, torch; no .pth files run, so no editable megaloop
    try:
        import megaloop
    except ImportError:
        pass
    else:
        raise SystemExit("megaloop is importable in the sanitized process: " + megaloop.__file__)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = {path!r}
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok("The loop", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = {{R: model(ids, num_loops=R).logits.tolist() for R in (1, 3)}}
        gen = model.generate(ids, max_new_tokens=5, do_sample=False, num_loops=3)
    mods = sorted(m for m in sys.modules if m.split(".")[0] in ("megaloop", "deepspeed"))
    json.dump({{"ids": ids.tolist(), "logits": logits, "gen": gen.tolist(), "mods": mods,
               "cls": type(model).__name__, "arch": cfg.arch}}, open({result!r}, "w"))
""")


# huginn: prelude + coda, concat adapter, Huginn's norms (norm_style huginn, coda_norm), embed_scale, noise init;
# lt2_gdn_dsa: Gated DeltaNet + DSA
@pytest.mark.parametrize("name", ["huginn", "lt2_gdn_dsa"])
def test_exported_folder_loads_without_megaloop(tmp_path, name):
    cfg = tiny_config(name)
    model = perturbed_model(cfg)
    out = export_hf(model.state_dict(), cfg, cfg.data, tmp_path / "export")
    site = sysconfig.get_paths()["purelib"]
    result = tmp_path / "result.json"
    script = SCRIPT.format(site=site, path=str(out), result=str(result))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["mods"] == [] and res["cls"] == "MegaloopForCausalLM" and res["arch"] == "recurrent"
    ids = torch.tensor(res["ids"])
    assert ids.tolist() == [list(b"The loop")]
    from megaloop.export import load_exported

    hf = load_exported(out)  # the same seeded noise as the subprocess used
    with torch.no_grad():
        for R in (1, 3):
            positions = torch.arange(ids.shape[1])[None]
            if cfg.model.state_init == "noise":
                model.block.initial_state = lambda e, generator=None: hf.noise_for_positions(positions, e)
            torch.testing.assert_close(torch.tensor(res["logits"][str(R)]), model(ids, loops=R).logits,
                                       rtol=0, atol=1e-5)
        gen = hf.generate(ids, max_new_tokens=5, do_sample=False, num_loops=3)
    assert res["gen"] == gen.tolist()


def test_registered_classes_need_no_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    register_hf()
    register_hf()  # idempotent
    cfg = tiny_config("ouro")
    out = export_hf(perturbed_model(cfg).state_dict(), cfg, cfg.data, tmp_path / "m", verify=False)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_megaloop.MegaloopForCausalLM"
    from megaloop.export.hf_template.modeling_megaloop import MegaloopForCausalLM

    assert type(AutoConfig.from_pretrained(out)).__module__ == "megaloop.export.hf_template.configuration_megaloop"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert type(model) is MegaloopForCausalLM


def test_template_files_import_only_torch_and_transformers():
    import ast
    from pathlib import Path

    from megaloop.export.hf_files import TEMPLATE_DIR, TEMPLATE_FILES

    allowed = {"torch", "transformers", "math", "dataclasses", "typing", "os", "shutil", "__future__",
               "sentencepiece"}  # sentencepiece: tokenizer file only, imported lazily
    for name in TEMPLATE_FILES:
        src = (Path(TEMPLATE_DIR) / name).read_text()
        assert ".cuda(" not in src and "torch.cuda" not in src
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
            else:
                continue
            assert roots <= allowed, (name, roots)
            if "sentencepiece" in roots:
                assert name == "tokenization_megaloop.py"
