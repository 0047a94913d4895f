"""cluster.build_check: the triton backend's kernels built for a GPU target on any machine.

The interpreter runs kernels without compiling them, so only this check sees, on the CPU, a
kernel that Triton's compiler rejects. The interpreter is chosen when a kernel is decorated:
recording runs here (it runs no kernel), compiling runs in a subprocess without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")

from cluster import build_check  # noqa: E402

_SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([_SRC, env.get("PYTHONPATH", "")])
    return env


def test_every_kernel_builds_for_sm90(tmp_path):
    # Recording (here; no kernel runs) must reach every _Launch kernel, with the GPU's
    # choices (the FTZ exp the interpreter never runs, the tail kernel's three modes); each
    # launch must then pass Triton's front end for sm_90 (in a process without the
    # interpreter); the script names what failed and why.
    from cluster import triton_kernels as tk
    from cluster.triton_kernels import gluon_forward, launch, tuning

    interpreting = launch._INTERPRET
    tables = {name: dict(getattr(tuning, name)) for name in tuning.knobs()
              if name.startswith("TUNING")}
    launches = build_check.record()
    assert launch._INTERPRET == interpreting  # restored
    assert tables == {name: dict(getattr(tuning, name)) for name in tables}
    every = set(tk.kernels())
    assert {name for name, _v, _o in launches} == every
    modes = {v["PE_MODE"][1] for n, v, _o in launches if n == "_backward_tail_kernel"}
    assert modes == {0, 1, 3}  # no pe / fast replicas / fixed point
    assert any(v.get("FTZ") == ["bool", True] for _n, v, _o in launches)
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches, default=str))
    p = subprocess.run([sys.executable, "-m", "cluster.build_check", "--launches", str(path),
                        "--arch", "90", "--report", str(tmp_path / "report.json")],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "build_check: 0 failed, 0 kernels not reached" in p.stdout
    assert "_backward_tail_kernel" in p.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["failing"] == [] and report["not_reached"] == []
    assert report["triton"] == triton.__version__ and report["launches"] == len(launches)
    # Which float32 forward this Triton builds: the Gluon one, or (a release outside the
    # Gluon API it was written for) the FMA group kernel, reported as such.
    gluon_used = gluon_forward.available(launch._TRITON_RELEASE)
    assert ("_attn_fwd_gluon_kernel" in every) == gluon_used
    assert ("_attn_fwd_gluon_kernel" in report["unused"]) == (not gluon_used)


def test_build_check_reports_what_the_compiler_rejects(tmp_path):
    # A kernel whose variable has one type in the if branch and another in the else runs
    # under the interpreter but does not compile: the check must say so, and pass its twin.
    (tmp_path / "build_check_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def bad_kernel(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            if n > 0:
                total = tl.load(X + offs).to(tl.int64)
            else:
                total = tl.load(X + offs)
            tl.store(X + offs, total.to(tl.float32))

        @triton.jit
        def good_kernel(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            if n > 0:
                total = tl.load(X + offs) * 2.0
            else:
                total = tl.load(X + offs)
            tl.store(X + offs, total)
    '''))
    launch = {"X": ["tensor", "float32"], "n": ["int", 3], "BLOCK": ["int", 64]}
    # In a subprocess: this one may have imported triton under the interpreter, and its
    # kernels (Triton's own included) cannot then be compiled here.
    script = textwrap.dedent(f'''
        import json
        import build_check_kernels as m
        from cluster.build_check import compile_launches
        launches = [["bad_kernel", {launch!r}, {{"num_warps": 4}}],
                    ["good_kernel", {launch!r}, {{"num_warps": 4}}]]
        print(json.dumps(compile_launches(launches, 90, False, m)))
    ''')
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    (bad, _o, bad_err, _s), (good, _o2, good_err, _s2) = results
    assert bad == "bad_kernel" and bad_err is not None and "Mismatched type" in bad_err
    assert good == "good_kernel" and good_err is None


def test_signature_specializes_as_the_jit():
    # Integers equal to 1 become constants and multiples of 16 and tensors carry
    # divisibility 16, as Triton's JIT specializes them, except for the parameters a kernel
    # opts out (the Gluon forward's H: Triton 3.6 fails lowering its 1-specialization).
    from collections import namedtuple

    P = namedtuple("P", "name is_constexpr do_not_specialize do_not_specialize_on_alignment "
                        "default")

    class Kernel:
        __name__ = "kernel"
        params = [P("X", False, False, False, None), P("n", False, False, False, None),
                  P("m", False, False, False, None), P("H", False, True, False, None),
                  P("s", False, False, True, None), P("BLOCK", True, False, False, None)]

    sig, const, attrs = build_check._signature(Kernel, {
        "X": ["tensor", "float32"], "n": ["int", 1], "m": ["int", 32], "H": ["int", 1],
        "s": ["int", 48], "BLOCK": ["int", 16]})
    assert sig == {"X": "*fp32", "n": "constexpr", "m": "i32", "H": "i32", "s": "i32",
                   "BLOCK": "constexpr"}
    assert const == {"n": 1, "BLOCK": 16}
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def test_failure_text_names_the_compilers_own_error():
    """A CompilationError's text is the source excerpt; the cause holds the message a
    maintainer needs (e.g. a Gluon call a Triton release removed): both are reported."""
    from cluster.build_check import error_text

    try:
        try:
            raise RuntimeError("async_copy_global_to_shared has been removed; call async_load instead")
        except RuntimeError as inner:
            raise ValueError("at 12:8:\n    async_copy(...)\n    ^") from inner
    except ValueError as outer:
        text = error_text(outer)
    assert text.splitlines()[0] == "ValueError: at 12:8:"
    assert text.endswith("caused by RuntimeError: async_copy_global_to_shared has been removed; "
                         "call async_load instead")
