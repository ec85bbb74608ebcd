"""The DALL-E dVAE encoder: architecture and key names, loading, and the restricted unpickler."""
import os
import pickle
import sys
import types

import pytest
import torch

from beit_fast.train import dall_e_encoder as dee
from beit_fast.train.tokenizer import DalleTokenizer, encode, load_tokenizer


def test_full_size_architecture_keys_and_shapes():
    enc = dee.Encoder()  # BEiT's: group_count 4, n_hid 256, n_blk_per_group 2, vocab 8192
    sd = enc.state_dict()
    expect = {
        "blocks.input.w": (256, 3, 7, 7), "blocks.input.b": (256,),
        "blocks.group_1.block_1.res_path.conv_1.w": (64, 256, 3, 3),
        "blocks.group_1.block_2.res_path.conv_4.w": (256, 64, 1, 1),
        "blocks.group_2.block_1.id_path.w": (512, 256, 1, 1),
        "blocks.group_4.block_2.res_path.conv_3.w": (512, 512, 3, 3),
        "blocks.output.conv.w": (8192, 2048, 1, 1), "blocks.output.conv.b": (8192,),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.group_1.block_1.id_path.w" not in sd       # identity when widths match
    assert not any("pool" in k for k in sd)
    assert len(sd) == 2 + 8 * 8 + 3 * 2 + 2                  # input, 8 blocks x 4 convs, 3 id convs, output
    assert enc.blocks.group_1.block_1.post_gain == 1 / 64
    assert dee.config_from_state_dict(sd) == dict(group_count=4, n_hid=256, n_blk_per_group=2,
                                                  input_channels=3, vocab_size=8192)


def test_loads_state_dict_of_right_shapes_and_gives_codes(tmp_path):
    enc = dee.Encoder()
    sd = {k: torch.randn_like(v) * 0.02 for k, v in enc.state_dict().items()}
    path = tmp_path / "encoder.pt"
    torch.save(sd, path)
    loaded = load_tokenizer("dvae", str(path))
    assert isinstance(loaded, DalleTokenizer) and loaded.vocab_size == 8192 and loaded.downsample == 8
    for k, v in loaded.encoder.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    view = dee.map_pixels(torch.rand(2, 3, 32, 32))          # a 112px view gives 14x14; 32px keeps it cheap
    codes = encode(loaded, view)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192


def test_small_encoder_112px_view_gives_14x14_grid(tmp_path):
    from safetensors.torch import save_file
    enc = dee.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
    save_file(enc.state_dict(), str(tmp_path / "enc.safetensors"))
    tok = load_tokenizer("dvae", str(tmp_path / "enc.safetensors"))
    assert tok(dee.map_pixels(torch.rand(3, 3, 112, 112))).shape == (3, 14, 14)


def test_fp16_runs_every_conv_but_the_last_in_fp16_as_dall_e_does():
    """tokenizer_dtype=fp16: DALL-E's own numerics on CUDA (dall_e.utils.Conv2d with use_float16=True casts
    input and weights to fp16; the output conv has use_float16=False and computes in fp32), as unilm made its
    targets. Checked through the dtypes every conv sees and returns, and against the fp64 encoder."""
    from beit_fast.train.tokenizer import choose_dtype, token_meta
    enc = dee.Encoder(n_hid=16, n_blk_per_group=1, vocab_size=64)
    tok = DalleTokenizer(enc)
    seen = []
    for m in enc.modules():
        if isinstance(m, dee.Conv2d):
            m.register_forward_hook(lambda m, i, o: seen.append((m.use_float16, i[0].dtype, o.dtype)))
    view = dee.map_pixels(torch.rand(2, 3, 32, 32))
    codes = encode(tok, view, torch.float16)
    convs = [m for m in enc.modules() if isinstance(m, dee.Conv2d)]
    assert len(seen) == len(convs) and [s[0] for s in seen].count(False) == 1 and seen[-1][0] is False
    assert all(s[1:] == (torch.float16, torch.float16) for s in seen[:-1])
    assert seen[-1][1:] == (torch.float16, torch.float32)          # fp16 activations, fp32 output conv
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    seen.clear()
    assert torch.equal(encode(tok, view, torch.float32), tok(view).flatten(1))
    assert all(s[1:] == (torch.float32, torch.float32) for s in seen)   # fp32 stays fp32 throughout
    with torch.no_grad():
        logits16 = enc(view.half())
        logits64 = enc.double()(view.double())
    assert logits16.dtype == torch.float32
    err = (logits16.double() - logits64).abs().max() / logits64.abs().max()
    assert 2e-5 < err < 1e-2, err   # fp16 rounding (5e-4 to 1e-3 of the largest logit; fp32 gives ~3e-7)
    assert choose_dtype(tok, None, "fp16")[0] == torch.float16
    assert choose_dtype(tok, None, "auto", resumed=token_meta(torch.float16)["tokenizer_dtype"])[0] == torch.float16


def _published_encoder_forward(sd, x, group_count, n_blk_per_group):
    """OpenAI's dall_e Encoder.forward written out from its published description with F.conv2d on a
    state dict (not through beit_fast's modules): input 7x7 conv; per group, blocks of id_path + res_path / L^2
    (L = group_count * n_blk_per_group; res_path = relu, 3x3, relu, 3x3, relu, 3x3, relu, 1x1; id_path a 1x1
    conv where the width changes), max-pool 2 between groups; relu and a 1x1 conv to the vocabulary."""
    import torch.nn.functional as F

    def conv(prefix, h):
        w = sd[prefix + ".w"]
        return F.conv2d(h, w, sd[prefix + ".b"], padding=(w.shape[-1] - 1) // 2)
    h = conv("blocks.input", x)
    for g in range(1, group_count + 1):
        for i in range(1, n_blk_per_group + 1):
            p = f"blocks.group_{g}.block_{i}"
            ident = conv(p + ".id_path", h) if p + ".id_path.w" in sd else h
            r = h
            for j in range(1, 5):
                r = conv(f"{p}.res_path.conv_{j}", F.relu(r))
            h = ident + r / (group_count * n_blk_per_group) ** 2
        if g < group_count:
            h = F.max_pool2d(h, 2)
    return conv("blocks.output.conv", F.relu(h))


def test_encoder_forward_matches_the_published_architecture():
    """fp64, random weights (biases too), a small encoder with a width change in every group after the first:
    the logits of beit_fast's Encoder equal the published forward's."""
    torch.manual_seed(0)
    enc = dee.Encoder(group_count=3, n_hid=8, n_blk_per_group=2, vocab_size=32).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = {k: v.detach() for k, v in enc.state_dict().items()}
    x = dee.map_pixels(torch.rand(2, 3, 16, 16, dtype=torch.float64))
    torch.testing.assert_close(enc(x), _published_encoder_forward(sd, x, 3, 2), rtol=1e-12, atol=1e-12)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer("dvae", str(tmp_path / "encoder.pkl"))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_tokenizer("dvae", "")


def _fake_dall_e_modules():
    """Stand-ins for OpenAI's dall_e package, so a pickle names dall_e.encoder.Encoder etc."""
    pkg, enc_mod, utils_mod = (types.ModuleType(n) for n in ("dall_e", "dall_e.encoder", "dall_e.utils"))
    fakes = {}
    for mod, cls in ((utils_mod, dee.Conv2d), (enc_mod, dee.EncoderBlock), (enc_mod, dee.Encoder)):
        fake = type(cls.__name__, (cls,), {"__module__": mod.__name__})
        setattr(mod, cls.__name__, fake)
        fakes[cls] = fake
    return {"dall_e": pkg, "dall_e.encoder": enc_mod, "dall_e.utils": utils_mod}, fakes


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zipfile", [True, False])
def test_restricted_unpickler_loads_a_pickled_dall_e_module(tmp_path, zipfile):
    ref = dee.Encoder(n_hid=8, n_blk_per_group=2, vocab_size=16)
    modules, fakes = _fake_dall_e_modules()
    pickled = dee.Encoder(n_hid=8, n_blk_per_group=2, vocab_size=16)
    pickled.load_state_dict(ref.state_dict())
    for m in pickled.modules():                 # turn every dall_e-style module into the "dall_e" class
        if type(m) in fakes:
            m.__class__ = fakes[type(m)]
    path = tmp_path / "encoder.pkl"
    sys.modules.update(modules)
    try:
        torch.save(pickled, path, _use_new_zipfile_serialization=zipfile)
    finally:
        for name in modules:
            del sys.modules[name]
    assert b"dall_e.encoder" in path.read_bytes()      # the pickle names OpenAI's classes, as encoder.pkl does
    tok = load_tokenizer("dvae", str(path))
    assert type(tok.encoder) is dee.Encoder
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(tok.encoder.state_dict()[k], v, rtol=0, atol=0)
    x = dee.map_pixels(torch.rand(2, 3, 32, 32))
    assert torch.equal(tok(x), ref(x).argmax(1))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_restricted_unpickler_refuses_code(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    payload = {"blocks.input.w": _Evil(marker)}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch_zip")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os|nt).system"):
        load_tokenizer("dvae", str(path))
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins_eval():
    import io

    class EvilEval:
        def __reduce__(self):
            return (eval, ("1+1",))
    data = pickle.dumps(EvilEval())
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        dee.RestrictedUnpickler(io.BytesIO(data)).load()


def test_dalle_view_is_mapped_to_the_logit_laplace_range():
    """The dVAE was trained on map_pixels'd images (0.8 x + 0.1, in [0.1, 0.9]; unilm's token view): the
    pretraining transform built with DalleTokenizer's pixel_mapping maps the tokenizer view so, where the
    k-means tokenizer (fit on [0, 1] pixels) gets the plain view. Same crop (seeded), black and white pixels."""
    from PIL import Image
    from beit_fast.train.data import TwoViewTransform
    from beit_fast.train.tokenizer import KMeansTokenizer
    img = Image.fromarray((torch.rand(48, 48, 3) > 0.5).to(torch.uint8).mul(255).numpy())
    views = {}
    for tok in (DalleTokenizer, KMeansTokenizer):
        t = TwoViewTransform(32, 16, hflip=0.0, color_jitter=0.0, second_interpolation="nearest",
                             pixel_mapping=tok.pixel_mapping)
        torch.manual_seed(0)
        views[tok] = t(img)[1]
    unit, dalle = views[KMeansTokenizer], views[DalleTokenizer]
    assert unit.min() == 0 and unit.max() == 1
    torch.testing.assert_close(dalle, dee.map_pixels(unit))
    assert abs(dalle.min().item() - 0.1) < 1e-6 and abs(dalle.max().item() - 0.9) < 1e-6


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_encoder_weights_with_missing_or_extra_tensors_are_refused(tmp_path, change):
    """Loading is strict: a state dict without one of the encoder's tensors (which would keep its random init
    and give wrong targets without a word) or with a tensor the encoder has no place for is an error naming
    the key."""
    enc = dee.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    sd = dict(enc.state_dict())
    key = "blocks.group_2.block_1.res_path.conv_2.b"
    if change == "missing":
        del sd[key]
    else:
        key = "blocks.group_2.block_1.res_path.conv_5.w"
        sd[key] = torch.zeros(1)
    path = tmp_path / "encoder.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        load_tokenizer("dvae", str(path))


@pytest.mark.parametrize("wrap", ["encoder_key", "state_dict_key", "tokenizer_state_dict"])
def test_loads_wrapped_and_prefixed_encoder_state_dicts(tmp_path, wrap):
    """Encoder weights nested under "encoder" / "state_dict" (training scripts' containers), or saved from a
    DalleTokenizer (keys "encoder.blocks..."), load to the same encoder."""
    enc = dee.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    sd = enc.state_dict()
    obj = {"encoder_key": {"encoder": sd, "step": 3}, "state_dict_key": {"state_dict": sd},
           "tokenizer_state_dict": DalleTokenizer(enc).state_dict()}[wrap]
    if wrap == "tokenizer_state_dict":
        assert next(iter(obj)).startswith("encoder.blocks.")
    torch.save(obj, tmp_path / "enc.pt")
    tok = load_tokenizer("dvae", str(tmp_path / "enc.pt"))
    for k, v in sd.items():
        assert torch.equal(tok.encoder.state_dict()[k], v), k


def test_a_view_with_the_wrong_channel_count_is_a_clear_error():
    enc = dee.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) pixels, got \(2, 1, 16, 16\)"):
        DalleTokenizer(enc)(torch.rand(2, 1, 16, 16))
