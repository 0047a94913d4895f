"""Sessions of cluster-attention.  `nox -l` lists them.

Main job:   nox -s validate        every backend present vs the float64 reference, one table
Tests:      nox -s tests-3.11      the suite (pytest-xdist), posargs go to pytest
Others:     coverage, lint, build, build-check, build-check-latest, check-compile, gpu, bench,
            compat, compat-latest, compat-diff, mutants (not run by default)

torch / triton versions come from ONE place: TORCH_VERSION / TRITON_VERSION below, each
overridable by the environment variables CLUSTER_TORCH / CLUSTER_TRITON. On a host without a
GPU the sessions set TRITON_INTERPRET=1 themselves, so the Triton kernels run on the CPU.
GPU hosts are often offline: there (nvidia-smi found) or with CLUSTER_NOX_NO_VENV=1, the
sessions validate, build, gpu, bench and mutants use the current environment and install nothing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time

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
# adds pairs. torch 2.14.1 and 2.15.0 are CUDA builds (several GB) and pin triton ~=3.8.0 and
# ~=3.9.0; the CPU build of 2.13.0 has no triton pin and takes any: the oldest triton the
# extra admits (3.5.1), CI's, 3.7.1, 3.8.0 and the newest (3.9.0).
COMPAT_MATRIX = [("2.13.0", "3.5.1"), ("2.13.0", "3.6.0"), ("2.13.0", "3.7.1"), ("2.13.0", "3.8.0"),
                 ("2.13.0", "3.9.0"), ("2.14.1", "3.8.0"), ("2.15.0", "3.9.0")]
COMPAT_MATRIX += [tuple(p.split(":")) for p in os.environ.get("CLUSTER_COMPAT_EXTRA", "").split(",") if p]

HAS_GPU = shutil.which("nvidia-smi") is not None
NO_VENV = HAS_GPU or os.environ.get("CLUSTER_NOX_NO_VENV") == "1"
LOCAL_BACKEND = "none" if NO_VENV else "virtualenv"
COMPAT_TOOL = "src/cluster/compat.py"
CI_PAIR = f"torch{TORCH_VERSION}-triton{TRITON_VERSION}"


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


def _supported_triton() -> str:
    """The Triton releases this package claims: the range of its `triton` extra."""
    import tomllib

    with open("pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["triton"]
    return next(r for r in extra if r.startswith("triton"))[len("triton"):]


def _resolve(session: nox.Session, *reqs: str, plain: bool = False) -> dict:
    """name -> version that `pip install REQS` picks from the index now (a dry run).

    plain: without this machine's pip configuration files (a constraint file may cap torch
    below the newest release), as on a user's machine."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "resolve.json")
        env = {"PIP_CONFIG_FILE": os.devnull} if plain else {}
        session.run("python", "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                    "--report", report, *reqs, env=env, silent=True)
        with open(report) as f:
            picked = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                      for i in json.load(f)["install"]}
    session.log("the index resolves " + ", ".join(f"{r} -> {picked.get(r.lower(), '?')}" for r in reqs))
    return picked


def _pip_cap_refuses(session: nox.Session, torch_v: str) -> bool:
    """Whether a constraint file in this machine's pip configuration refuses torch ``torch_v``
    (some machines cap torch at the releases kept on their disk)."""
    from packaging.requirements import Requirement

    listing = session.run("python", "-m", "pip", "config", "list", silent=True) or ""
    for line in str(listing).splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".constraint") and os.path.exists(value.strip("'\"")):
            with open(value.strip("'\"")) as f:
                for req in f:
                    req = req.split("#")[0].strip()
                    if req and Requirement(req).name == "torch" and torch_v not in Requirement(req).specifier:
                        return True
    return False


def _install_pair(session: nox.Session, torch_v: str, triton_v: str) -> float:
    """Install the pair and the package (test extra); seconds taken.

    The pair asks for that torch release, so a pip constraint of this machine that refuses
    it is left out (pip's configuration files skipped) for this install."""
    t0 = time.time()
    env = {}
    if _pip_cap_refuses(session, torch_v):
        session.log(f"this machine's pip constraint refuses torch {torch_v}: installing it "
                    "from the index without pip's configuration files")
        env = {"PIP_CONFIG_FILE": os.devnull}
    session.run("python", "-m", "pip", "install", f"torch=={torch_v}", f"triton=={triton_v}",
                "numpy", env=env)
    session.run("python", "-m", "pip", "install", "-e", ".[test]", env=env)
    return time.time() - t0


