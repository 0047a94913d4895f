"""Sessions of cluster-attention.  `nox -l` lists them.

Main job:   nox -s validate        every backend present vs the float64 reference, one table
Tests:      nox -s tests-3.11      the suite (pytest-xdist), posargs go to pytest
Others:     coverage, lint, build, build-check, check-compile, gpu, bench, compat, compat-diff

torch / triton versions come from ONE place: TORCH_VERSION / TRITON_VERSION below, each
overridable by the environment variables CLUSTER_TORCH / CLUSTER_TRITON. On a host without a
GPU the sessions set TRITON_INTERPRET=1 themselves, so the Triton kernels run on the CPU.
GPU hosts are often offline: there (nvidia-smi found) or with CLUSTER_NOX_NO_VENV=1, the
sessions validate, build, gpu and bench use the current environment and install nothing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests-3.11", "lint"]
nox.options.reuse_existing_virtualenvs = True

# ---------------------------------------------------------------- the one declared place
TORCH_VERSION = os.environ.get("CLUSTER_TORCH", "2.13.0")
TRITON_VERSION = os.environ.get("CLUSTER_TRITON", "3.6.0")
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
COVERAGE_FAIL_UNDER = 80

# (torch, triton) pairs of the compatibility matrix; CLUSTER_COMPAT_EXTRA="2.12.0:3.5.1,..."
# adds pairs. torch 2.14.1 is the CUDA build (5.4 GB venv) and requires triton~=3.8.0, so it
# pairs with 3.8.0 only; the CPU build of 2.13.0 has no triton pin and takes any, including
# triton 3.5.1 from PyPI (170 MB download), the oldest one kept in the default matrix.
COMPAT_MATRIX = [("2.13.0", "3.5.1"), ("2.13.0", "3.6.0"), ("2.13.0", "3.8.0"), ("2.14.1", "3.8.0")]
COMPAT_MATRIX += [tuple(p.split(":")) for p in os.environ.get("CLUSTER_COMPAT_EXTRA", "").split(",") if p]

HAS_GPU = shutil.which("nvidia-smi") is not None
NO_VENV = HAS_GPU or os.environ.get("CLUSTER_NOX_NO_VENV") == "1"
LOCAL_BACKEND = "none" if NO_VENV else "virtualenv"
COMPAT_TOOL = "src/cluster/compat.py"


def _env() -> dict:
    env = {"PYTHONHASHSEED": "0", "KEOPS_CACHE_FOLDER": os.path.abspath(".cache/keops")}
    if not HAS_GPU:
        env["TRITON_INTERPRET"] = "1"
    return env


def _install(session: nox.Session, torch_v: str = TORCH_VERSION, triton_v: str = TRITON_VERSION,
             extras: str = "test") -> None:
    if session.venv_backend == "none":
        return
    # numpy: Triton's interpreter needs it and neither torch nor triton declares it.
    session.install(f"torch=={torch_v}", f"triton=={triton_v}", "numpy")
    session.install("-e", f".[{extras}]")


def _pytest(session: nox.Session, *extra: str) -> None:
    args = list(session.posargs)
    if not any(a == "-n" or a.startswith("-n") or a.startswith("--numprocesses") for a in args):
        args = ["-n", os.environ.get("CLUSTER_WORKERS", "auto"), *args]
    session.run("python", "-m", "pytest", *extra, *args, env=_env())


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite under pytest-xdist; `-- --shard i/K`, `-k`, `-n 4` ... go to pytest."""
    # keops too, so the PyKeOps kNN is checked against the PyTorch one (compiles with g++)
    _install(session, extras="test,keops")
    _pytest(session)


@nox.session(python="3.11")
def coverage(session: nox.Session) -> None:
    """The suite under pytest-cov, with the coverage threshold enforced.

    Combines every shard's data in reports/coverage. On K machines: `nox -s coverage -- --shard i/K` on each, copy
    reports/coverage/.coverage.* together, then `nox -s coverage -- --combine-only`."""
    _install(session)
    os.makedirs("reports/coverage", exist_ok=True)
    posargs = list(session.posargs)
    combine_only = "--combine-only" in posargs
    if not combine_only:
        tag = "full"
        if "--shard" in posargs:
            i, k = posargs[posargs.index("--shard") + 1].split("/")
            tag = f"shard-{i}-of-{k}"
        data = os.path.abspath(f"reports/coverage/.coverage.{tag}")
        if os.path.exists(data):
            os.remove(data)
        session.run("python", "-m", "pytest", "-n", os.environ.get("CLUSTER_WORKERS", "auto"),
                    "--cov=cluster", "--cov-report=", *posargs,
                    env={**_env(), "COVERAGE_FILE": data})
        if "--shard" in posargs:
            session.log("shard data written; combine with `nox -s coverage -- --combine-only`")
            return
    files = sorted(glob.glob("reports/coverage/.coverage.*"))
    if not files:
        session.error("no coverage data in reports/coverage")
    cov = {"COVERAGE_FILE": os.path.abspath("reports/coverage/.coverage")}
    session.run("coverage", "combine", "--keep", *files, env=cov)
    session.run("coverage", "report", "--show-missing", f"--fail-under={COVERAGE_FAIL_UNDER}", env=cov)
    session.run("coverage", "html", "-d", "reports/coverage/html", env=cov)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over src, tests, benchmarks and this file."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python="3.11", venv_backend=LOCAL_BACKEND)
