"""The Triton kernels write only inside the tensors they were given: every tensor allocated while an op runs
(torch.empty / torch.zeros: outputs, partial sums, log-sum-exps, dropout masks) gets guard bytes on both
sides, and after the forward and backward every guard byte must still hold its fill.

Without this, a store that misses its mask writes past a buffer: under the interpreter that corrupts the
heap, which the process notices only sometimes (a later crash, or nothing), and on a GPU it overwrites
another tensor silently. A mutation audit found eight such stores (an unmasked log-sum-exp or delta store,
a partial-sum row past its pitch, LayerNorm's last program past M, ...) caught only by chance crashes."""
import math
import os

if "TRITON_INTERPRET" not in os.environ:   # conftest decides; this keeps the file runnable on its own
    import shutil
    if shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast.ops.layer_norm import layer_norm  # noqa: E402
from beit_fast.ops.linear_gelu import linear_gelu  # noqa: E402
from beit_fast.ops.rel_pos_attention import (num_relative_distance, rel_pos_attention,  # noqa: E402
                                             rel_pos_attention_qkvpacked, relative_position_index)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="runs the Triton kernels: needs a GPU or TRITON_INTERPRET=1")

SLACK = 4096   # guard bytes on each side (a multiple of every element size and of 16: alignment is kept)
FILL = 0xA5


class GuardedAllocations:
    """Within the block, torch.empty / torch.zeros(size..., dtype=, device=) return a view into the middle of
    a larger byte buffer filled with FILL; check() asserts that no byte outside any view changed."""

    def __init__(self):
        self.buffers = []

    def _guarded(self, real, zero):
        def alloc(*size, dtype=None, device=None, **kw):
            if kw or (len(size) == 1 and not isinstance(size[0], (int, tuple, list, torch.Size))):
                return real(*size, dtype=dtype, device=device, **kw)
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            dtype = dtype or torch.get_default_dtype()
            nbytes = math.prod(shape) * self.real_empty((), dtype=dtype).element_size()
            raw = self.real_empty(SLACK + nbytes + SLACK, dtype=torch.uint8, device=device).fill_(FILL)
            data = raw[SLACK:SLACK + nbytes].view(dtype).view(shape)
            if zero:
                data.zero_()
            self.buffers.append((raw, nbytes, shape, dtype))
            return data
        return alloc

    def __enter__(self):
        self.real_empty, self.real_zeros = torch.empty, torch.zeros
        torch.empty, torch.zeros = self._guarded(self.real_empty, False), self._guarded(self.real_zeros, True)
        return self

    def __exit__(self, *exc):
        torch.empty, torch.zeros = self.real_empty, self.real_zeros

    def check(self):
        assert self.buffers, "no allocation was guarded"
        for raw, nbytes, shape, dtype in self.buffers:
            for side, guard in (("before", raw[:SLACK]), ("after", raw[SLACK + nbytes:])):
                bad = (guard != FILL).nonzero().flatten()
                assert bad.numel() == 0, (f"a kernel wrote {bad.numel()} bytes {side} its {dtype} {shape} buffer "
                                          f"(first at byte {bad[0].item()} of the guard)")


def _fwd_bwd(fn, leaves):
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.grad(out, leaves, torch.randn_like(out))


def _randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).requires_grad_()


def _attention(N, D, packed=False, explicit=False, dropout=0.0):
    W = (3, 3) if N == 10 else (4, 5)   # N = 21: tails in every tile
    assert N == W[0] * W[1] + 1
    R, H = num_relative_distance(W), 2
    table = _randn(R, H, scale=0.5)
    kw = dict(dropout_p=dropout, backend="triton")
    kw.update(rel_index=relative_position_index(W).to(DEVICE)) if explicit else kw.update(window_size=W)
    if packed:
        return lambda qkv, t: rel_pos_attention_qkvpacked(qkv, t, **kw), [_randn(2, N, 3, H, D), table]
    return (lambda q, k, v, t: rel_pos_attention(q, k, v, t, **kw),
            [_randn(2, H, N, D), _randn(2, H, N, D), _randn(2, H, N, D), table])


