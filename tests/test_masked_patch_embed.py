"""beit_fast.ops.masked_patch_embed against its PyTorch reference (conv -> mask blend -> cls -> pos): outputs and
every gradient, on the C++ CPU kernels (fp32, bf16, fp64 gradcheck) and, with a GPU, the CUDA kernels."""

import pytest
import torch

from beit_fast._backend import BackendUnavailable, extension
from beit_fast.ops.masked_patch_embed import masked_patch_embed, masked_patch_embed_ref, not_supported_reasons
from tolerances import assert_two_x, tolerance, ulp

pytestmark = pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built")
ops = torch.ops.beit_fast
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (B, Cin, H, W, (ph, pw), C)
GEOMETRIES = {
    "beit_b_224": (2, 3, 224, 224, (16, 16), 768),
    "beit_l_224_b1": (1, 3, 224, 224, (16, 16), 1024),
    "gray_32px_4px_C7": (2, 1, 32, 32, (4, 4), 7),
    "rect_24x40_patch_4x8": (3, 2, 24, 40, (4, 8), 12),
    "one_patch": (2, 3, 8, 8, (8, 8), 5),
}
NAMES = ["out", "dimages", "dweight", "dbias", "dmask_token", "dcls_token", "dpos_embed"]


def make_inputs(geometry, dtype, masked, with_pos, device="cpu", images_grad=True, requires_grad=True):
    B, Cin, H, W, (ph, pw), C = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    P = (H // ph) * (W // pw)

    def leaf(t, rg=requires_grad):
        return t.to(device=device, dtype=dtype).requires_grad_(rg)

    images = leaf(torch.randn(B, Cin, H, W), images_grad and requires_grad)
    weight = leaf(torch.randn(C, Cin, ph, pw) / (Cin * ph * pw) ** 0.5)
    bias = leaf(0.1 * torch.randn(C))
    mask = None
    if masked:
        mask = torch.rand(B, P) < 0.4
        mask[0, 0] = True
        mask[-1, -1] = False
        mask = mask.to(device)
    mask_token = leaf(0.02 * torch.randn(1, 1, C))
    cls_token = leaf(0.02 * torch.randn(1, 1, C))
    pos = leaf(0.02 * torch.randn(1, 1 + P, C)) if with_pos else None
    return images, weight, bias, mask, mask_token, cls_token, pos


def differentiable(inputs):
    images, weight, bias, mask, mask_token, cls_token, pos = inputs
    return [images, weight, bias, mask_token, cls_token, pos]


def forward_backward(fn, inputs, grad):
    for t in differentiable(inputs):
        if t is not None:
            t.grad = None
    out = fn(*inputs)
    out.backward(grad.to(out.dtype))
    return [out] + [None if t is None or not t.requires_grad else t.grad for t in differentiable(inputs)]


def as64(inputs):
    return [t if t is None or t.dtype == torch.bool else t.detach().double().requires_grad_(t.requires_grad)
            for t in inputs]


def check_every_tensor(ours, ref_lp, ref64, dtype):
    """Each output and gradient the reference has is present and obeys the 2x rule, with the slack scaled by
    the tensor's magnitude: atol * (1 + max|fp64 value|), and at least one ulp of the dtype at that magnitude:
    the op rounds twice (the GEMM writes the output in its dtype, the epilogue adds bias / tokens and rounds
    again), PyTorch's conv once, so in bf16 ours may be one ulp off where PyTorch is exact (a value just above
    2: ulp 2^-6 = 0.0156 > 4e-3 * 3, seen once in CI). Where the reference has none, ours is absent or 0."""
    for name, o, r, r64 in zip(NAMES, ours, ref_lp, ref64):
        if r64 is None:
            assert o is None or torch.count_nonzero(o) == 0, f"{name}: the reference has no gradient here"
            continue
        assert o is not None, f"{name}: missing"
        assert o.shape == r64.shape, f"{name}: shape {tuple(o.shape)} vs {tuple(r64.shape)}"
        top = r64.abs().max().item()
        atol = max(tolerance("masked_patch_embed", dtype).atol * (1.0 + top), ulp(top, dtype))
        assert_two_x(name, o, r, r64, atol)


def compare_to_reference(geometry, dtype, masked, with_pos, backend, device="cpu"):
    inputs = make_inputs(geometry, dtype, masked, with_pos, device)
    ref_inputs = as64(inputs)
    fused = lambda *a: masked_patch_embed(*a, backend=backend)  # noqa: E731
    out_shape = masked_patch_embed_ref(*inputs).shape
    grad = torch.randn(out_shape, device=device)
    ours = forward_backward(fused, inputs, grad)
    ref_lp = forward_backward(masked_patch_embed_ref, inputs, grad)
    ref64 = forward_backward(masked_patch_embed_ref, ref_inputs, grad.double())
    assert ours[0].dtype == dtype and ours[0].shape == out_shape
    check_every_tensor(ours, ref_lp, ref64, dtype)
    # the token rows (cls, and mask_token at masked patches; tokens ~0.02) on their own scale: the slack of the
    # whole output (conv rows ~4) would pass them even with the tokens left out in bf16
    rows = torch.zeros(out_shape[:2], dtype=torch.bool, device=device)
    rows[:, 0] = True
    if masked:
        rows[:, 1:] = inputs[3]
    top = ref64[0][rows].abs().max().item()
    atol = tolerance("masked_patch_embed", dtype).atol * top + ulp(top, dtype)
    assert_two_x("token rows", ours[0][rows], ref_lp[0][rows], ref64[0][rows], atol)


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_cpp_matches_reference(geometry, dtype, masked, with_pos):
    compare_to_reference(geometry, dtype, masked, with_pos, "cpp")


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_cpp_gradcheck(masked, with_pos):
    inputs = make_inputs((2, 1, 8, 8, (4, 4), 3), torch.float64, masked, with_pos)
    images, weight, bias, mask, mask_token, cls_token, pos = inputs
    leaves = [t for t in (images, weight, bias, mask_token, cls_token, pos) if t is not None]

    def fn(*ts):
        it = iter(ts)
        i, w, b, mt, c = (next(it) for _ in range(5))
        p = next(it) if pos is not None else None
        return masked_patch_embed(i, w, b, mask, mt, c, p, backend="cpp")

    assert torch.autograd.gradcheck(fn, leaves)


def test_masked_patches_do_not_reach_weight_or_bias():
    """Changing the pixels of masked patches changes neither the output nor any gradient except dimages."""
    inputs = make_inputs("gray_32px_4px_C7", torch.float32, True, True)
    images, weight, bias, mask, mask_token, cls_token, pos = inputs
    grad = torch.randn(2, 1 + 64, 7)
    fused = lambda *a: masked_patch_embed(*a, backend="cpp")  # noqa: E731
    first = forward_backward(fused, inputs, grad)
    pixel_mask = mask.view(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    noisy = (images.detach() + 100 * pixel_mask * torch.randn_like(images)).requires_grad_()
    second = forward_backward(fused, [noisy] + list(inputs[1:]), grad)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} depends on masked pixels"
    assert torch.count_nonzero(first[1] * pixel_mask) == 0, "masked pixels got a gradient"


def test_unmasked_leaves_mask_token_without_gradient():
    inputs = make_inputs("gray_32px_4px_C7", torch.float32, False, False)
    masked_patch_embed(*inputs, backend="cpp").sum().backward()
    assert inputs[4].grad is None


def test_without_bias_and_mask_token():
    """A bias-free conv and a model without mask token (fine-tuning): both may be None."""
    images, weight, _, _, _, cls_token, pos = make_inputs((2, 3, 16, 16, (4, 4), 8), torch.float64, False, True)
    assert torch.autograd.gradcheck(
        lambda i, w, c, p: masked_patch_embed(i, w, None, None, None, c, p, backend="cpp"),
        (images, weight, cls_token, pos))
    torch.library.opcheck(ops.masked_patch_embed, (images, weight, None, None, None, cls_token, pos))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool_masked_pos was given without mask_token"):
        masked_patch_embed(images, weight, None, mask, None, cls_token, pos, backend="cpp")


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("images_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_images"])
def test_opcheck(masked, with_pos, images_dtype):
    """bf16_images: images and weight in bf16 with fp32 tokens (what autocast passes): fp32 output."""
    inputs = list(make_inputs((2, 3, 16, 16, (4, 4), 8), torch.float32, masked, with_pos))
    inputs[:2] = [t.detach().to(images_dtype).requires_grad_() for t in inputs[:2]]
    assert ops.masked_patch_embed(*inputs).dtype == torch.float32
    torch.library.opcheck(ops.masked_patch_embed, tuple(inputs))