def _compat_pair(session: nox.Session, torch_v: str, triton_v: str) -> None:
    pair = f"torch{torch_v}-triton{triton_v}"
    out = f"reports/compat/{pair}.json"
    os.makedirs("reports/compat", exist_ok=True)
    ok, seconds = True, 0.0
    try:
        seconds = _install_pair(session, torch_v, triton_v)
        session.log(f"{pair} installed in {seconds:.0f} s")
    except nox.command.CommandFailed as exc:  # the table must still get this pair's row
        ok = False
        session.log(f"install failed: {exc}")
    session.run("python", COMPAT_TOOL, "run", "--pair", pair, "--torch", torch_v,
                "--triton", triton_v, "--out", out, "--install-ok", str(int(ok)),
                "--install-seconds", f"{seconds:.0f}", "--build-full", "1",
                *session.posargs, env=_env(), success_codes=[0, 1])
    session.run("python", COMPAT_TOOL, "table", "reports/compat", "--base", CI_PAIR,
                "--readme", "README.md")
    with open(out) as f:  # the table has the row either way; the exit status tells CI
        if not json.load(f)["ok"]:
            session.error(f"{pair} failed: see {out} and reports/compat/README.md")


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


@nox.session(python="3.11", venv_backend=LOCAL_BACKEND, default=False)
def mutants(session: nox.Session) -> None:
    """Plant each bug of tests/mutants/catalogue.py in a copy of src/ and fail unless some test catches every one."""
    # Writes reports/mutants.{md,json}; posargs go to tests/mutants/run.py (--only ID,
    # --no-baseline, --timeout S, --list). About 12 minutes on 2 cores.
    _install(session)
    session.run("python", "-m", "tests.mutants.run", *session.posargs, env=_env())


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

    Writes reports/compat/<pair>.json, then the table and the upgrade verdicts (CI's pair
    against the newest pairs) in reports/compat/README.md. Posargs go to pytest."""
    _compat_pair(session, torch_v, triton_v)


@nox.session(name="compat-latest", python="3.11")
def compat_latest(session: nox.Session) -> None:
    """The pair a user gets today: the newest torch and triton, run as a pair of the matrix.

    Asks the index what `pip install torch triton` resolves to on a machine without pip
    configuration files, then installs and runs that pair exactly as `compat` does."""
    picked = _resolve(session, "torch", "triton", plain=True)
    _compat_pair(session, picked["torch"], picked["triton"])


@nox.session(name="build-check-latest", python="3.11")
def build_check_latest(session: nox.Session) -> None:
    """build_check --full under the newest triton release, beside CI's torch.

    Fails only if that release is one the package claims (the `triton` extra's range);
    a newer one gets a notice naming it and the kernels that fail to build."""
    from packaging.specifiers import SpecifierSet

    newest = _resolve(session, "triton")["triton"]
    claimed = SpecifierSet(_supported_triton())
    session.install(f"torch=={TORCH_VERSION}", f"triton=={newest}", "numpy")
    session.install("-e", ".")
    report = os.path.join(session.create_tmp(), "build_check.json")
    if os.path.exists(report):
        os.remove(report)
    session.run("python", "-m", "cluster.build_check", "--full", "--arch", "90", "--report", report,
                success_codes=[0, 1])
    with open(report) as f:
        res = json.load(f)
    bad = ", ".join(res["failing"] + res["not_reached"])
    if newest in claimed:
        if not res["ok"]:
            session.error(f"triton {newest} is supported (triton{claimed}) and fails to build: {bad}")
        session.log(f"triton {newest} (supported: triton{claimed}): every kernel builds")
    else:
        verdict = f"fails to build {bad}" if not res["ok"] else "builds every kernel"
        session.warn(f"NOTICE: triton {newest} is newer than the supported range triton{claimed} "
                     f"and {verdict}; add its compat pair and widen the range once it passes")


@nox.session(name="compat-diff", python=False)
def compat_diff(session: nox.Session) -> None:
    """Compare two compat reports: `-- OLD.json NEW.json [--drift X]`; no posargs: the upgrade verdicts.

    Without posargs: CI's pair against the newest torch's pair and the newest triton's,
    written to reports/compat/upgrade-*.txt and the verdicts in reports/compat/README.md."""
    if not session.posargs:
        session.run("python3", COMPAT_TOOL, "table", "reports/compat", "--base", CI_PAIR,
                "--readme", "README.md", external=True)
        return
    if len(session.posargs) < 2:
        session.error("usage: nox -s compat-diff -- OLD.json NEW.json [--drift X]")
    session.run("python3", COMPAT_TOOL, "diff", *session.posargs, external=True)
