"""What the Triton kernels compile to on sm_90 (or another target), without a GPU: registers, spills, shared
memory and the SASS of every loop (instruction count and mix), for the tile configs the launchers pick
(the attention kernels; with --op, LayerNorm's or linear_gelu's dGELU pass; with --object, the CUDA kernels
of a compiled object such as the extension).

The launchers run for real (kernels.rel_pos_attention.rel_pos_attention_fwd / _bwd on CPU tensors with
BEiT's layout), through Triton's own JIT dispatch: argument specialization (16-byte alignment, strides of 1,
divisibility by 16) is Triton's, as on a GPU. A stand-in driver (`install_fake_driver`) compiles for the
chosen target with Triton's bundled ptxas and loads and launches nothing; the cubin is disassembled with
Triton's bundled cuobjdump. Timings need a GPU: this is for comparing kernel variants offline (a loop body
with fewer instructions, or without spills, is not proof of a faster kernel, only a lead).

    python bench/sass_report.py                           # BEiT-B bf16 training path, the default configs
    python bench/sass_report.py --dense fwd,dq            # those kernels read the dense bias expansion
    python bench/sass_report.py --tile dkdv=64,64,4,2 --tile fwd=128,64,8,2,tail=0 --mix
    python bench/sass_report.py --keep DIR                # also writes each kernel's .ptx, .cubin and .sass
    python bench/sass_report.py --op layer_norm --mix      # LayerNorm forward and backward, C=768
    python bench/sass_report.py --object beit_fast/_C*.so --match forward_warp_kernel   # the CUDA kernels

--tile KERNEL=block_m,block_n[,num_warps[,num_stages]][,tail=0|1][,block_tail=0|1] overrides one kernel's
TileConfig. Loops are found from backward branches; "innermost" loops contain no other loop. In BEiT's
forward the inner loop is one key block of the online softmax, in dK/dV one query block, in dQ one key
block (their peeled tail steps are straight-line code outside the loops).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fake_driver import Unsupported, install_fake_driver, nvidia_tool  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ SASS

_INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) of every instruction in cuobjdump -sass output."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, text.splitlines()) if m]


def opcode(instr: str) -> str:
    """'@!P0 LDGSTS.E.BYPASS.LTC128B [R1], ...' -> 'LDGSTS'"""
    words = instr.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: a branch back to an earlier address closes one."""
    found = set()
    for addr, ins in instrs:
        m = _BRA.search(ins) if opcode(ins) == "BRA" else None
        if m and int(m.group(1), 16) < addr:   # (a branch to itself is the idle loop after EXIT)
            found.add((int(m.group(1), 16), addr))
    return sorted(found)


def innermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [a for a in spans if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in spans)]


# ------------------------------------------------------------------------------------------------ kernels

def _tile(spec: str, base):
    """'32,64,4,2,tail=0' -> base with those fields replaced."""
    fields = ("block_m", "block_n", "num_warps", "num_stages")
    kw, pos = {}, 0
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in ("tail", "block_tail", "dense_bias"):
                raise SystemExit(f"--tile: unknown field {key!r} (positional block_m,block_n,num_warps,num_stages; "
                                 "then tail=, block_tail=, dense_bias=)")
            flag = value.strip().lower()
            if flag not in ("1", "0", "true", "false"):
                raise SystemExit(f"--tile: {key}= takes 1, 0, true or false, got {value.strip()!r} in {spec!r}")
            kw[key] = flag in ("1", "true")
        else:
            if pos >= len(fields):
                raise SystemExit(f"--tile: too many numbers in {spec!r}")
            kw[fields[pos]] = int(part)
            pos += 1
    return dataclasses.replace(base, **kw)