def test_opcheck_mask_token_without_mask_does_not_set_the_dtype():
    """Without bool_masked_pos the mask token is unused: it takes no part in the output dtype's promotion (as in
    the reference, which never touches it). An fp64 mask token with fp32 images and tokens, passed to the op
    directly: fp32 output, and the fake function agrees (opcheck); with a mask it promotes the output to fp64."""
    images, weight, bias, mask, mask_token, cls_token, pos = make_inputs((2, 3, 8, 8, (4, 4), 6), torch.float32,
                                                                          True, True)
    token64 = mask_token.detach().double().requires_grad_()
    assert ops.masked_patch_embed(images, weight, bias, None, token64, cls_token, pos).dtype == torch.float32
    torch.library.opcheck(ops.masked_patch_embed, (images, weight, bias, None, token64, cls_token, pos))
    assert ops.masked_patch_embed(images, weight, bias, mask, token64, cls_token, pos).dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_autocast_takes_images_and_weight_of_different_dtypes(backend):
    """Under autocast conv2d accepts bf16 images with an fp32 weight (it casts both): so does the op (bf16 CPU
    autocast), casting both as conv2d does: the same result, bit for bit, as the op given the bf16-rounded
    weight outside autocast; the reference backend gives the reference's result under autocast. Outside
    autocast the same dtype mix is refused."""
    inputs = list(make_inputs((2, 3, 8, 8, (4, 4), 6), torch.float32, True, True))
    inputs[0] = inputs[0].detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_patch_embed(*inputs, backend=backend)
        if backend == "reference":
            expected = masked_patch_embed_ref(*inputs)
    if backend != "reference":
        rounded = list(inputs)
        rounded[1] = inputs[1].detach().bfloat16()
        expected = masked_patch_embed(*rounded, backend=backend)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"weight must have the dtype of images \(torch.bfloat16\)"):
        masked_patch_embed(*inputs, backend=backend)