CASES = {
    "attention_N21_d24": lambda: _attention(21, 24),
    "attention_N21_d16_packed": lambda: _attention(21, 16, packed=True),
    "attention_N10_d16_explicit_index": lambda: _attention(10, 16, explicit=True),
    "attention_N21_d16_dropout": lambda: _attention(21, 16, dropout=0.3),
    "layer_norm_M13_C40": lambda: (lambda x, w, b: layer_norm(x, w, b, backend="triton"),
                                   [_randn(13, 40), _randn(40), _randn(40)]),
    "layer_norm_M150_C40": lambda: (lambda x, w, b: layer_norm(x, w, b, backend="triton"),   # 4 programs
                                    [_randn(150, 40), _randn(40), _randn(40)]),
    "linear_gelu_M37_K24_N40": lambda: (lambda x, w, b: linear_gelu(x, w, b, backend="triton"),
                                        [_randn(37, 24), _randn(40, 24, scale=0.2), _randn(40)]),
    "linear_gelu_M150_K24_N40_recompute": lambda: (
        lambda x, w, b: linear_gelu(x, w, b, backend="triton", recompute=True),
        [_randn(150, 24), _randn(40, 24, scale=0.2), _randn(40)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_write_only_inside_their_buffers(name, monkeypatch):
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(0)
    fn, leaves = CASES[name]()
    with GuardedAllocations() as guard:
        _fwd_bwd(fn, leaves)
    guard.check()


@pytest.mark.parametrize("dense", ["0", "1"])
def test_attention_bias_paths_write_only_inside_their_buffers(dense, monkeypatch):
    """The gathered-bias and the dense-bias (the table expanded to (H, N, N) first) forms of the kernels."""
    monkeypatch.setenv("BEIT_FAST_ATTN_DENSE_BIAS", dense)
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(1)
    fn, leaves = _attention(21, 16)
    with GuardedAllocations() as guard:
        _fwd_bwd(fn, leaves)
    guard.check()


@pytest.mark.parametrize("config,D,dtype", [("16bit_d64", 64, torch.float16), ("16bit_d128", 80, torch.float16),
                                            ("fp32", 128, torch.float32)])
@pytest.mark.parametrize("dense", ["0", "1"])
def test_gpu_tile_configs_write_only_inside_their_buffers(config, D, dtype, dense, monkeypatch):
    """The GPU's tile shapes (their table-gradient partial rows, key-major dense expansion, block tails) at
    N = 65 (a 1-row tail), with the bias gathered and dense."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "pick_configs", lambda *a: K.CONFIGS[config])
    monkeypatch.setenv("BEIT_FAST_ATTN_DENSE_BIAS", dense)
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    torch.manual_seed(2)
    W, H = (8, 8), 2
    leaves = [(torch.randn(2, H, 65, D, device=DEVICE) * 0.5).to(dtype).requires_grad_() for _ in range(3)]
    leaves.append(_randn(num_relative_distance(W), H, scale=0.5))
    with GuardedAllocations() as guard:
        _fwd_bwd(lambda q, k, v, t: rel_pos_attention(q, k, v, t, window_size=W, backend="triton"), leaves)
    guard.check()


def test_the_guard_sees_a_write_past_a_buffer():
    """The check itself: a write one element past a guarded tensor (through a wider view of its storage) is
    reported; the tensor's own bytes are not."""
    with GuardedAllocations() as guard:
        t = torch.empty(5, 3)
        torch.zeros(4, dtype=torch.int64)
    t.fill_(1.0)
    guard.check()
    torch.as_strided(t, (16,), (1,))[15] = 2.0
    with pytest.raises(AssertionError, match="wrote 4 bytes after its torch.float32"):
        guard.check()
