"""bench/sass_report.py: the SASS loop analysis, and a run that compiles BEiT's attention kernels for sm_90
through Triton's own JIT dispatch under the stand-in driver (no GPU)."""
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module("sass_report")
    finally:
        sys.path.pop(0)


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                         /* 0x0000000000007919 */
        /*0020*/                   LDG.E R2, desc[UR4][R2.64] ;                 /* 0x0000000402027981 */
        /*0030*/                   IMAD R4, R0, 0x4, RZ ;                       /* 0x0000000400047824 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;  /* 0x0000000000187996 */
        /*0050*/               @P0 LDL R5, [R1+0x10] ;                          /* 0x0000100001050983 */
        /*0060*/                   MUFU.EX2 R6, R6 ;                            /* 0x0000000600067308 */
        /*0070*/              @!P1 BRA 0x40 ;                                   /* 0xfffffffc00c49947 */
        /*0080*/                   STG.E desc[UR4][R2.64], R6 ;                 /* 0x0000000602007986 */
        /*0090*/               @P2 BRA 0x20 ;                                   /* 0xfffffff800e02947 */
        /*00a0*/                   EXIT ;                                       /* 0x000000000000794d */
        /*00b0*/                   BRA 0xb0;                                    /* 0xfffffffc00fc7947 */
"""


def test_loops_and_opcodes_from_sass():
    m = _module()
    instrs = m.parse_sass(SASS)
    assert len(instrs) == 12 and instrs[0] == (0, "LDC R1, c[0x0][0x28]")
    assert [m.opcode(i) for _, i in instrs[4:8]] == ["HGMMA", "LDL", "MUFU", "BRA"]
    spans = m.loops(instrs)
    assert spans == [(0x20, 0x90), (0x40, 0x70)]      # the branch to itself after EXIT is no loop
    assert m.innermost(spans) == [(0x40, 0x70)]
    lines = m.loop_lines(instrs, mix=True)
    assert lines[0].startswith("  outer loop (outside its 1 inner) 0x0020-0x0090: 4 instructions")
    assert "stores 1" in lines[0] and "global loads 1" in lines[0]
    assert lines[2].startswith("  innermost loop 0x0040-0x0070: 4 instructions; spill traffic LDL/STL 1/0")
    assert "MMA 1, MUFU 1" in lines[2]


def test_report_compiles_beit_attention_for_sm90():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "bench/sass_report.py", "--dense", "fwd,dq"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "sm_90, Triton" in out and "N=197 H=12 D=64" in out
    assert "dense_bias=True" in out.split("fwd ", 1)[1].splitlines()[0]       # --dense reached the configs
    assert "dense_bias=False" in out.split("dkdv ", 1)[1].splitlines()[0]
    assert out.split("fwd ", 1)[1].splitlines()[0].endswith("; bias: dense expansion (query-major)")
    assert out.split("dkdv ", 1)[1].splitlines()[0].endswith("; bias: gather through the window's parts")
    assert out.split("dq ", 1)[1].splitlines()[0].endswith("; bias: dense expansion (query-major)")
    for kernel in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        line = next(x for x in out.splitlines() if x.startswith(kernel + ":"))
        regs = int(line.split(": ", 1)[1].split(" registers")[0])
        assert 0 < regs <= 255, line
    assert out.count("innermost loop") >= 3


def test_report_shows_the_bias_source_compiled():
    """Past DENSE_MAX_BYTES (here 256 heads: 40 MiB of expansion) the launchers gather whatever the tile configs
    say: the configs are printed with the dense_bias compiled, and why (they read dense_bias=True)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "bench/sass_report.py", "--heads", "256", "--no-table-grad"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                                              "BEIT_FAST_ATTN_DENSE_BIAS")})
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in ("fwd", "dkdv", "dq"):
        line = r.stdout.split(f"\n{name} ", 1)[1].splitlines()[0]
        assert "dense_bias=False); bias: gather through the window's parts (its tile config asks for the dense " \
               "expansion: not honoured, one would exceed DENSE_MAX_BYTES = 32 MiB)" in line, line


