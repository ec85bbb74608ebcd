"""Model level: the fused model (fused attention + fused block kernels) against the reference model,
logits and every parameter gradient; on CPU through the C++ twins / Triton interpreter, on CUDA in bf16."""
import os
import types

import pytest
import torch

import interpreter_bf16
from beit_fast._backend import extension
from beit_fast.models import create_model
from test_model import randomize_
from tolerances import Close, assert_close, assert_two_x, tolerance, ulp

CASES = [
    # name, overrides
    ("beit_test_patch4_32", {}),
    ("beit_test_patch4_32", {"init_values": None}),
    ("beit_test_patch4_32", {"use_mean_pooling": False}),
    ("beit_test_patch4_32_mim", {}),
    ("beit_test_patch4_32", {"use_shared_rel_pos_bias": True}),
    ("beit_test_patch4_32_mim", {"fused_mlp": False}),
]


def _pair(name, overrides, fused_attn_impl="fused"):
    """(reference, fused) models with the same random weights; the fused one runs every fused op, linear_gelu
    included (fused_mlp=True, not the model's default), unless overrides say otherwise."""
    ref = randomize_(create_model(name, attn_impl="eager", fused=False,
                                  **{k: v for k, v in overrides.items() if k != "fused_mlp"}))
    fused = create_model(name, attn_impl=fused_attn_impl, fused=True, **{"fused_mlp": True, **overrides})
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _run(model, x, mask, seed):
    """Logits and every parameter gradient of sum(logits * w), w random (the same for every model given the
    seed): gradients of order one, where a mean over the logits left many near 1e-4, under an absolute bound."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, mask) if mask is not None else model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1000 + seed)).to(out.device)
    (out.float() * w).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _scaled(bound, ref):
    """bound with its atol relative to the tensor's own largest magnitude (a gradient of 1e-4 is held to
    1e-4 * atol, not to atol)."""
    return Close(atol=bound.atol * max(ref.abs().max().item(), 1e-30), rtol=bound.rtol)


def _compare(ref, fused, x, mask, bound, seed=0):
    o_ref, g_ref = _run(ref, x, mask, seed)
    o_fu, g_fu = _run(fused, x, mask, seed)
    assert_close("logits", o_fu, o_ref, bound)
    assert g_ref.keys() == g_fu.keys()
    for n in g_ref:
        assert g_ref[n].abs().max() > 0, f"grad of {n} is zero in the reference: nothing to compare"
        assert_close(f"grad of {n}", g_fu[n], g_ref[n], _scaled(bound, g_ref[n]))


def _graph_nodes(out):
    """Class names of every autograd node behind `out`."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")


def _fused_nodes(backend, overrides):
    """The fused ops' autograd nodes a fused model's output must hang on (auto on CPU: the C++ ops; triton:
    the Triton ops too). Without beit_fast._C (a checkout run from its folder, never CI, which checks the
    import) its ops take their references, so only the Triton nodes are expected."""
    nodes = set() if extension()[0] is None else {"MaskedPatchEmbedBackward", "LayerScaleResidualNormBackward"}
    if backend == "triton":
        nodes |= {"RelPosAttentionQKVPackedTritonBackward", "LayerNormTritonBackward"}
        if overrides.get("fused_mlp", True):
            nodes.add("LinearGeluTritonBackward")
    return nodes


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("name, overrides", CASES)
def test_fused_model_matches_reference_cpu(name, overrides, backend, monkeypatch):
    """Logits and every parameter gradient of the fused model against the reference model. backend auto: the
    C++ ops' CPU kernels, the Triton ops' references; triton: every Triton op runs its kernel (the
    interpreter). The fused ops' autograd nodes are checked to be in the graph (no silent fallback)."""
    if backend == "triton":
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
    ref, fused = _pair(name, overrides)
    x = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 64) < 0.4) if name.endswith("_mim") else None
    missing = _fused_nodes(backend, overrides) - _graph_nodes(fused(x, mask) if mask is not None else fused(x))
    assert not missing, missing
    tol = tolerance("fused_model.triton" if backend == "triton" else "fused_model", torch.float32)
    _compare(ref.eval(), fused.eval(), x, mask, tol)


