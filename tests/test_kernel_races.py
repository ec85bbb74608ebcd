"""No program of a Triton launch touches what another program of the same launch stores, and the results do
not depend on the order the programs run in: the interpreter runs them one after another, x-major, where a
GPU runs them concurrently in no fixed order (tests/interpreter_races.py). Each op's forward and backward
runs with its programs reversed and shuffled: every load and store is recorded per program, and outputs and
gradients must be bitwise those of the interpreter's own order. Covers the attention kernels (plain, packed
with the table gradient's partials in dQ's memory, explicit index, dropout, dense bias, the GPU tile configs
with block tails, several batch groups), LayerNorm and linear_gelu (stored and recomputed)."""
import os

import pytest
import torch

import interpreter_races
from test_kernel_bounds import CASES

from beit_fast._backend import INTERPRETER_PROBLEM
from beit_fast.ops.rel_pos_attention import num_relative_distance, rel_pos_attention

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="checks the interpreter's launches (TRITON_INTERPRET=1; a GPU runs the kernels)"
                       + (f"; the interpreter cannot run here: {INTERPRETER_PROBLEM}" if INTERPRETER_PROBLEM else "")),
    pytest.mark.skipif(interpreter_races.PROBLEM is not None, reason=str(interpreter_races.PROBLEM)),
]


def _run(fn, leaves, seed):
    """Outputs and gradients of fn(*leaves) (each leaf a fresh copy), with a seeded incoming gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, g))


def _same_in_any_order(fn, leaves):
    torch.manual_seed(0)   # (dropout's seed: the same masks in every order)
    want = _run(fn, leaves, 1)
    for order in ("reverse", "shuffle"):
        before = interpreter_races.LAUNCHES[0]
        torch.manual_seed(0)
        with interpreter_races.checked(order):
            got = _run(fn, leaves, 1)
        assert interpreter_races.LAUNCHES[0] > before, "no launch was checked"
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{order} order: output {i} differs from the sequential order's"


@pytest.mark.parametrize("name", list(CASES))
def test_programs_neither_race_nor_depend_on_their_order(name, monkeypatch):
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(0)
    fn, leaves = CASES[name]()
    _same_in_any_order(fn, leaves)


@pytest.mark.parametrize("config,D,dtype", [("16bit_d64", 64, torch.float16), ("fp32", 32, torch.float32)])
@pytest.mark.parametrize("dense", ["0", "1"])
def test_gpu_tile_configs_neither_race_nor_depend_on_program_order(config, D, dtype, dense, monkeypatch):
    """The GPU's tiles at N = 65 (block tails), three batch groups of table-gradient partials (in a buffer of
    their own at these sizes: the next test keeps them in dQ's memory), the bias gathered and dense."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "pick_configs", lambda *a: K.CONFIGS[config])
    monkeypatch.setattr(K, "num_batch_groups", lambda B, *a: min(B, 3))
    monkeypatch.setenv("BEIT_FAST_ATTN_DENSE_BIAS", dense)
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(2)
    W, H = (8, 8), 2
    leaves = [(torch.randn(3, H, 65, D) * 0.5).to(dtype) for _ in range(3)]
    leaves.append(torch.randn(num_relative_distance(W), H) * 0.5)
    _same_in_any_order(lambda q, k, v, t: rel_pos_attention(q, k, v, t, window_size=W, backend="triton"), leaves)


def test_the_check_finds_a_read_of_another_programs_store():
    """The check itself: a kernel whose programs read the next program's first element is a race (and its
    result depends on the order); a program's read-modify-write of its own elements is not."""
    import triton
    import triton.language as tl

    @triton.jit
    def shifted(X, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(X + offs + 1, mask=offs + 1 < 4 * BLOCK)
        tl.store(X + offs, v + 1.0)

    @triton.jit
    def private(X, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs) + 1.0)

    x = torch.zeros(64)
    with interpreter_races.checked("reverse"):
        private[(4,)](x, BLOCK=16)
        assert torch.equal(x, torch.ones(64))
        with pytest.raises(AssertionError, match=r"race in kernel shifted: 0 bytes stored by more than one "
                                                 r"program, 12 bytes loaded by a program while another stores"):
            shifted[(4,)](x, BLOCK=16)


@pytest.mark.parametrize("packed,dtype,shape", [(True, torch.float16, (3, 2, 10, 32)),
                                                 (False, torch.float32, (3, 2, 10, 16))], ids=["packed", "contiguous"])
def test_partials_in_dq_memory_neither_race_nor_depend_on_program_order(packed, dtype, shape, monkeypatch):
    """The table gradient's partials kept in dQ's memory (two batch groups), which the dQ kernel then
    overwrites: the layout whose reuse a race between the kernels' programs would break."""
    from beit_fast.kernels import rel_pos_attention as K
    from beit_fast.ops.rel_pos_attention import rel_pos_attention_qkvpacked
    seen = []
    layout = K._partials_layout
    monkeypatch.setattr(K, "_partials_layout", lambda *a: seen.append(layout(*a)) or seen[-1])
    monkeypatch.setattr(K, "num_batch_groups", lambda B, *a: min(B, 2))
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(3)
    B, H, N, D = shape
    W, table = (3, 3), torch.randn(num_relative_distance((3, 3)), H) * 0.5
    if packed:
        fn, leaves = (lambda qkv, t: rel_pos_attention_qkvpacked(qkv, t, window_size=W, backend="triton"),
                      [(torch.randn(B, N, 3, H, D) * 0.5).to(dtype), table])
    else:
        fn, leaves = (lambda q, k, v, t: rel_pos_attention(q, k, v, t, window_size=W, backend="triton"),
                      [(torch.randn(B, H, N, D) * 0.5).to(dtype) for _ in range(3)] + [table])
    _same_in_any_order(fn, leaves)
    assert seen and all(p.in_dq and p.G == 2 for p in seen)