def test_opcheck_backward():
    images, weight, bias, mask, mask_token, cls_token, pos = make_inputs(
        (2, 3, 16, 16, (4, 4), 8), torch.float32, True, True, requires_grad=False)
    grad = torch.randn(2, 17, 8)
    args = (grad, images, weight, bias, mask, mask_token, cls_token, pos)
    torch.library.opcheck(ops.masked_patch_embed_backward, args + ([True] * 6,))
    torch.library.opcheck(ops.masked_patch_embed_backward, args + ([False, True, True, False, True, False],))


@pytest.mark.parametrize("public", [False, True], ids=["op_fullgraph", "public_function"])
def test_torch_compile(public):
    inputs = make_inputs((2, 3, 16, 16, (4, 4), 8), torch.float32, True, True)

    def f(*a):
        out = masked_patch_embed(*a, backend="cpp") if public else ops.masked_patch_embed(*a)
        return out.pow(2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=not public)
    leaves = [t for t in differentiable(inputs) if t is not None]
    g_c = torch.autograd.grad(compiled(*inputs), leaves)
    g_e = torch.autograd.grad(f(*inputs), leaves)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parameter_gradients_deterministic(dtype):
    inputs = make_inputs("beit_b_224", dtype, True, True)
    grad = torch.randn(2, 197, 768)
    fused = lambda *a: masked_patch_embed(*a, backend="cpp")  # noqa: E731
    first = forward_backward(fused, inputs, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = forward_backward(fused, inputs, grad)
    finally:
        torch.set_num_threads(threads)
    third = forward_backward(fused, inputs, grad)
    # dweight is a GEMM (MKL/oneDNN on the CPU); the reductions we own must be bitwise stable.
    for name, a, b, c in zip(NAMES, first, second, third):
        if name in ("dbias", "dmask_token", "dcls_token", "dpos_embed"):
            assert torch.equal(a, b) and torch.equal(a, c), f"{name} differs between runs"
    assert torch.equal(first[2], third[2]), "dweight differs between two runs with the same threads"


def _bad(**change):
    images, weight, bias, mask, mask_token, cls_token, pos = make_inputs(
        "gray_32px_4px_C7", torch.float32, True, True, requires_grad=False)
    args = dict(images=images, weight=weight, bias=bias, bool_masked_pos=mask, mask_token=mask_token,
                cls_token=cls_token, pos_embed=pos)
    for k, f in change.items():
        args[k] = f(args[k])
    return args


@pytest.mark.parametrize("change, match", [
    (dict(images=lambda t: t[..., :30]), r"image size 32x30 must be a positive multiple of the patch size 4x4"),
    (dict(images=lambda t: t[0]), r"images must have shape \(B, Cin, H, W\)"),
    (dict(weight=lambda t: t.repeat(1, 2, 1, 1)), r"weight must have shape \(C, Cin, ph, pw\) with Cin = "),
    (dict(bias=lambda t: t[:3]), r"bias must have shape \(C,\)"),
    (dict(bool_masked_pos=lambda t: t[:, :10]), r"bool_masked_pos must have shape \(B, P\) = \(2, 64\)"),
    (dict(bool_masked_pos=lambda t: t.to(torch.uint8)), r"bool_masked_pos must be bool"),
    (dict(mask_token=lambda t: t[0]), r"mask_token must have shape \(1, 1, C\)"),
    (dict(pos_embed=lambda t: t[:, 1:]), r"pos_embed must have shape \(1, 1 \+ P, C\) = \(1, 65, 7\)"),
    (dict(mask_token=lambda t: None), r"bool_masked_pos was given without mask_token"),
    (dict(bool_masked_pos=lambda t: t[:1]), r"bool_masked_pos must have shape \(B, P\) = \(2, 64\), got \(1, 64\)"),
    (dict(cls_token=lambda t: t.to("meta")), r"cls_token is on meta but images is on cpu"),
    (dict(images=lambda t: t.long()), r"images must be floating point"),
])
@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
def test_bad_inputs_raise_clear_errors(change, match, backend):
    """Checked in Python before a backend is chosen: the reference (the fallback without the extension)
    refuses what the C++ op refuses instead of broadcasting a (1, P) mask or a (C,) token."""
    with pytest.raises(ValueError, match=match):
        masked_patch_embed(**_bad(**change), backend=backend)


def test_bad_dtype_and_device_raise_clear_errors():
    args = _bad(weight=lambda t: t.double())
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match=r"weight must have the dtype of images \(torch.float32\), got "
                                             r"torch.float64"):
            masked_patch_embed(**args, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have the dtype of images"):
        ops.masked_patch_embed(*args.values())
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        masked_patch_embed(**_bad(), backend="cuda")


@pytest.mark.parametrize("extra", [0, 1], ids=["at_limit", "over_limit"])
def test_cuda_refuses_more_elements_than_int32_indexing_takes(extra):
    """Shapes only (meta tensors): a patch matrix of exactly CUDA_MAX_ELEMENTS is taken, one more is refused
    with the reason, before any kernel could index past int32."""
    from beit_fast.ops.masked_patch_embed import CUDA_MAX_ELEMENTS
    # 1x1 patches of 1 channel on a (1, 1, 1, W) image: images and patch matrix hold W elements, the output
    # (1 + W) * C with C = 1; W chosen so the largest (the output) is the limit plus `extra`
    W = CUDA_MAX_ELEMENTS - 1 + extra
    meta = dict(device="meta")
    images, weight = torch.empty(1, 1, 1, W, **meta), torch.empty(1, 1, 1, 1, **meta)
    why = " ".join(not_supported_reasons("cuda", images, weight, torch.empty(1, **meta), None, None,
                                         torch.empty(1, 1, 1, **meta)))
    assert (f"at most 2^31 - 1 - 256 = {CUDA_MAX_ELEMENTS}" in why) == bool(extra), why


def test_auto_backend_on_cpu_is_cpp():
    args = _bad()
    assert not_supported_reasons("cpp", *args.values()) == []
    args["weight"].requires_grad_()
    out = masked_patch_embed(**args)
    assert type(out.grad_fn).__name__ == "MaskedPatchEmbedBackward"   # the extension's op ran, not the reference
    torch.testing.assert_close(out, masked_patch_embed_ref(*args.values()))


# ------------------------------------------------------------------------------------------------- GPU only
@needs_cuda
@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES) + [(32, 3, 224, 224, (16, 16), 768)])
def test_cuda_matches_reference(geometry, dtype, masked, with_pos):
    # fp32: the reference conv would otherwise run in TF32 (cuDNN's default), ours in full fp32 (cuBLAS default)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compare_to_reference(geometry, dtype, masked, with_pos, "cuda", device="cuda")


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("device, backend", [pytest.param("cuda", "cuda", marks=needs_cuda), ("cpu", "cpp")])
def test_autocast(device, backend, with_pos):
    """Under bf16 autocast the op casts images, weight and bias as conv2d would, returns the fp32 tokens' dtype
    as the reference's promotion does (the cls and mask-token rows exactly the reference's, not rounded to
    bf16), and gives fp32 gradients. Output and every gradient by the 2x rule against fp64 on the inputs
    autocast rounds, with PyTorch's reference under the same autocast as the baseline."""
    inputs = make_inputs("beit_b_224", torch.float32, True, with_pos, device=device)
    grad = torch.randn(masked_patch_embed_ref(*inputs).shape, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = forward_backward(lambda *a: masked_patch_embed(*a, backend=backend), inputs, grad)
        ref = forward_backward(masked_patch_embed_ref, inputs, grad)
    assert ours[0].dtype == ref[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in ours[1:] if g is not None)
    token_rows = torch.cat((torch.ones_like(inputs[3][:, :1]), inputs[3]), dim=1)   # cls, then the masked patches
    assert torch.equal(ours[0][token_rows], ref[0][token_rows])
    rounded = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs[:3]]   # what autocast's conv sees
    exact = forward_backward(masked_patch_embed_ref, as64(rounded + list(inputs[3:])), grad.double())
    check_every_tensor(ours, ref, exact, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_parameter_gradients_deterministic(dtype):
    inputs = make_inputs((16, 3, 224, 224, (16, 16), 768), dtype, True, True, device="cuda")
    grad = torch.randn(16, 197, 768, device="cuda")
    fused = lambda *a: masked_patch_embed(*a, backend="cuda")  # noqa: E731
    first = forward_backward(fused, inputs, grad)
    second = forward_backward(fused, inputs, grad)
    for name, a, b in zip(NAMES, first, second):
        if name in ("dbias", "dmask_token", "dcls_token", "dpos_embed"):
            assert torch.equal(a, b), f"{name} differs between runs"


@needs_cuda
def test_cuda_opcheck():
    inputs = make_inputs((2, 3, 32, 32, (16, 16), 64), torch.bfloat16, True, True, device="cuda")
    torch.library.opcheck(ops.masked_patch_embed, tuple(inputs))


def test_pos_embed_takes_part_in_the_output_dtype():
    """The output dtype is images' promoted with the tokens' and pos_embed's, as the reference's `+ pos_embed`
    promotes: an fp64 pos_embed with fp32 everything else gives fp64 tokens (the fake function says so too:
    opcheck), equal to the reference's in fp64, not fp32 tokens with pos_embed rounded to fp32."""
    images, weight, bias, mask, mask_token, cls_token, pos = make_inputs((2, 3, 8, 8, (4, 4), 6), torch.float32,
                                                                          True, True, requires_grad=False)
    pos64 = pos.double() + 1e-12   # a part fp32 cannot hold
    args = (images, weight, bias, mask, mask_token, cls_token, pos64)
    out = ops.masked_patch_embed(*args)
    expected = masked_patch_embed_ref(*args)
    assert out.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 0], (cls_token.double().view(6) + pos64[0, 0]).expand(2, 6), rtol=0, atol=0)
    torch.library.opcheck(ops.masked_patch_embed, args)


