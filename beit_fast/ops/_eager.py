"""The eager fast path of the fused ops: the same kernels and autograd formulas without the dispatcher.

Every fused op is registered through torch.library (a custom op, or an extension op with a Python autograd
formula), so that torch.compile keeps it in one graph. In eager mode that registration costs per call: the
dispatcher, torch.library's Python autograd wrapper and its redispatch. `python bench/eager_overhead.py`
times both paths with the kernel launches stubbed out; on the 2-core CI machine (2026-11-30) a LayerNorm
forward took 34 us through this path against 58 us through the registration, forward+backward 147 against
219 us: time in which a GPU running short kernels idles.

`AutogradOp(name, forward, setup_context, backward)` is a torch.autograd.Function built from the very
functions given to `register_autograd`: `forward(*args)` is the op's implementation (the custom op's body,
or the extension op called below autograd), `setup_context(ctx, inputs, output)` and
`backward(ctx, *grads)` are shared with the registration. `call(op, fn, *args)` runs the registered op
`op(*args)` when anything other than plain eager execution is going on (see `eager`), else `fn.apply(*args)`.
"""
from __future__ import annotations

from typing import Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _forward_ad_level() -> int:
    from torch.autograd import forward_ad
    return getattr(forward_ad, "_current_level", -1)


def eager(*args) -> bool:
    """Whether the fast path may run: plain eager execution only. Everything that must see the op itself
    takes the registered op: torch.compile's tracing; tensor subclasses (FakeTensor, AOTAutograd's
    FunctionalTensor); torch.func transforms (vmap, grad, functionalize: their tensors are plain torch.Tensor
    wrappers); torch.jit.trace; an active TorchDispatchMode (make_fx, FlopCounterMode, op logging, selective
    checkpointing policies); a forward-mode AD dual level."""
    if torch.compiler.is_compiling():
        return False
    if (torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() > 0 or _forward_ad_level() >= 0):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def call_raw(raw: Callable, op: Callable, *args):
    """For a backward: the implementation `raw(*args)` itself when no graph is being built over the backward
    (grad mode off, as in a plain .backward()) and `eager(*args)`, else the registered `op(*args)` (under
    AOTAutograd's tracing, or with create_graph=True, where the op's own missing autograd then says so
    instead of a silently non-differentiable result)."""
    if torch.is_grad_enabled() or not eager(*args):
        return op(*args)
    return raw(*args)


def refuse_double_backward(op: str, *tensors) -> None:
    """For a backward formula that calls an extension op without an autograd kernel of its own: with
    create_graph=True (grad mode on in the backward, its tensors requiring grad) PyTorch would run it with
    only a warning and return no higher-order gradients; raise instead, as the Triton ops' registered
    backwards do. Not under tracing (subclass tensors: AOTAutograd builds the backward graph itself)."""
    if torch.is_grad_enabled() and eager(*tensors) and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"beit_fast::{op}: double backward (create_graph=True through this op's backward) is "
                           f"not supported")


def _below_autograd(op_name: str) -> Callable:
    """`torch.ops.beit_fast.<op_name>(*args)` with autograd's dispatch keys skipped: the extension's CPU/CUDA
    kernel without the Python autograd wrapper that torch.library put in front of it (the caller records the
    autograd graph). The op is looked up at call time: the extension may not have loaded."""
    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops.beit_fast, op_name)(*args)
    return run


def AutogradOp(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """A torch.autograd.Function class with the given implementation and autograd formula, in the classic
    form (forward(ctx, *args) runs setup_context itself): a separate setup_context staticmethod makes
    Function.apply bind the arguments through inspect.signature on every call (about 10 us)."""
    def fwd(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(backward),
        "__doc__": f"Eager fast path of {name} (beit_fast.ops._eager).",
    })


def ExtensionOp(name: str, op_name: str, setup_context: Callable, backward: Callable):
    """AutogradOp for the C++ extension's `beit_fast::<op_name>`, with the setup_context and backward given
    to its registration (beit_fast._backend.register_extension_op)."""
    return AutogradOp(name, _below_autograd(op_name), setup_context, backward)


def call(op: Callable, fn, *args):
    """op(*args) through torch.library, or the same through the eager autograd.Function `fn`."""
    if eager(*args):
        return fn.apply(*args)
    return op(*args)
