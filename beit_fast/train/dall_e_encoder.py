"""The DALL-E dVAE encoder as BEiT v1 uses it (reference §3.1), and a safe loader for its weights.

Architecture (OpenAI's dall_e/encoder.py, vendored by unilm under beit/dall_e/): every convolution is a
custom `Conv2d` with parameters `w` (n_out, n_in, kw, kw) and `b` (n_out,) and padding (kw - 1) // 2.

    input   Conv 7x7, C -> n_hid
    group_k n_blk_per_group EncoderBlocks (k = 1..group_count; widths n_hid * 1, 1, 2, 4, 8 ...), then
            MaxPool2d(2) after every group but the last
    output  ReLU, Conv 1x1 (8 * n_hid) -> vocab_size
    EncoderBlock(n_in, n_out): id_path(x) + post_gain * res_path(x), post_gain = 1 / (4 * n_blk)^2 (= 1/64),
            id_path = Conv1x1 when n_in != n_out else Identity,
            res_path = ReLU, Conv3x3 (n_in -> n_out/4), ReLU, Conv3x3, ReLU, Conv3x3, ReLU, Conv1x1 (-> n_out)

State-dict keys: `blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, `blocks.output.conv.b`, ...

The published `encoder.pkl` is a pickled nn.Module, so `torch.load` would run whatever the pickle names.
`load_dall_e_encoder` reads it with `RestrictedUnpickler`: only the dall_e classes (mapped onto the ones
below), torch.nn containers/activations/pooling, OrderedDict, torch.device/dtype/Size and torch's tensor
rebuild functions resolve; any other global (os.system, builtins.eval, ...) raises UnpicklingError.
State dicts (.pt/.pth/.bin with weights_only=True) and .safetensors files load directly.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: parameters `w`, `b`; 'same' padding for odd kernels."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        w = torch.empty(n_out, n_in, kw, kw).normal_(std=1 / (n_in * kw ** 2) ** 0.5)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp16 input: DALL-E's numerics on CUDA (dall_e.utils.Conv2d), every conv in fp16 but the output one
        # (use_float16=False), which returns to fp32; fp32 input (and bf16 under autocast) as it comes
        if x.dtype == torch.float16:
            if self.use_float16:
                return F.conv2d(x, self.w.half(), self.b.half(), padding=(self.kw - 1) // 2)
            x = x.float()
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """(B, C, H, W) pixels mapped to [0.1, 0.9] -> (B, vocab_size, H/2^(g-1), W/2^(g-1)) logits."""

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [1] + [2 ** i for i in range(group_count)]          # 1, 1, 2, 4, 8 for 4 groups
        stages = [("input", Conv2d(input_channels, n_hid, 7))]
        for g in range(1, group_count + 1):
            n_in, n_out = widths[g - 1] * n_hid, widths[g] * n_hid
            layers = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            if g < group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            stages.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
        stages.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(widths[group_count] * n_hid, vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(stages))

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected (B, {self.input_channels}, H, W) pixels, got {tuple(x.shape)}")
        return self.blocks(x)


def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """dall_e.utils.map_pixels: [0, 1] -> [eps, 1 - eps] (logit-Laplace input range; 0.8x + 0.1)."""
    return (1 - 2 * eps) * x + eps


def config_from_state_dict(sd: dict) -> dict:
    """Encoder hyper-parameters implied by the shapes of a state dict."""
    try:
        w_in = sd["blocks.input.w"]
        w_out = sd["blocks.output.conv.w"]
    except KeyError as e:
        raise ValueError(f"not a DALL-E encoder state dict: missing {e.args[0]!r} "
                         f"(first keys: {list(sd)[:4]})") from None
    groups = sorted({k.split(".")[1] for k in sd if k.startswith("blocks.group_")})
    blocks = {k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")}
    return dict(group_count=len(groups), n_hid=w_in.shape[0], n_blk_per_group=len(blocks),
                input_channels=w_in.shape[1], vocab_size=w_out.shape[0])


# ------------------------------------------------------------------------------ restricted unpickling
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "object"): object, ("__builtin__", "object"): object,
    ("copyreg", "_reconstructor"): __import__("copyreg")._reconstructor,
    ("torch", "device"): torch.device, ("torch", "Size"): torch.Size,
    ("torch", "float32"): torch.float32, ("torch", "float16"): torch.float16,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("torch.nn.modules.container", "Sequential"): nn.Sequential,
    ("torch.nn.modules.container", "ModuleList"): nn.ModuleList,
    ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
    ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
    ("torch.nn.modules.linear", "Identity"): nn.Identity,
    ("dall_e.encoder", "Encoder"): Encoder,
    ("dall_e.encoder", "EncoderBlock"): EncoderBlock,
    ("dall_e.utils", "Conv2d"): Conv2d,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled DALL-E encoder needs; refuses everything else."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only the DALL-E encoder classes, torch.nn containers "
                f"and tensor data are allowed in a tokenizer pickle") from None


# torch.load(pickle_module=...) wants a module-like object with Unpickler and load.
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="beit_fast_restricted_pickle")


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A pickled nn.Module (OpenAI's encoder.pkl): unpickle through the allow-list only.
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("encoder", "state_dict", "model", "weights"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                inner = obj[key]
                return inner.state_dict() if isinstance(inner, nn.Module) else inner
        return obj
    raise ValueError(f"{path}: expected a DALL-E encoder (pickled module or state dict), got {type(obj).__name__}")


def load_dall_e_encoder(path: str) -> Encoder:
    """Build the encoder from a local file (encoder.pkl, a state dict, or .safetensors); never downloads."""
    if not path:
        raise FileNotFoundError("the DALL-E tokenizer needs its encoder weights: pass tokenizer_path=<encoder.pkl> "
                                "(download https://cdn.openai.com/dall-e/encoder.pkl yourself), or use "
                                "tokenizer=kmeans, which needs no external weights")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DALL-E encoder weights {path!r} not found (nothing is downloaded at run time; "
                                f"fetch https://cdn.openai.com/dall-e/encoder.pkl yourself)")
    sd = {k.removeprefix("encoder."): v for k, v in _read_state_dict(path).items()}
    enc = Encoder(**config_from_state_dict(sd))
    enc.load_state_dict(sd, strict=True)
    return enc.eval().requires_grad_(False)