@pytest.mark.parametrize("change, match", [
    (dict(bool_masked_pos=lambda t: t[:1]), r"bool_masked_pos must have shape \(B, P\) = \(2, 64\)"),
    (dict(bool_masked_pos=lambda t: t[:, :10]), r"bool_masked_pos must have shape \(B, P\) = \(2, 64\)"),
    (dict(bool_masked_pos=lambda t: t.to(torch.uint8)), r"bool_masked_pos must be bool"),
    (dict(bias=lambda t: t[:3]), r"bias must have shape \(C,\)"),
    (dict(mask_token=lambda t: t[0]), r"mask_token must have shape \(1, 1, C\)"),
    (dict(cls_token=lambda t: t[0]), r"cls_token must have shape \(1, 1, C\)"),
    (dict(pos_embed=lambda t: t[:, 1:]), r"pos_embed must have shape \(1, 1 \+ P, C\)"),
    (dict(weight=lambda t: t.repeat(1, 2, 1, 1)), r"weight must have shape \(C, Cin, ph, pw\)"),
    (dict(mask_token=lambda t: None), r"bool_masked_pos was given without mask_token"),
])
def test_the_op_itself_refuses_bad_inputs(change, match):
    """torch.ops.beit_fast.masked_patch_embed called directly (no Python front end) refuses what the front end
    refuses, before its kernels index the tensors: a (1, P) mask for B = 2 would be read past its end."""
    with pytest.raises(ValueError, match=match):
        ops.masked_patch_embed(*_bad(**change).values())
