"""Kernel selection on CPU: GDN's fla-or-torch choice (megaloop.ops.gated_delta) and RMSNorm's
apex-or-torch choice (megaloop.ops.fused), with stub `fla` / `apex` packages in sys.modules and the
"supported device" predicates monkeypatched so the probes run on CPU tensors."""
import importlib.abc
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import megaloop.ops.gated_delta as gd
from megaloop.config import ConfigError, load_config
from megaloop.model import build_model

TRITON_MESSAGE = ("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for this kernel; "
                  "please upgrade Triton or install tilelang")


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv("MEGALOOP_GDN_COMPILE", raising=False)
    gd.reset_kernel_cache()
    yield
    gd.reset_kernel_cache()


def _inputs(B=2, T=37, H=2, Dk=8, Dv=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -0.5 * F.softplus(torch.randn(B, T, H, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def _install_fake_fla(monkeypatch, chunk_fn, version="0.0-stub"):
    fla = types.ModuleType("fla")
    fla.__version__ = version
    ops = types.ModuleType("fla.ops")
    gdr = types.ModuleType("fla.ops.gated_delta_rule")
    gdr.chunk_gated_delta_rule = chunk_fn
    fla.ops, ops.gated_delta_rule = ops, gdr
    for name, mod in (("fla", fla), ("fla.ops", ops), ("fla.ops.gated_delta_rule", gdr)):
        monkeypatch.setitem(sys.modules, name, mod)


class _Calls:
    def __init__(self):
        self.n = 0


def _working_fla(calls):
    """fla's signature, computing with megaloop's recurrent reference (an independent code path)."""
    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, **_):
        calls.n += 1
        o, s = gd.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=initial_state, scale=scale)
        return o, (s if output_final_state else None)
    return chunk_gated_delta_rule


class _RaisesInBackward(torch.autograd.Function):
    """Forward works, backward raises -- what fla 0.6 does on Hopper with Triton 3.6."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        return gd.gated_delta_rule_recurrent(q, k, v, g, beta)

    @staticmethod
    def backward(ctx, do, ds):
        raise RuntimeError(TRITON_MESSAGE)


def _fla_raising_in_backward(calls):
    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, **_):
        calls.n += 1
        return _RaisesInBackward.apply(q, k, v, g, beta)
    return chunk_gated_delta_rule


@pytest.fixture
def cpu_counts_as_supported(monkeypatch):
    monkeypatch.setattr(gd, "fla_device_supported", lambda device, dtype: None)


def _gdn_warnings(record):
    return [w for w in record if issubclass(w.category, gd.GDNKernelWarning)]


# ------------------------------------------------------------------------------------------------
# GDN


def test_auto_picks_fla_when_it_imports_and_runs(monkeypatch, cpu_counts_as_supported):
    calls = _Calls()
    _install_fake_fla(monkeypatch, _working_fla(calls))
    inputs = _inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        o, s = gd.gated_delta_rule(*inputs, chunk_size=8)
        gd.gated_delta_rule(*inputs, chunk_size=8)
    assert not _gdn_warnings(record)
    assert gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8).name == "fla"
    assert calls.n == 1 + 2  # the probe once, then each call
    o_ref, s_ref = gd.gated_delta_rule_chunked(*inputs, chunk_size=8)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_auto_falls_back_with_exactly_one_warning_when_fla_raises_in_backward(monkeypatch, cpu_counts_as_supported):
    calls = _Calls()
    _install_fake_fla(monkeypatch, _fla_raising_in_backward(calls))
    inputs = [x.requires_grad_(True) for x in _inputs()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            o, s = gd.gated_delta_rule(*inputs, chunk_size=8)
            (o.sum() + s.sum()).backward()  # the torch path trains
    ours = _gdn_warnings(record)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "falling back to the torch chunked form" in str(ours[0].message)
    assert "Triton >= 3.4.0" in str(ours[0].message)
    assert calls.n == 1  # only the probe touched fla
    o_ref, _ = gd.gated_delta_rule_chunked(*[x.detach() for x in inputs], chunk_size=8)
    torch.testing.assert_close(o.detach(), o_ref)


def test_auto_falls_back_when_fla_is_missing_or_wrong(monkeypatch, cpu_counts_as_supported):
    monkeypatch.setitem(sys.modules, "fla", None)  # "import fla" raises ImportError
    with pytest.warns(gd.GDNKernelWarning, match="does not import: ModuleNotFoundError"):
        gd.gated_delta_rule(*_inputs())
    gd.reset_kernel_cache()

    def wrong(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
        o, s = gd.gated_delta_rule_recurrent(q, k, v, g, beta, scale=scale)
        return 2 * o, s
    _install_fake_fla(monkeypatch, wrong)
    with pytest.warns(gd.GDNKernelWarning, match="disagrees with the torch reference"):
        gd.gated_delta_rule(*_inputs())
    assert gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8).name == "torch"


def test_fla_mode_fails_with_one_clear_line(monkeypatch, cpu_counts_as_supported):
    _install_fake_fla(monkeypatch, _fla_raising_in_backward(_Calls()))
    with pytest.raises(gd.GDNKernelUnavailable, match=r"model.gdn_kernel=fla.*Triton >= 3.4.0") as info:
        gd.gated_delta_rule(*_inputs(), kernel="fla")
    assert "\n" not in str(info.value)


def test_fla_mode_on_cpu_names_the_device(monkeypatch):
    calls = _Calls()
    _install_fake_fla(monkeypatch, _working_fla(calls))
    with pytest.raises(gd.GDNKernelUnavailable, match="need a CUDA device, not cpu"):
        gd.gated_delta_rule(*_inputs(), kernel="fla")
    assert calls.n == 0


class _RecordFlaImports(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        if name == "fla" or name.startswith("fla."):
            self.names.append(name)
        return None


def test_torch_mode_never_imports_fla(monkeypatch, cpu_counts_as_supported):
    for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    finder = _RecordFlaImports()
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    inputs = _inputs()
    o, _ = gd.gated_delta_rule(*inputs, kernel="torch")
    assert gd.select_gdn_kernel("torch", "cpu", torch.float32, 8, 8).name == "torch"
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.mixer=gdn", "model.gdn_kernel=torch"])
    assert "model.gdn_kernel=torch" in gd.describe_kernel_choice(cfg, "cpu", "fp32")
    model = build_model(cfg)
    model(torch.randint(0, 258, (1, 9)), loops=2)
    assert finder.names == []
    torch.testing.assert_close(o, gd.gated_delta_rule_chunked(*inputs)[0])


def test_the_mixer_carries_model_gdn_kernel():
    base = ["model.d_model=32", "model.n_heads=4", "model.mixer=gdn"]
    with pytest.raises(ConfigError, match="model.gdn_kernel='triton' is not one of"):
        load_config(None, base + ["model.gdn_kernel=triton"])
    x = torch.randint(0, 258, (1, 9))
    with pytest.raises(gd.GDNKernelUnavailable, match="CUDA"):
        build_model(load_config(None, base + ["model.gdn_kernel=fla"]))(x, loops=1)
    torch.manual_seed(0)
    auto = build_model(load_config(None, base))
    torch.manual_seed(0)
    forced = build_model(load_config(None, base + ["model.gdn_kernel=torch"]))
    assert torch.equal(auto(x, loops=2).logits, forced(x, loops=2).logits)


def test_describe_kernel_choice_on_cpu():
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.mixer=2:1", "model.n_loop=3"])
    line = gd.describe_kernel_choice(cfg, torch.device("cpu"), torch.bfloat16)
    assert line.startswith("GDN kernel: torch chunked form on cpu/bfloat16 (model.gdn_kernel=auto;")
    assert "CUDA" in line
    attn_only = load_config(None, ["model.d_model=32", "model.n_heads=4"])
    assert "unused" in gd.describe_kernel_choice(attn_only.model, "cpu", "fp32")


def test_describe_kernel_choice_names_fla_when_chosen(monkeypatch, cpu_counts_as_supported):
    _install_fake_fla(monkeypatch, _working_fla(_Calls()), version="9.9")
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.mixer=gdn"])
    assert gd.describe_kernel_choice(cfg, "cpu", "fp32") == \
        "GDN kernel: fla 9.9 chunk_gated_delta_rule on cpu/float32 (model.gdn_kernel=auto)"


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setenv("MEGALOOP_GDN_COMPILE", "1")

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = _inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [gd.gated_delta_rule(*inputs, chunk_size=8) for _ in range(2)]
    ours = _gdn_warnings(record)
    assert len(ours) == 1 and "torch.compile" in str(ours[0].message) and "no compiler here" in str(ours[0].message)
    assert gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8).name == "torch"
    assert torch.equal(outs[0][0], gd.gated_delta_rule_chunked(*inputs, chunk_size=8)[0])


def test_compiled_torch_path_traces_and_matches_eager(monkeypatch):
    # Dynamo with the "eager" backend: the graph capture is real, the code generation is skipped
    # (Inductor on a shared 2-core CPU would take minutes). On GPUs the backend is Inductor.
    monkeypatch.setattr(gd, "_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    inputs = _inputs(T=20)
    choice = gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8, compile=True)
    assert choice.name == "torch+compile"
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    o, s = choice.fn(*leaves, None, None, 8)
    (o.sum() + s.sum()).backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in inputs]
    o_ref, s_ref = gd.gated_delta_rule_chunked(*ref_leaves, chunk_size=8)
    (o_ref.sum() + s_ref.sum()).backward()
    torch.testing.assert_close(o, o_ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():  # evaluation runs eagerly: no recompilation per context length
        assert torch.equal(choice.fn(*inputs, None, None, 8)[0], gd.gated_delta_rule_chunked(*inputs, chunk_size=8)[0])
    torch._dynamo.reset()


def test_probe_leaves_the_global_rng_alone(monkeypatch, cpu_counts_as_supported):
    _install_fake_fla(monkeypatch, _working_fla(_Calls()))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8)
    assert torch.equal(torch.rand(3), expected)


def test_dispatch_traces_inside_a_compiled_region(monkeypatch):
    # train.compile compiles whole layers: the CPU dispatch must trace without a graph break...
    inputs = _inputs(T=20)
    compiled = torch.compile(gd.gated_delta_rule, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs, chunk_size=8)[0], gd.gated_delta_rule_chunked(*inputs, chunk_size=8)[0])
    torch._dynamo.reset()


def test_first_selection_inside_a_compiled_region_probes_eagerly(monkeypatch, cpu_counts_as_supported):
    # ...and a selection first reached while tracing runs its probe (and fla) outside the graph.
    calls = _Calls()
    _install_fake_fla(monkeypatch, _working_fla(calls))
    inputs = _inputs(T=20)
    compiled = torch.compile(lambda *xs: gd.gated_delta_rule(*xs, chunk_size=8), backend="eager")
    o, _ = compiled(*inputs)
    assert gd.select_gdn_kernel("auto", "cpu", torch.float32, 8, 8).name == "fla"
    assert calls.n == 2  # probe + the call
    torch.testing.assert_close(o, gd.gated_delta_rule_chunked(*inputs, chunk_size=8)[0])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# RMSNorm: NVIDIA Apex or torch

import megaloop.ops.fused as fused  # noqa: E402
from megaloop.model.layers import RMSNorm  # noqa: E402


@pytest.fixture
def fresh_norms():
    fused.reset_norm_cache()
    yield
    fused.reset_norm_cache()


def _install_fake_apex(monkeypatch, calls, affine=None, with_extension=True):
    def fused_rms_norm_affine(x, weight, normalized_shape, eps=1e-6, memory_efficient=False):
        calls.n += 1
        return fused.rms_norm_reference(x, weight, eps)

    def fused_rms_norm(x, normalized_shape, eps=1e-6, memory_efficient=False):
        calls.n += 1
        return fused.rms_norm_reference(x, None, eps)

    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    fln = types.ModuleType("apex.normalization.fused_layer_norm")
    fln.fused_rms_norm_affine = affine or fused_rms_norm_affine
    fln.fused_rms_norm = fused_rms_norm
    apex.normalization, normalization.fused_layer_norm = normalization, fln
    for name, mod in (("apex", apex), ("apex.normalization", normalization),
                      ("apex.normalization.fused_layer_norm", fln)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda",
                        types.ModuleType("fused_layer_norm_cuda") if with_extension else None)


@pytest.fixture
def cpu_counts_as_cuda_for_apex(monkeypatch):
    monkeypatch.setattr(fused, "apex_device_supported", lambda device: None)


def test_rms_norm_torch_path_keeps_the_original_numerics(fresh_norms):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 64, generator=gen) * 3
    w = 1 + 0.1 * torch.randn(64, generator=gen)
    # float32: torch.nn.functional.rms_norm is the original formula bit for bit, with or without weight
    assert fused.select_rms_norm("cpu", torch.float32, torch.float32).startswith("torch.nn.functional.rms_norm")
    assert torch.equal(fused.rms_norm_affine(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(fused.rms_norm_affine(x, None, 1e-5), fused.rms_norm_reference(x, None, 1e-5))
    # bfloat16: statistic in fp32 both ways; the weight product may round once instead of twice
    xb, wb = x.bfloat16(), w.bfloat16()
    got, want = fused.rms_norm_affine(xb, wb, 1e-6), fused.rms_norm_reference(xb, wb, 1e-6)
    assert got.dtype == want.dtype == torch.bfloat16
    ulp = want.float().abs().clamp_min(2 ** -126) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= ulp).all()
    # float64 and mixed dtypes keep the original formula exactly
    assert torch.equal(fused.rms_norm_affine(x.double(), w.double(), 1e-6), fused.rms_norm_reference(x.double(), w.double(), 1e-6))
    assert torch.equal(fused.rms_norm_affine(xb, w, 1e-6), fused.rms_norm_reference(xb, w, 1e-6))
    assert fused.select_rms_norm("cpu", torch.bfloat16, torch.float32).startswith("reference formula")


def test_rms_norm_module_uses_the_selected_kernel(fresh_norms):
    torch.manual_seed(0)
    norm, bare = RMSNorm(32, eps=1e-5), RMSNorm(32, scale=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = norm(x)
    y.sum().backward()
    assert torch.equal(y, fused.rms_norm_reference(x, norm.weight, 1e-5))
    assert norm.weight.grad is not None and x.grad is not None
    assert torch.equal(bare(x), fused.rms_norm_reference(x, None, 1e-6))


def test_apex_stub_is_ignored_on_cpu(monkeypatch, fresh_norms):
    calls = _Calls()
    _install_fake_apex(monkeypatch, calls)
    RMSNorm(16)(torch.randn(3, 16))
    assert calls.n == 0
    assert "CUDA-only" in fused.describe_norm_choice("cpu", "fp32")


def test_apex_is_selected_when_it_imports_and_runs(monkeypatch, fresh_norms, cpu_counts_as_cuda_for_apex):
    calls = _Calls()
    _install_fake_apex(monkeypatch, calls)
    norm, bare = RMSNorm(16), RMSNorm(16, scale=False)
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.testing.assert_close(norm(x), fused.rms_norm_reference(x, norm.weight, 1e-6))
        norm(x)
        bare(x)
    assert not [w for w in record if issubclass(w.category, fused.ApexFallbackWarning)]
    assert calls.n == (1 + 2) + (1 + 1)  # one probe per (dtype, weight dtype), then each call
    assert fused.describe_norm_choice("cpu", torch.float32) == \
        "RMSNorm kernel: NVIDIA Apex fused_rms_norm_affine on cpu/float32"


def test_apex_missing_or_without_kernels_means_torch(monkeypatch, fresh_norms, cpu_counts_as_cuda_for_apex):
    monkeypatch.setitem(sys.modules, "apex", None)
    assert "NVIDIA Apex not importable" in fused.describe_norm_choice("cpu", "bf16")
    fused.reset_norm_cache()
    calls = _Calls()
    _install_fake_apex(monkeypatch, calls, with_extension=False)  # a Python-only Apex build
    line = fused.describe_norm_choice("cpu", "bf16")
    assert line.startswith("RMSNorm kernel: torch.nn.functional.rms_norm") and "fused_layer_norm_cuda" in line
    assert calls.n == 0


def test_apex_failing_its_probe_warns_once(monkeypatch, fresh_norms, cpu_counts_as_cuda_for_apex):
    def broken(x, weight, normalized_shape, eps=1e-6, memory_efficient=False):
        raise RuntimeError("no kernel image is available for execution on the device")
    _install_fake_apex(monkeypatch, _Calls(), affine=broken)
    norm = RMSNorm(16)
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            y = norm(x)
    ours = [w for w in record if issubclass(w.category, fused.ApexFallbackWarning)]
    assert len(ours) == 1 and "no kernel image" in str(ours[0].message)
    assert torch.equal(y, fused.rms_norm_reference(x, norm.weight, 1e-6))


def test_rms_norm_traces_inside_a_compiled_region(fresh_norms):
    norm = RMSNorm(16)
    x = torch.randn(3, 16)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), fused.rms_norm_reference(x, norm.weight, 1e-6))
    torch._dynamo.reset()


def test_packed_documents_reach_fla_as_cu_seqlens(monkeypatch, cpu_counts_as_supported):
    # data.reset_attention_mask on fla: the (B, T) batch flattened to one row cut at every row and document
    # start (fla's variable-length mode); the same output as the torch chunked form restarting per document.
    seen = []

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, **_):
        if cu_seqlens is None:  # (the probe)
            o, s = gd.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=initial_state, scale=scale)
            return o, (s if output_final_state else None)
        assert q.shape[0] == 1 and initial_state is None
        seen.append(cu_seqlens.tolist())
        cuts = cu_seqlens.tolist()
        pieces = [gd.gated_delta_rule_recurrent(*(x[:, a:b] for x in (q, k, v, g, beta)), scale=scale)[0]
                  for a, b in zip(cuts[:-1], cuts[1:])]
        return torch.cat(pieces, dim=1), None

    _install_fake_fla(monkeypatch, chunk_gated_delta_rule)
    inputs = _inputs(T=37)
    ids = torch.zeros(2, 37, dtype=torch.long)
    ids[0, 10:] += 1
    ids[0, 30:] += 1
    o, s = gd.gated_delta_rule(*inputs, chunk_size=8, doc_ids=ids)
    assert seen == [[0, 10, 30, 37, 74]] and s is None
    torch.testing.assert_close(o, gd.gated_delta_rule_chunked(*inputs, chunk_size=8, doc_ids=ids)[0])