def validate(session: nox.Session) -> None:
    """The main job: every backend here vs float64; table + reports/validate.{json,md}."""
    _install(session)
    session.run("python", "-m", "cluster.validate", *session.posargs, env=_env())


@nox.session(python=False)
def build(session: nox.Session) -> None:
    """Compile the CUDA extension for the current environment's torch.

    TORCH_CUDA_ARCH_LIST (default 8.0;9.0) picks the targets; the result goes to the cache
    the package loads it from."""
    env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")}
    session.run("python", "-m", "cluster.cuda_ext", "build", *session.posargs, env=env)


@nox.session(name="build-check", python="3.11")
def build_check(session: nox.Session) -> None:
    """Every Triton kernel launch compiled to an sm_90 cubin on the CPU, no GPU needed.

    cluster.build_check --full with the declared Triton, ptxas included: compiler failures
    the interpreter never meets. Posargs replace those arguments."""
    _install(session)
    session.run("python", "-m", "cluster.build_check", *(session.posargs or ["--full", "--arch", "90"]))


@nox.session(name="check-compile", python="3.11")
def check_compile(session: nox.Session) -> None:
    """Compile-only check of csrc/ against the CUDA build of torch (no GPU needed)."""
    session.install("torch==2.14.1", "numpy")
    session.install("-e", ".")
    session.run("python", "-m", "cluster.cuda_ext", "check-compile", *session.posargs)


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """The whole suite and the validation table on a GPU host, in the current environment.

    Installs nothing (such hosts are often offline): builds the extension, runs the suite,
    then the validation table."""
    session.run("python", "-m", "cluster.cuda_ext", "build", success_codes=[0, 1])
    args = list(session.posargs) or ["-n", "1"]
    session.run("python", "-m", "pytest", "-ra", *args, env={"PYTHONHASHSEED": "0"})
    session.run("python", "-m", "cluster.validate", "--out", "reports/gpu")


@nox.session(python="3.11", venv_backend=LOCAL_BACKEND)
def bench(session: nox.Session) -> None:
    """GPU benchmark (benchmarks/bench.py); `-- --smoke` runs one tiny case per backend on the CPU."""
    if session.venv_backend != "none":
        _install(session, extras="test,bench")
    session.run("python", "benchmarks/bench.py", *session.posargs, env=_env())


@nox.session(python="3.11")
@nox.parametrize("torch_v,triton_v", COMPAT_MATRIX, ids=[f"torch{a}-triton{b}" for a, b in COMPAT_MATRIX])
def compat(session: nox.Session, torch_v: str, triton_v: str) -> None:
    """One (torch, triton) pair of the matrix: install, build, suite, validate, its report.

    Writes reports/compat/<pair>.json, then the combined table reports/compat/README.md.
    Posargs go to pytest."""
    pair = f"torch{torch_v}-triton{triton_v}"
    out = f"reports/compat/{pair}.json"
    os.makedirs("reports/compat", exist_ok=True)
    ok = True
    try:
        session.install(f"torch=={torch_v}", f"triton=={triton_v}", "numpy")
        session.install("-e", ".[test]")
    except nox.command.CommandFailed as exc:  # the table must still get this pair's row
        ok = False
        session.log(f"install failed: {exc}")
    session.run("python", COMPAT_TOOL, "run", "--pair", pair, "--torch", torch_v,
                "--triton", triton_v, "--out", out, "--install-ok", str(int(ok)),
                *session.posargs, env=_env(), success_codes=[0, 1])
    session.run("python", COMPAT_TOOL, "table", "reports/compat")
    with open(out) as f:  # the table has the row either way; the exit status tells CI
        if not json.load(f)["ok"]:
            session.error(f"{pair} failed: see {out} and reports/compat/README.md")


@nox.session(name="compat-diff", python=False)
def compat_diff(session: nox.Session) -> None:
    """Compare two compat reports: `nox -s compat-diff -- old.json new.json [--drift X]`."""
    if len(session.posargs) < 2:
        session.error("usage: nox -s compat-diff -- OLD.json NEW.json [--drift X]")
    session.run("python3", COMPAT_TOOL, "diff", *session.posargs, external=True)