def test_tile_flags():
    """--tile's flags: 1 / 0 / true / false in any case; anything else is refused, not read as false."""
    m = _module()
    from beit_fast.kernels.rel_pos_attention import TileConfig
    base = TileConfig(64, 64, tail=True, block_tail=False)
    assert m._tile("32,64,tail=FALSE,block_tail=True,dense_bias=1", base) == TileConfig(
        32, 64, tail=False, block_tail=True, dense_bias=True)
    assert m._tile("tail=0", base).tail is False and m._tile("block_tail=true", base).block_tail is True
    for bad in ("tail=yes", "block_tail=", "dense_bias=2"):
        with pytest.raises(SystemExit, match=r"takes 1, 0, true or false"):
            m._tile(bad, base)


def test_describe_refuses_an_unreadable_cubin(tmp_path):
    """A cubin cuobjdump cannot read (here not one at all; a target it does not know reads the same) is an
    Unsupported error, not "? registers ... 0 SASS instructions"."""
    import types
    m = _module()
    try:
        m.nvidia_tool("cuobjdump")
    except m.Unsupported as e:
        pytest.skip(str(e))
    kernel = types.SimpleNamespace(asm={"cubin": b"\x7fELF not really a cubin", "ptx": "// ptx"},
                                   metadata=types.SimpleNamespace(shared=0, num_warps=4))
    with pytest.raises(m.Unsupported, match="cuobjdump -sass cannot read .*_fwd_kernel.cubin"):
        m.describe("_fwd_kernel", kernel, str(tmp_path), False)


def test_dkdv_partials_are_vector_accesses(tmp_path):
    """dK/dV reads and writes its dBias partial rows whole (pitch N rounded up to 16): in its main inner loop
    (the wgmma one) every global store is a 16-byte vector, none a 4-byte scalar (with the mask `query < N`
    they were all scalar: 16 STG.E per step)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "bench/sass_report.py", "--keep", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = _module()
    instrs = m.parse_sass((tmp_path / "_dkdv_kernel.sass").read_text())
    bodies = [[i for a, i in instrs if lo <= a <= hi] for lo, hi in m.innermost(m.loops(instrs))]
    main = [b for b in bodies if any(m.opcode(i) == "HGMMA" for i in b)]
    assert len(main) == 1, [len(b) for b in bodies]
    stores = [i.split()[1] if i.startswith("@") else i.split()[0] for i in main[0] if "STG" in i]
    assert stores and all(op == "STG.E.128" for op in stores), stores


@pytest.mark.parametrize("op, kernels", [("layer_norm", ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")),
                                         ("linear_gelu_dz", ("_dgelu_kernel",))])
def test_report_other_ops(op, kernels):
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "bench/sass_report.py", "--op", op], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{op} C=768" in r.stdout
    for kernel in kernels:
        assert any(line.startswith(kernel + ":") and " registers" in line for line in r.stdout.splitlines()), kernel
    assert "innermost loop" in r.stdout    # the backward's row loop / the dGELU pass's row-block loop


def test_report_reads_the_extensions_cuda_kernels():
    """--object: the sm_90 SASS of the extension's CUDA kernels (built whenever CUDA is, as in CI)."""
    pytest.importorskip("triton")
    from beit_fast import _backend
    mod, err = _backend.extension()
    if mod is None or not _backend.extension_has_cuda():
        pytest.skip(err or "beit_fast._C was built without its CUDA sources")
    r = subprocess.run([sys.executable, "bench/sass_report.py", "--object", mod.__file__, "--match",
                        "forward_warp_kernel"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode == 2 and "not available here" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines and all("forward_warp_kernel" in x and " SASS instructions; " in x for x in lines), r.stdout[:2000]
    assert any("LDG.E.128" in x for x in lines)   # the rows' vector loads