def test_hooks_wrappers_and_compiled_blocks_run_in_the_fused_model():
    """The fused loop calls each block's forward_fused, with the next block's LayerNorm in its epilogue: hooks
    on a block or on the modules forward_fused reads without calling (norm1, norm2, mlp), checkpoint_wrapper
    and block.compile() were silently skipped (no features from a hook, no memory saved). Such blocks are
    called as modules, fused (or as the reference block where its submodules' hooks must run), with the
    reference model's logits and gradients; a final norm without affine parameters is applied (the fused
    loop returned None)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    x = torch.randn(2, 3, 32, 32)
    tol = tolerance("fused_model", torch.float32)
    ref, fused = _pair("beit_test_patch4_32", {})
    ref.eval(), fused.eval()
    seen = []
    handles = [fused.blocks[1].register_forward_hook(lambda m, a, out: seen.append(("block1", out.shape))),
               fused.blocks[0].norm2.register_forward_hook(lambda m, a, out: seen.append(("norm2", out.shape)))]
    _compare(ref, fused, x, None, tol)
    assert seen == [("norm2", (2, 65, 64)), ("block1", (2, 65, 64))]
    for h in handles:
        h.remove()

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return total[0]

    unwrapped = saved_bytes(fused)
    calls = []
    fused.blocks[0] = checkpoint_wrapper(fused.blocks[0])
    fused.blocks[1].compile(backend=lambda gm, example_inputs: calls.append(1) or gm.forward)
    assert saved_bytes(fused) < 0.8 * unwrapped                       # block 0 keeps its input only
    assert calls, "the compiled block never ran"
    o_ref, g_ref = _run(ref, x, None, 0)
    o_fu, g_fu = _run(fused, x, None, 0)
    assert_close("logits", o_fu, o_ref, tol)
    g_fu = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in g_fu.items()}
    assert g_fu.keys() == g_ref.keys()
    for n in g_ref:
        assert_close(f"grad of {n}", g_fu[n], g_ref[n], _scaled(tol, g_ref[n]))
    feats = create_model("beit_test_patch4_32", fused=True).forward_features(
        x, final_norm=torch.nn.LayerNorm(64, elementwise_affine=False))
    assert feats is not None and feats.shape == (2, 65, 64)
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2, 65), atol=1e-5, rtol=0)   # normalized tokens


def test_checkpointed_fused_model_saves_what_the_reference_saves():
    """Under activation checkpointing each checkpointed block keeps its input only: the fused chain's blocks
    also took the normalized input h, one more (B, N, C) tensor per block (1.85x the reference's memory, in the
    mode chosen to save it)."""
    def saved_bytes(fused):
        m = create_model("beit_test_patch4_32", fused=fused, depth=6).train()
        m.set_grad_checkpointing(True)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.randn(2, 3, 32, 32)).sum().backward()
        return total[0]
    ref, fused = saved_bytes(False), saved_bytes(True)
    assert fused <= 1.1 * ref, (fused, ref)


def test_fused_mlp_switch_picks_the_mlp_path(monkeypatch):
    """fused_mlp=False runs fc1 and GELU as the nn.Linear / nn.GELU modules, True through linear_gelu."""
    import importlib
    lg = importlib.import_module("beit_fast.ops.linear_gelu")   # the module (beit_fast.ops.linear_gelu is the op)
    calls = []
    monkeypatch.setattr(lg, "linear_gelu", lambda *a, **k: calls.append(1) or lg.linear_gelu_ref(*a))
    x = torch.randn(1, 3, 32, 32)
    for fused_mlp, expected in ((True, 2), (False, 0)):   # beit_test: 2 blocks
        calls.clear()
        create_model("beit_test_patch4_32", fused=True, fused_mlp=fused_mlp)(x)
        assert len(calls) == expected, (fused_mlp, calls)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_interpreter)])
def test_fused_model_drop_path_training_cpu(backend, monkeypatch):
    """With drop path in training mode both models draw the same per-sample scales in the same order."""
    if backend == "triton":
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
    ref, fused = _pair("beit_test_patch4_32_mim", {"drop_path_rate": 0.3})
    x, mask = torch.randn(4, 3, 32, 32), torch.rand(4, 64) < 0.4
    assert not _fused_nodes(backend, {}) - _graph_nodes(fused.train()(x, mask))
    tol = tolerance("fused_model.triton" if backend == "triton" else "fused_model", torch.float32)
    _compare(ref.train(), fused.train(), x, mask, tol, seed=3)


def test_fused_model_with_triton_interpreter(monkeypatch):
    """BEIT_FAST_BACKEND=triton: every Triton op of the model runs its kernel (the interpreter on CPU);
    the C++ ops keep their auto choice. CPU tensors only: on a GPU the bf16 2x-rule test below runs the kernels."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
    ref, fused = _pair("beit_test_patch4_32_mim", {})
    x, mask = torch.randn(1, 3, 32, 32), torch.rand(1, 64) < 0.4
    _compare(ref.eval(), fused.eval(), x, mask, tolerance("fused_model.triton", torch.float32))


