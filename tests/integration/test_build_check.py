"""cluster.build_check: the triton backend's kernels built for a GPU target on any machine.

The interpreter runs kernels without compiling them, so only this check sees, on the CPU, a
kernel that Triton's compiler rejects. Both tests run in subprocesses: the interpreter is
chosen when triton is imported, and other test modules set it for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its CUDA backend")

_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _env(tmp_path=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    paths = [os.path.abspath(_SRC)] + ([str(tmp_path)] if tmp_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def test_every_kernel_builds_for_sm90():
    # Every _Launch kernel of cluster.triton_kernels must be reached by a recorded launch and
    # pass Triton's front end for sm_90; the script says which failed and why.
    p = subprocess.run([sys.executable, "-m", "cluster.build_check", "--arch", "90"],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "build_check: 0 failed, 0 kernels not reached" in p.stdout
    assert "_backward_tail_kernel" in p.stdout and "_attn_bwd_kv_cluster_kernel" in p.stdout


def test_build_check_reports_what_the_compiler_rejects(tmp_path):
    # A kernel whose variable has one type in the if branch and another in the else runs
    # under the interpreter but does not compile: the check must say so, and pass its twin.
    (tmp_path / "kernels_under_test.py").write_text(textwrap.dedent('''
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
    script = textwrap.dedent(f'''
        import json
        import kernels_under_test as m
        from cluster.build_check import compile_launches
        launches = [["bad_kernel", {launch!r}, {{"num_warps": 4}}],
                    ["good_kernel", {launch!r}, {{"num_warps": 4}}]]
        print(json.dumps([[n, e] for n, _o, e, _s in compile_launches(launches, 90, False, m)]))
    ''')
    p = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    (bad, bad_err), (good, good_err) = json.loads(p.stdout.strip().splitlines()[-1])
    assert bad == "bad_kernel" and bad_err is not None and "Mismatched type" in bad_err
    assert good == "good_kernel" and good_err is None