def compile_attention(args):
    """Run BEiT's attention forward and backward launchers once under the fake driver; -> (the tile configs,
    {kernel name: CompiledKernel} of the kernels they launched, {config name ("fwd"): bias_source(...) of the
    kernel as compiled}: a config's dense_bias is not honoured past DENSE_MAX_BYTES)."""
    launches = install_fake_driver(args.arch)
    from beit_fast.kernels import rel_pos_attention as K
    from beit_fast.relpos import num_relative_distance
    dtype = DTYPES[args.dtype]
    side = math.isqrt(args.tokens - 1)
    if side * side + 1 != args.tokens:
        raise SystemExit(f"--tokens must be a square number of patches + 1 (BEiT's layout), got {args.tokens}")
    window = (side, side)
    cuda = torch.device("cuda")   # the GPU configs, not the interpreter's
    cfgs = K.pick_configs(args.head_dim, dtype, cuda)
    for spec in args.tile:
        name, _, rest = spec.partition("=")
        if name not in K.KERNELS:
            raise SystemExit(f"--tile: kernel must be one of {K.KERNELS}, got {name!r}")
        cfgs = dataclasses.replace(cfgs, **{name: _tile(rest, getattr(cfgs, name))})
    if args.dense is not None:   # (as the variable would: past DENSE_MAX_BYTES too)
        K.DENSE_BIAS = K._dense_bias_setting(args.dense)
        cfgs = K.with_dense_bias(cfgs, K.DENSE_BIAS)
    K.pick_configs = lambda *a: cfgs
    K.num_batch_groups = lambda *a: 1
    B, H, N, D = 2, args.heads, args.tokens, args.head_dim
    qkv = torch.zeros(B, N, 3, H, D, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dqkv = torch.zeros_like(qkv)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.zeros(B, N, H, D, dtype=dtype).transpose(1, 2)
    do = torch.zeros(B, N, H, D, dtype=dtype).transpose(1, 2)
    R = num_relative_distance(window)
    table, lse = torch.zeros(R, H), torch.zeros(B, H, N)
    inverse = (torch.zeros(N * N, dtype=torch.int32), torch.zeros(R, dtype=torch.int32),
               torch.zeros(R, dtype=torch.int32), 1)
    compiled, constexprs = {}, {}
    _recording(K, ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"), compiled, constexprs)
    K.rel_pos_attention_fwd(q, k, v, table, None, window, D ** -0.5, 0.0, None, out)
    K.rel_pos_attention_bwd(do, q, k, v, out, lse, table, None, window, D ** -0.5, 0.0, None, dq, dk, dv,
                            inverse if args.table_grad else None)
    if not launches:
        raise Unsupported("the stand-in driver saw no launch")
    sources = {name: bias_source(K, constexprs[f"_{name}_kernel"].get("BIAS_SRC"), getattr(cfgs, name))
               for name in K.KERNELS if f"_{name}_kernel" in constexprs}
    return cfgs, compiled, sources


def bias_source(K, src, cfg) -> tuple[bool, str]:
    """(whether it reads a dense expansion, what it reads in words) for a kernel launched with BIAS_SRC=`src`
    and tile config `cfg`; the words say why when that is not what the config asks for (the launcher gathers
    past K.DENSE_MAX_BYTES: _BiasArgs.dense_ok)."""
    names = {K.SRC_WINDOW_ID: "gather through the window's parts", K.SRC_INDEX_ID: "gather through the index",
             K.SRC_DENSE_ID: "dense expansion (query-major)", K.SRC_DENSE_T_ID: "dense expansion (key-major)"}
    what = names.get(src, f"BIAS_SRC={src!r}")
    dense = src in (K.SRC_DENSE_ID, K.SRC_DENSE_T_ID)
    if cfg.dense_bias and not dense:
        what += (f" (its tile config asks for the dense expansion: not honoured, one would exceed "
                 f"DENSE_MAX_BYTES = {K.DENSE_MAX_BYTES >> 20} MiB)")
    return dense, what


def _recording(module, names, compiled, constexprs=None):
    """Wrap the `run` of the module's kernels `names` so that the compiled kernels they launch land in
    `compiled` (name -> CompiledKernel) and, given `constexprs`, the keyword arguments of their launch
    (the constexprs: name -> {argument: value}) in it."""
    for name in names:
        kern = getattr(module, name)
        run = kern.run

        def recording(*a, _run=run, _name=name, **kw):
            c = _run(*a, **kw)
            compiled[_name] = c
            if constexprs is not None:
                constexprs[_name] = kw
            return c
        kern.run = recording


def compile_layer_norm(args):
    """LayerNorm forward and backward at BEiT-B's rows (B=128 x 197) and --channels, the tiles _tile picks."""
    install_fake_driver(args.arch)
    from beit_fast.kernels import layer_norm as LN
    LN._num_programs = lambda device: LN.PROGRAMS_PER_SM * 132   # an H100's SMs
    dtype = DTYPES[args.dtype]
    compiled = {}
    _recording(LN, ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"), compiled)
    M, C = 128 * 197, args.channels
    x, w = torch.zeros(M, C, dtype=dtype), torch.ones(C, dtype=dtype)
    y, mean, rstd = LN.layer_norm_fwd(x, w, w, 1e-6)
    LN.layer_norm_bwd(y, x, w, mean, rstd)
    return f"BLOCK_M, BLOCK_C, num_warps = {LN._tile(C)}", compiled


def compile_linear_gelu_dz(args):
    """linear_gelu's dGELU pass (store mode: the pre-activation saved) at BEiT-B's MLP (rows B=128 x 197,
    4 * --channels columns). The autotuned GEMM is not compiled here: without a GPU its tuner would keep its
    first config, not the one a GPU's timings pick."""
    install_fake_driver(args.arch)
    from beit_fast.kernels import linear_gelu as LG
    LG._sm_count = lambda device: 132
    dtype = DTYPES[args.dtype]
    compiled = {}
    _recording(LG, ("_dgelu_kernel",), compiled)
    M, K = 128 * 197, args.channels
    N = 4 * K
    dy = torch.zeros(M, N, dtype=dtype)
    LG.linear_gelu_dz(dy, torch.zeros(M, K, dtype=dtype), torch.zeros(N, K, dtype=dtype),
                      torch.zeros(N, dtype=dtype), torch.zeros(M, N, dtype=dtype), True)
    return (f"BLOCK_M, BLOCK_N, num_warps = {LG._DGELU_BLOCK_M, LG._DGELU_BLOCK_N, LG._DGELU_WARPS}",
            compiled)


def describe_object(path: str, match: str, arch: int) -> list[str]:
    """The sm_`arch` functions of a compiled object (the extension's .so, an nvcc .o or a .cubin) whose
    mangled name contains `match`: instruction count and global memory instructions by full opcode (LDG.E:
    a scalar load, LDG.E.128: 16 bytes), counted in the code (each branch once), not per executed row."""
    sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", "-arch", f"sm_{arch}", path], capture_output=True,
                          text=True)
    if sass.returncode != 0:
        raise Unsupported(f"cuobjdump cannot read {path}: {sass.stderr.strip()[:200]}")
    lines = []
    for chunk in re.split(r"\n\s+Function : ", sass.stdout)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if match not in name:
            continue
        instrs = parse_sass(chunk)
        mem = collections.Counter(ins.split()[1 if ins.startswith("@") else 0] for _, ins in instrs
                                  if opcode(ins) in ("LDG", "STG", "LDS", "STS", "LDL", "STL"))
        counts = ", ".join(f"{k} {v}" for k, v in sorted(mem.items()))
        lines.append(f"{name}: {len(instrs)} SASS instructions; {counts}")
    return lines or [f"no sm_{arch} function of {path} matches {match!r}"]


def describe(name: str, kernel, keep_dir: str, mix: bool) -> list[str]:
    base = os.path.join(keep_dir, name)
    with open(base + ".cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    with open(base + ".ptx", "w") as f:
        f.write(kernel.asm["ptx"])
    sass = _cuobjdump("-sass", base + ".cubin")
    with open(base + ".sass", "w") as f:
        f.write(sass)
    usage = _cuobjdump("-res-usage", base + ".cubin")
    regs = re.search(r"\bREG:(\d+)", usage)
    stack = re.search(r"\bSTACK:(\d+)", usage)   # the spill frame (the kernels make no calls)
    instrs = parse_sass(sass)
    head = (f"{name}: {regs.group(1) if regs else '?'} registers, {stack.group(1) if stack else '?'} B of stack "
            f"(spills), {kernel.metadata.shared} B shared, {kernel.metadata.num_warps} warps; "
            f"{len(instrs)} SASS instructions")
    return [head] + loop_lines(instrs, mix)


def _cuobjdump(what: str, path: str) -> str:
    """cuobjdump `what` of `path`: its output, or Unsupported when it cannot read the file (a cubin of a target
    this cuobjdump does not know reads as no registers and no instructions otherwise)."""
    r = subprocess.run([nvidia_tool("cuobjdump"), what, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise Unsupported(f"cuobjdump {what} cannot read {path} (exit status {r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout


def loop_lines(instrs, mix: bool = False) -> list[str]:
    """One line per loop: its instructions (an outer loop's own, outside its inner loops) and their mix."""
    spans = loops(instrs)
    inner = innermost(spans)
    lines = []
    for span in spans:
        nested = [b for b in inner if b != span and span[0] <= b[0] and b[1] <= span[1]]
        body = [(a, ins) for a, ins in instrs if span[0] <= a <= span[1]
                and not any(b[0] <= a <= b[1] for b in nested)]
        c = collections.Counter(opcode(ins) for _, ins in body)
        what = "innermost loop" if span in inner else f"outer loop (outside its {len(nested)} inner)"
        lines.append(f"  {what} {span[0]:#06x}-{span[1]:#06x}: {len(body)} instructions; spill traffic LDL/STL "
                     f"{c['LDL']}/{c['STL']}, global loads {c['LDG'] + c['LDGSTS']}, stores {c['STG']}, "
                     f"MMA {c['HGMMA'] + c['HMMA']}, MUFU {c['MUFU']}")
        if mix:
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in c.most_common(24)))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="attention", choices=("attention", "layer_norm", "linear_gelu_dz"))
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--tokens", type=int, default=197, help="N = Wh*Ww + 1 (default 197: 224px, 16px patches)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--channels", type=int, default=768, help="layer_norm / linear_gelu_dz: C (default 768)")
    p.add_argument("--dense", default=None, help="as BEIT_FAST_ATTN_DENSE_BIAS: 0, 1 or e.g. fwd,dq")
    p.add_argument("--tile", action="append", default=[], help="KERNEL=block_m,block_n[,warps[,stages]][,tail=0|1]")
    p.add_argument("--no-table-grad", dest="table_grad", action="store_false",
                   help="the backward without the table gradient (a frozen table)")
    p.add_argument("--mix", action="store_true", help="print each innermost loop's opcode mix")
    p.add_argument("--keep", default=None, help="directory for the .ptx / .cubin / .sass files")
    p.add_argument("--object", default=None, help="report a compiled object's functions instead (see --match)")
    p.add_argument("--match", default="", help="--object: functions whose mangled name contains this")
    args = p.parse_args(argv)
    if args.object is not None:
        try:
            print("\n".join(describe_object(args.object, args.match, args.arch)))
        except Unsupported as e:
            print(f"sass_report: not available here: {e}")
            return 2
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    keep = args.keep or tempfile.mkdtemp(prefix="beit_fast_sass_")
    os.makedirs(keep, exist_ok=True)
    try:
        import triton
        if args.op == "attention":
            cfgs, compiled, sources = compile_attention(args)
            print(f"sm_{args.arch}, Triton {triton.__version__}, {args.dtype}, N={args.tokens} H={args.heads} "
                  f"D={args.head_dim}, table gradient {'on' if args.table_grad else 'off'}")
            for name in ("fwd", "dkdv", "dq"):   # dense_bias as compiled, and the bias source
                dense, what = sources.get(name, (False, "not launched"))
                print(f"{name:5s} {dataclasses.replace(getattr(cfgs, name), dense_bias=dense)}; bias: {what}")
        else:
            tiles, compiled = (compile_layer_norm if args.op == "layer_norm" else compile_linear_gelu_dz)(args)
            print(f"sm_{args.arch}, Triton {triton.__version__}, {args.dtype}, {args.op} C={args.channels}: {tiles}")
        for name, kernel in compiled.items():
            print("\n".join(describe(name, kernel, keep, args.mix)))
    except Unsupported as e:
        print(f"sass_report: not available here: {e}")
        return 2
    finally:
        if args.keep is None:
            shutil.rmtree(keep, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