def test_fused_residual_stream_stays_fp32_under_autocast():
    """Under bf16 autocast the residual stream keeps the parameters' dtype in both paths (a bf16 stream would
    round away BEiT-L's 1e-5 layer-scaled updates)."""
    for fused in (False, True):
        m = create_model("beit_test_patch4_32_mim", fused=fused, attn_impl="sdpa", drop_path_rate=0.2).train()
        seen = []
        for blk in m.blocks:
            if not fused:
                blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
                blk.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
            else:  # the fused loop calls forward_fused (hooks would make it call the blocks): record there
                orig = blk.forward_fused

                def wrapped(x, h, nxt, *a, _orig=orig, **k):
                    seen.append(x.dtype)
                    out = _orig(x, h, nxt, *a, **k)
                    seen.append(out[0].dtype)
                    return out
                blk.forward_fused = wrapped
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = m.forward_features(torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.4)
        assert len(seen) == 2 * len(m.blocks)
        assert set(seen) == {torch.float32}, (fused, seen)
        assert feats.dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fused_model_compiles_without_graph_breaks(device):
    """The whole fused training step (auto backends: C++ / reference ops on CPU, CUDA / Triton kernels on a
    GPU) traces into one graph, forward and backward, and computes what the eager fused model computes. The
    masked positions come as masked_index, as the trainer passes them (selecting by the bool mask alone has
    a data-dependent size: a graph break in older torch, e.g. 2.6)."""
    torch._dynamo.reset()
    m = randomize_(create_model("beit_test_patch4_32_mim", fused=True, attn_impl="auto", fused_mlp=True,
                                drop_path_rate=0.1)).to(device).train()
    x = torch.randn(2, 3, 32, 32, device=device)
    mask = torch.rand(2, 64, device=device) < 0.4
    index = mask.reshape(-1).nonzero().squeeze(1)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for model in (m, compiled):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)   # drop path draws the same scales in both runs
        out = model(x, mask, masked_index=index)
        out.float().square().mean().backward()
        if model is m:
            eager_out, eager_grads = out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(out.detach(), eager_out, atol=1e-5, rtol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_auto_attention_without_relative_bias():
    """attn_impl='auto' picks the fused kernel only when there is a table to gather (the unilm pt1k
    attention-analysis layout has absolute positions and no relative bias)."""
    from beit_fast.models.beit import _resolve_attn_impl
    x = torch.empty(1, device="meta")
    assert _resolve_attn_impl("auto", x, has_table=False) == "sdpa"
    assert _resolve_attn_impl("auto", x, has_table=True) == "sdpa"  # not CUDA


def test_fused_false_is_the_reference_attention_on_cuda():
    """fused=False makes the model the plain reference: "auto" attention resolves to SDPA even for CUDA
    inputs; the default (fused=None) and fused=True take the fused kernel there; an explicit attn_impl wins."""
    from beit_fast.models.beit import _resolve_attn_impl
    cuda_x = types.SimpleNamespace(is_cuda=True)
    assert _resolve_attn_impl("auto", cuda_x, True, fused=False) == "sdpa"
    assert _resolve_attn_impl("auto", cuda_x, True, fused=None) == "fused"
    assert _resolve_attn_impl("auto", cuda_x, True, fused=True) == "fused"
    assert _resolve_attn_impl("fused", cuda_x, True, fused=False) == "fused"
    for name, fused in (("beit_test_patch4_32", False), ("beit_test_patch4_32", None)):
        m = create_model(name, fused=fused)
        assert all(b.attn.fused is fused for b in m.blocks)
    m = create_model("beit_test_patch4_32", use_rel_pos_bias=False, use_abs_pos_emb=True)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cpu", marks=interpreter_bf16.needs_cpu_bf16())])
@pytest.mark.parametrize("name", ["beit_test_patch4_32", "beit_test_patch4_32_mim"])
def test_fused_model_bf16_2x_rule(name, device, monkeypatch):
    """Error of the fused bf16 model against the fp32 reference at most 2x the error of the reference
    model run in bf16 (plus a small atol). On the CPU every Triton op runs its kernel through the interpreter
    with bf16 emulated (tests/interpreter_bf16.py), the C++ ops their CPU kernels."""
    if device == "cpu":
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
    ref32, fused = _pair(name, {})
    ref32, fused = ref32.to(device).eval(), fused.to(device).eval()
    ref16 = create_model(name, attn_impl="eager", fused=False).to(device).eval()
    ref16.load_state_dict(ref32.state_dict())
    x = torch.randn(4, 3, 32, 32, device=device)
    mask = (torch.rand(4, 64, device=device) < 0.4) if name.endswith("_mim") else None
    o32, g32 = _run(ref32, x, mask, 0)
    with torch.autocast(device, dtype=torch.bfloat16):
        o16, g16 = _run(ref16, x, mask, 0)
        of, gf = _run(fused, x, mask, 0)
    # The logits and every weight's gradient under autocast come out of a bf16 GEMM (for a gradient the cast's
    # backward only widens it), so one rounding step the reference happened not to take costs a bf16 ulp of
    # the largest entry: that ulp is part of the slack. Without it seeds failed: head.weight 0.00341 >
    # 2 x 0.00114 + 0.001; the logits (4 x 10 values below 1) in 6 of 308 seeds (up to 1.23x the bound; with
    # the ulp the worst of 308 seeds per model was 0.75 of it).
    m = o32.abs().max().item()
    assert_two_x("logits", of, o16, o32, tolerance("fused_model", torch.bfloat16, "logits").atol + ulp(m, torch.bfloat16))
    for n in g32:
        m = g32[n].abs().max().item()
        atol = tolerance("fused_model", torch.bfloat16, "grads").atol * m + ulp(m, torch.bfloat16)
        assert_two_x(f"grad of {n}", gf[n], g16[n], g32[n], atol)


def test_compiled_fused_model_compiles_once():
    """A fresh process (Triton's import state not yet resolved): the second call of a compiled fused model
    reuses the first compile (the backend choice reads state that creating the model resolves)."""
    import subprocess
    import sys
    code = ("import torch, torch._dynamo\n"
            "torch._dynamo.config.error_on_recompile = True\n"
            "from beit_fast.models import create_model\n"
            "m = create_model('beit_test_patch4_32', fused=True)\n"
            "c = torch.compile(m, backend='eager')\n"
            "x = torch.randn(1, 3, 32, 32)\n"
            "c(x); c(x)\n"
            "print('compiled once')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled once" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.parametrize("name, overrides", [
    ("beit_test_patch4_32", {}),                          # mean pooling: no final norm fused into the last block
    ("beit_test_patch4_32", {"use_mean_pooling": False}),  # cls pooling: the final norm in the last epilogue
    ("beit_test_patch4_32_mim", {}),
])
def test_fused_model_dropout_and_drop_path_training_cpu(name, overrides):
    """drop_rate (after the embedding, the attention projection, the MLP and before the head) and drop path in
    training mode: the fused model makes the same draws as the reference model in the same order (every
    dropout is the same nn.Dropout module, the drop-path scales come from drop_path_scale), so logits and
    gradients agree. attn_drop_rate stays 0: the fused op draws its attention mask differently (torch.rand in
    its reference backend on CPU, Philox in the kernels); test_model's attention-dropout test checks each path."""
    overrides = {**overrides, "drop_rate": 0.2, "drop_path_rate": 0.4}
    ref, fused = _pair(name, overrides)
    x = torch.randn(16, 3, 32, 32)   # 16 samples: a branch dropped for all of them (0.4^16) would zero its gradient
    mask = (torch.rand(16, 64) < 0.4) if name.endswith("_mim") else None
    ref.train(), fused.train()

    def run(seed):
        torch.manual_seed(seed)
        return ref(x, mask) if mask is not None else ref(x)
    with torch.no_grad():   # training mode really draws: two seeds give two outputs
        assert not torch.allclose(run(1), run(2))
    _compare(ref, fused, x, mask, tolerance("fused_model", torch.float32), seed=3)


@pytest.mark.parametrize("name, overrides", [("beit_test_patch4_32_mim", {}),
                                             ("beit_test_patch4_32", {"use_mean_pooling": False})])
def test_hooked_final_norm_runs_in_the_fused_model(name, overrides):
    """The fused loop fuses the final LayerNorm into the last block's epilogue only when it has no hooks:
    a forward hook on the model's final norm runs (once, on the (B, 1+P, C) tokens) and its returned value
    is used, as in the reference model."""
    ref, fused = _pair(name, overrides)
    x = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 64) < 0.4) if name.endswith("_mim") else None
    seen = []
    for tag, m in (("ref", ref), ("fused", fused)):
        m.eval()
        m.norm.register_forward_hook(
            lambda mod, args, out, tag=tag: seen.append((tag, tuple(out.shape))) or out * 1.5 + 0.25)
    _compare(ref, fused, x, mask, tolerance("fused_model", torch.float32))
    assert seen == [("ref", (2, 65, 64)), ("fused", (2, 65, 64))], seen
