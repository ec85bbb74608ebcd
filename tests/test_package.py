"""Package-level guarantees: import never fails without _C or Triton, info reports every op, the CUDA
sources are compiled whenever a toolkit and a CUDA torch are present."""
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit_fast
from beit_fast import _backend
from beit_fast.ops import OPS


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BEIT_FAST_BACKEND"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_and_forward_without_extension_or_triton():
    code = """
import sys
sys.modules['beit_fast._C'] = None      # as if the extension had not been built
sys.modules['triton'] = None            # as if Triton were missing
import torch, beit_fast
from beit_fast import masking, _backend
assert _backend.extension()[0] is None and 'not importable' in _backend.extension()[1]
m = beit_fast.create_model('beit_test_patch4_32_mim', fused=True, attn_impl='fused')
x = torch.randn(2, 3, 32, 32)
mask = masking.block_masks(2, (8, 8), 20, min_num_patches=4)
out = m(x, mask)
out.sum().backward()
assert out.shape == (int(mask.sum()), 512)
from beit_fast.info import main; main()
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not importable" in r.stdout
    assert "triton is not importable" in r.stdout


def test_info_lists_every_op_and_backend():
    r = _run("from beit_fast.info import main; main()")
    assert r.returncode == 0, r.stderr[-3000:]
    for op, (_, backends) in OPS.items():
        for b in backends:
            assert any(line.split()[:2] == [op, b] for line in r.stdout.splitlines()), (op, b)
    assert f"torch {torch.__version__}" in r.stdout
    assert "reference  available" in r.stdout


def _marked(stdout: str, device: str = "cpu") -> dict:
    """op -> (backend, mark) of info's lines marked with what a call runs, in one device's table."""
    table = stdout.split(f"backends for {device} tensors")[1].split("\n\n")[0].split("\n", 1)[1]
    return {line.split()[0]: (line.split()[1], line.split("<- ")[1]) for line in table.splitlines() if "<- " in line}


@pytest.mark.skipif(_backend.extension()[0] is None, reason="beit_fast._C is not built")
def test_info_marks_the_backend_each_op_runs(monkeypatch):
    """info marks, per op, the backend a call takes: auto's first runnable backend (never the interpreter),
    the reference when the extension is missing, and a BEIT_FAST_BACKEND override, saying when it cannot run
    (nothing when its value is refused: every call raises). block_mask makes its masks on the CPU whatever
    the model's device, and says itself whether the extension has its kernel."""
    import beit_fast.masking
    from beit_fast.info import backend_table, picked
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    assert picked("cuda", backend_table("cuda"))["block_mask"] == ("cpp", "<- auto")
    monkeypatch.setattr(beit_fast.masking, "has_kernel", lambda *a: False)   # an extension from before the op
    assert picked("cpu", backend_table("cpu"))["block_mask"] == ("reference", "<- auto")
    monkeypatch.undo()
    monkeypatch.setenv("BEIT_FAST_BACKEND", "cpu")
    assert picked("cpu", backend_table("cpu")) == {}
    r = _run("from beit_fast.info import main; main()")
    marked = _marked(r.stdout)
    assert set(marked) == set(OPS), marked
    assert marked["masked_patch_embed"] == marked["layer_scale_residual_norm"] == ("cpp", "auto")
    assert marked["rel_pos_attention"] == ("reference", "auto")
    r = _run("import sys; sys.modules['beit_fast._C'] = None\nfrom beit_fast.info import main; main()")
    assert _marked(r.stdout)["masked_patch_embed"] == ("reference", "auto"), r.stdout
    r = subprocess.run([sys.executable, "-m", "beit_fast.info"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BEIT_FAST_BACKEND": "cuda"})
    marked = _marked(r.stdout)
    assert marked["masked_patch_embed"] == ("cuda", "BEIT_FAST_BACKEND: calls raise"), marked
    assert marked["rel_pos_attention"] == ("reference", "auto"), marked   # no cuda backend: auto


def test_info_names_the_settings_in_effect():
    """info's settings line: the BEIT_FAST_* variables (kernel plan knobs included), sorted, or the defaults."""
    from beit_fast.info import settings_line
    assert settings_line({"PATH": "/bin"}) == "settings: no BEIT_FAST_* variable set (defaults)"
    assert settings_line({"BEIT_FAST_LSRN_FORWARD": "block", "BEIT_FAST_ATTN_DENSE_BIAS": "1", "HOME": "/"}) == (
        "settings: BEIT_FAST_ATTN_DENSE_BIAS=1 BEIT_FAST_LSRN_FORWARD=block")
    r = subprocess.run([sys.executable, "-m", "beit_fast.info"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BEIT_FAST_LSRN_FORWARD": "block"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(line.startswith("settings: ") and "BEIT_FAST_LSRN_FORWARD=block" in line
               for line in r.stdout.splitlines()), r.stdout


def test_info_flags_settings_that_are_refused_or_unknown():
    """A BEIT_FAST_* value its reader refuses, or a name nothing reads (a typo), is named by info instead of
    showing up only as a plain `settings:` entry."""
    from beit_fast.info import settings_problems
    assert settings_problems({"BEIT_FAST_BACKEND": "triton", "BEIT_FAST_ATTN_DENSE_BIAS": "fwd,dq",
                              "BEIT_FAST_TRITON_LAUNCH": "jit", "BEIT_FAST_LSRN_FORWARD": "block",
                              "BEIT_FAST_GIT_SHA": "abc", "PATH": "/bin"}) == []
    bad = settings_problems({"BEIT_FAST_BACKEND": "tritn", "BEIT_FAST_ATTN_DENSE_BIAS": "yes",
                             "BEIT_FAST_TRITON_LAUNCH": "fast", "BEIT_FAST_LSRN_FORWARD": "wrap",
                             "BEIT_FAST_BAKEND": "triton"})
    assert len(bad) == 5, bad
    for name, value in (("BEIT_FAST_ATTN_DENSE_BIAS", "'yes'"), ("BEIT_FAST_BACKEND", "'tritn'"),
                        ("BEIT_FAST_LSRN_FORWARD", "'wrap'"), ("BEIT_FAST_TRITON_LAUNCH", "'fast'")):
        assert any(p.startswith(name + " must be") and value in p for p in bad), (name, bad)
    assert any(p.startswith("BEIT_FAST_BAKEND is not a variable") for p in bad), bad
    # every variable the README documents is one info knows
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"`(BEIT_FAST_[A-Z0-9_]+)", readme))
    assert documented and settings_problems(dict.fromkeys(documented, "")) == []
    r = subprocess.run([sys.executable, "-m", "beit_fast.info"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BEIT_FAST_BACKEND": "tritn"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "settings problem: BEIT_FAST_BACKEND must be one of" in r.stdout, r.stdout


def test_info_says_how_triton_kernels_are_launched():
    """info's launch line: the interpreter, the compiled-kernel cache of kernels/_launch.py, or (with
    BEIT_FAST_TRITON_LAUNCH=jit) Triton's own dispatch for every launch."""
    pytest.importorskip("triton")
    lines = {}
    for env in ({"TRITON_INTERPRET": "1"}, {"TRITON_INTERPRET": "0"},
                {"TRITON_INTERPRET": "0", "BEIT_FAST_TRITON_LAUNCH": "jit"}):
        r = subprocess.run([sys.executable, "-m", "beit_fast.info"], capture_output=True, text=True, timeout=300,
                           env={**{k: v for k, v in os.environ.items() if k != "BEIT_FAST_TRITON_LAUNCH"}, **env})
        assert r.returncode == 0, r.stderr[-3000:]
        lines[len(lines)] = next(x for x in r.stdout.splitlines() if x.startswith("triton launches: "))
    assert lines[0] == "triton launches: by the interpreter (TRITON_INTERPRET=1)"
    assert lines[1].startswith("triton launches: repeated ones from the compiled-kernel cache (this Triton's")
    assert lines[2] == "triton launches: every one through JITFunction.run (BEIT_FAST_TRITON_LAUNCH=jit)"


def test_forced_backend_lists_reasons():
    from beit_fast.ops import BackendUnavailable   # public: what the README's BEIT_FAST_BACKEND row names
    assert BackendUnavailable is _backend.BackendUnavailable and issubclass(BackendUnavailable, RuntimeError)
    with pytest.raises(_backend.BackendUnavailable, match="cuda backend needs CUDA tensors"):
        _backend.choose("x", "cuda", lambda b, auto: _backend.common_reasons(b, ["cpu"], auto=auto),
                        ("cuda", "reference"))
    with pytest.raises(_backend.BackendUnavailable, match="not one of this op's backends"):
        _backend.choose("x", "triton", lambda b, auto: [], ("cuda", "reference"))


def test_a_backend_forced_by_the_environment_says_so(monkeypatch):
    """The caller asked for "auto": the error names BEIT_FAST_BACKEND as what forced the backend."""
    monkeypatch.setenv("BEIT_FAST_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailable, match=r"'cuda' \(chosen by BEIT_FAST_BACKEND=cuda.*needs CUDA"):
        _backend.choose("x", "auto", lambda b, auto: _backend.common_reasons(b, ["cpu"], auto=auto),
                        ("cuda", "reference"))


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_backend_variable_means_auto(monkeypatch, value):
    """BEIT_FAST_BACKEND set but empty (as `BEIT_FAST_BACKEND= python ...` or a blank CI variable sets it) is
    "auto", not an unknown backend: every op runs, and the choice is auto's."""
    monkeypatch.setenv("BEIT_FAST_BACKEND", value)
    assert _backend.choose("x", "auto", lambda b, auto: [] if b == "reference" else ["no"],
                           ("cuda", "cpp", "reference")) == "reference"
    assert _backend.choose("x", "auto", lambda b, auto: [], ("cuda", "cpp", "reference")) == "cuda"
    from beit_fast.ops.layer_norm import layer_norm, layer_norm_ref
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    assert torch.equal(layer_norm(x, w, b), layer_norm_ref(x, w, b))   # auto on CPU tensors: the reference


def test_offset_span_is_one_past_the_largest_element_offset():
    """offset_span(t) = 1 + the largest offset (sum of index x stride) of any element of t: what a kernel's
    int32 offset arithmetic must hold (the ops compare it with 2**31). Checked against every element's offset,
    enumerated, for dense, sliced, transposed, expanded and size-1 layouts; and at the int32 boundary on meta
    tensors (no memory)."""
    base = torch.zeros(4, 6, 5)
    cases = [base, base[:, :3], base[1:, ::2, 1:4], base.transpose(0, 2), base[:, 2:3], base[:1],
             torch.zeros(1, 7).expand(4, 7), torch.zeros(3)[:1], base.permute(1, 2, 0)[::3]]
    for t in cases:
        offsets = torch.zeros((), dtype=torch.long)
        for n, st in zip(t.shape, t.stride()):   # every element's offset, broadcast
            offsets = offsets.unsqueeze(-1) + torch.arange(n) * st
        assert _backend.offset_span(t) == int(offsets.max()) + 1, (t.shape, t.stride())
    assert _backend.offset_span(torch.empty(0, 5)) == 0
    # 2**31 elements apart at the last one: rows of 2**20 elements, 2**11 of them, the last row one short
    assert _backend.offset_span(torch.empty(2**11, 2**20, device="meta")[:, :-1]) == 2**31 - 1
    assert _backend.offset_span(torch.empty(2**11, 2**20, device="meta")) == 2**31
    assert _backend.offset_span(torch.empty(2**11 + 1, 2**20, device="meta")[:, :1]) == 2**31 + 1

def _matching_toolkit_present() -> bool:
    """A toolkit of torch's own CUDA major version (what setup.py needs to build the CUDA sources)."""
    homes = [os.environ.get("CUDA_HOME", "")] + glob.glob("/usr/local/cuda*")
    for h in homes:
        nvcc = os.path.join(h, "bin", "nvcc")
        if h and os.path.isfile(nvcc):
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            if f"release {torch.version.cuda.split('.')[0]}." in out:
                return True
    return False


@pytest.mark.skipif(torch.version.cuda is None or not _matching_toolkit_present(),
                    reason="CPU-only torch or no CUDA toolkit of torch's CUDA version: built without CUDA by design")
def test_cuda_sources_were_compiled():
    mod, err = _backend.extension()
    assert err is None, err
    assert mod.built_with_cuda(), "a CUDA toolkit and a CUDA torch are present, but _C was built without CUDA"


def test_version():
    assert beit_fast.__version__


def test_subpackages_after_a_bare_import():
    """`import beit_fast` is enough for beit_fast.train.info() / .models / .ops / .masking (the README's Python
    twins of the CLI raised AttributeError unless something had imported them first); other names still raise."""
    code = ("import beit_fast\n"
            "assert callable(beit_fast.train.info) and callable(beit_fast.models.load_checkpoint)\n"
            "assert callable(beit_fast.ops.layer_norm) and callable(beit_fast.masking.block_masks)\n"
            "try:\n    beit_fast.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no attribute 'no_such_name'" in out.stdout


def test_interpreter_problem_names_the_failing_version_pair(monkeypatch):
    """Triton < 3.7's interpreter cannot run with numpy >= 2.4: the triton backend on CPU says so (and the
    test session skips the interpreter tests) instead of failing inside the interpreter."""
    from importlib import metadata
    from beit_fast import _backend
    versions = {"triton": "3.6.0", "numpy": "2.4.1"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    problem = _backend.check_interpreter_versions()
    assert "use numpy<2.4 or Triton>=3.7" in problem
    monkeypatch.setattr(_backend, "INTERPRETER_PROBLEM", problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert problem in _backend.common_reasons("triton", [torch.zeros(1)])
    for triton_v, numpy_v in (("3.7.1", "2.4.1"), ("3.6.0", "2.3.5"), ("3.2.0", "2.2.6"), ("3.8.0+git1234", "2.10.0")):
        versions.update(triton=triton_v, numpy=numpy_v)
        assert _backend.check_interpreter_versions() is None, (triton_v, numpy_v)


def _fake_toolkit(folder, version: str, runtime: bool):
    """A folder with a bin/nvcc script printing `version` (and, with runtime, a lib64/libcudart.so)."""
    (folder / "bin").mkdir()
    if runtime:
        (folder / "lib64").mkdir()
        (folder / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.89'\n")
    nvcc.chmod(0o755)


def _setup_name(**env):
    """`python setup.py --name` in the repository with these environment variables added."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_refuses_a_toolkit_of_another_major_version(tmp_path):
    """torch cannot build with a toolkit of another CUDA major version: auto builds the CPU ops and says why,
    BEIT_FAST_CUDA=1 stops with the same reason."""
    other = "11.8" if not torch.version.cuda.startswith("11.") else "12.4"
    _fake_toolkit(tmp_path, other, runtime=True)
    out = _setup_name(CUDA_HOME=str(tmp_path), BEIT_FAST_CUDA="1")
    assert out.returncode != 0
    assert f"is {other} but torch was built with CUDA {torch.version.cuda}" in out.stderr + out.stdout
    out = _setup_name(CUDA_HOME=str(tmp_path), BEIT_FAST_CUDA="auto")
    assert out.returncode == 0 and "skipping CUDA sources because the CUDA toolkit" in out.stdout, out.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_refuses_a_cuda_home_that_is_not_a_toolkit(tmp_path):
    """CUDA_HOME naming a folder whose bin/nvcc is a wrapper script (no runtime library beside it) was taken
    as the toolkit, and the build failed at the link (-lcudart) after compiling everything: auto now skips
    the CUDA sources, naming the variable."""
    _fake_toolkit(tmp_path, torch.version.cuda, runtime=False)
    out = _setup_name(CUDA_HOME=str(tmp_path), BEIT_FAST_CUDA="auto")
    assert out.returncode == 0, out.stderr
    assert f"skipping CUDA sources because CUDA_HOME={tmp_path} is not a CUDA toolkit" in out.stdout, out.stdout


def test_setup_normalises_the_arch_list(tmp_path):
    """An empty TORCH_CUDA_ARCH_LIST (torch: "the GPUs visible now", none on a build machine) or stray
    separators (torch: "Unknown CUDA arch ()") broke the build inside torch: setup.py passes torch the
    entries alone, or its default."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import os, runpy, sys; sys.argv = ['setup.py', '--name']; import setuptools; "
              "setuptools.setup = lambda **kw: None; runpy.run_path('setup.py'); "
              "print('ARCHS=' + os.environ['TORCH_CUDA_ARCH_LIST'])")
    for given, want in (("", "8.0;9.0+PTX"), (" 8.0;9.0;", "8.0;9.0"), ("8.6  9.0+PTX", "8.6;9.0+PTX")):
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=given, BEIT_FAST_CUDA="0")
        out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
        assert f"ARCHS={want}\n" in out.stdout, (given, out.stdout, out.stderr)


# ---------------------------------------------------------------------------------------------------------
# mutation audit additions: the backend rules, each checked where a wrong branch would pass the tests above
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), ("true", True),
                                       ("on", True), ("yes", True), ("TRUE", True), ("false", False),
                                       ("off", False), ("no", False)])
def test_interpret_mode_reads_the_variable_as_triton_does(monkeypatch, value, on):
    """TRITON_INTERPRET unset, empty, 0 or a false word is not the interpreter; 1 or a true word is (Triton's
    own boolean reading): with TRITON_INTERPRET=false a forced triton backend on CPU tensors said nothing
    and failed inside Triton ('0 active drivers')."""
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.interpret_mode() is on
    cpu_reasons = " ".join(_backend.common_reasons("triton", ["cpu"]))
    assert ("TRITON_INTERPRET=1 is not set" in cpu_reasons) is not on
    # Triton 3.2 / 3.3 turn the interpreter on for "1" only, as their jit decorator reads it
    monkeypatch.setattr(_backend, "_BOOLEAN_ENV", False)
    assert _backend.interpret_mode() is (value == "1")


@pytest.mark.skipif(_backend.triton_import_error() is not None, reason="needs Triton")
def test_interpret_mode_agrees_with_the_installed_tritons_reading(monkeypatch):
    """The same answer as the installed Triton's own reading of TRITON_INTERPRET, for every spelling (3.4+:
    knobs.runtime.interpret; 3.2 / 3.3: the exact value "1")."""
    try:
        from triton import knobs
        knobs.runtime.interpret   # noqa: B018
    except Exception:   # Triton 3.2 / 3.3
        knobs = None
    for value in ("1", "true", "TRUE", "on", "yes", "y", "Y", "false", "0", "", " 1", "1 ", "t", "2"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        theirs = bool(knobs.runtime.interpret) if knobs is not None else value == "1"
        assert _backend.interpret_mode() is theirs, value


def test_tensors_on_several_devices_are_refused_by_every_backend(monkeypatch):
    """Tensors on two device types: every backend says so, and auto has nothing to run (no silent pick)."""
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    mixed = [torch.zeros(1), torch.zeros(1, device="meta")]
    for b in _backend.BACKENDS:
        assert any("several device types ['cpu', 'meta']" in r for r in _backend.common_reasons(b, mixed)), b
    with pytest.raises(_backend.BackendUnavailable, match="no backend can run.*several device types"):
        _backend.choose("x", "auto", lambda b, auto: _backend.common_reasons(b, mixed, auto=auto),
                        ("cpp", "reference"))


def test_backends_refuse_devices_they_do_not_run_on():
    """meta (or any non-CPU, non-CUDA) tensors: neither the cpp nor the triton backend takes them."""
    assert any("cpp backend needs CPU tensors, got meta" in r for r in _backend.common_reasons("cpp", ["meta"]))
    assert any("triton backend needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got meta" in r
               for r in _backend.common_reasons("triton", ["meta"]))
    assert _backend.common_reasons("reference", ["meta"]) == []


def test_triton_runs_on_compute_capability_8_0_and_asks_the_tensors_gpu(monkeypatch):
    """TRITON_MIN_CAPABILITY is inclusive: an A100 (8.0) runs the Triton kernels. The capability asked is that
    of the tensors' own GPU (cuda:1 here, a fake tensor: no GPU needed), not the current device's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "device_capability", lambda index: asked.append(index) or (8, 0))
    with FakeTensorMode():
        t = torch.empty(2, device="cuda:1")
    assert not any("compute capability" in r for r in _backend.common_reasons("triton", [t]))
    assert asked and set(asked) == {1}
    monkeypatch.setattr(_backend, "device_capability", lambda index: (7, 5))
    assert any("need compute capability 8.0 or newer" in r for r in _backend.common_reasons("triton", [t]))


def test_an_unknown_backend_variable_raises_for_every_auto_call(monkeypatch):
    """BEIT_FAST_BACKEND set to no backend: a call with backend='auto' raises naming the value (it does not
    quietly run auto); a backend asked for by name is unaffected."""
    monkeypatch.setenv("BEIT_FAST_BACKEND", "tritn")
    with pytest.raises(_backend.BackendUnavailable, match=r"BEIT_FAST_BACKEND='tritn' is not one of"):
        _backend.choose("x", "auto", lambda b, auto: [], ("cuda", "reference"))
    assert _backend.choose("x", "reference", lambda b, auto: [], ("cuda", "reference")) == "reference"


def test_the_variable_overrides_auto_only(monkeypatch):
    """BEIT_FAST_BACKEND replaces 'auto'; a backend the caller names is the one that runs (the reference
    asked for by a test or a parity check stays the reference under BEIT_FAST_BACKEND=triton)."""
    monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
    assert _backend.choose("x", "auto", lambda b, auto: [], ("triton", "reference")) == "triton"
    assert _backend.choose("x", "reference", lambda b, auto: [], ("triton", "reference")) == "reference"
    from beit_fast.ops.layer_norm import layer_norm, layer_norm_ref
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the triton backend cannot run: only the reference can
    assert torch.equal(layer_norm(x, w, b, backend="reference"), layer_norm_ref(x, w, b))


def test_extension_has_cuda_follows_the_build():
    """An extension built without its CUDA sources: extension_has_cuda() is False and the cuda backend says
    why (a stand-in _C module, in a fresh interpreter: the answer is read once at import)."""
    code = """
import sys, types
fake = types.ModuleType('beit_fast._C')
fake.built_with_cuda = lambda: False
fake._cuda_skip_reason_hex = lambda: b'no CUDA toolkit'.hex()
sys.modules['beit_fast._C'] = fake
from beit_fast import _backend
assert _backend.extension()[0] is fake
assert _backend.extension_has_cuda() is False
why = _backend.common_reasons('cuda', ['cuda'])
assert any('built without its CUDA sources because no CUDA toolkit' in r for r in why), why
print('ok')
"""
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_info_versions_device_and_extension_lines(monkeypatch):
    """info's header: torch with its CUDA version, Triton's version, what _C was built with, and the device
    (a stand-in GPU here: the line gives its name, sm, memory and the visible count)."""
    from beit_fast import info
    lines = info._versions()
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda})" in lines, lines
    if _backend.triton_import_error() is None:
        import triton
        assert any(x.startswith(f"triton {triton.__version__}") for x in lines), lines
    mod, err = _backend.extension()
    want = (f"beit_fast._C: built {'with' if mod.built_with_cuda() else 'without'} CUDA" if mod is not None
            else f"beit_fast._C: {err}")
    assert any(x.startswith(want) for x in lines), lines
    if not torch.cuda.is_available():
        assert "device: CPU only (no CUDA device visible)" in lines, lines
    props = type("P", (), {"name": "Stand-in GPU", "major": 9, "minor": 0, "total_memory": 80 * 2**30})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "device: Stand-in GPU (sm_90, 80 GiB), 2 visible" in info._versions()


def test_info_shows_an_op_module_that_fails_to_import(monkeypatch, capsys):
    """An op whose module does not import is listed with that reason on every backend row (not as
    available), and gets no mark; every other op has exactly one marked row."""
    from beit_fast import info
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    monkeypatch.setitem(info.OPS, "bogus_op", ("beit_fast.ops.no_such_module", ("cpp", "reference")))
    rows = [r for r in info.backend_table("cpu") if r[0] == "bogus_op"]
    assert [b for _, b, _ in rows] == ["cpp", "reference"]
    assert all(any("beit_fast.ops.no_such_module failed to import (ModuleNotFoundError" in w for w in why)
               for _, _, why in rows), rows
    info.main()
    out = capsys.readouterr().out
    table = out.split("backends for cpu tensors")[1].split("\n\n")[0].splitlines()[1:]
    assert all("unavailable: beit_fast.ops.no_such_module failed to import" in line and "<-" not in line
               for line in table if line.split()[0] == "bogus_op"), table
    marks = [line.split()[0] for line in table if "<- " in line]
    assert sorted(marks) == sorted(set(info.OPS) - {"bogus_op"}), table


def test_info_settings_check_reads_the_backend_as_the_chooser_does():
    """A BEIT_FAST_BACKEND value the chooser accepts (padded with blanks: it strips) is no settings problem."""
    from beit_fast.info import settings_problems
    assert settings_problems({"BEIT_FAST_BACKEND": " triton "}) == []
    assert settings_problems({"BEIT_FAST_BACKEND": " "}) == []
