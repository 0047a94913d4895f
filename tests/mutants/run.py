"""Mutation testing of the suite: every planted bug of the catalogue must fail some test.

``nox -s mutants`` (or ``python -m tests.mutants.run`` from the repository root) copies the
repository's ``src/``, ``tests/`` and ``pyproject.toml`` once to a temporary directory;
for each bug of ``tests/mutants/catalogue.py`` it applies the replacement to the copy (never
to the checkout), runs the bug's tests there under pytest-xdist (``-n 2 -x``, a per-bug
timeout, ``TRITON_INTERPRET=1`` without a GPU, ``PYTHONPATH`` at the copy's ``src``),
records killed / survived and the seconds taken, and restores the copy's file. It writes
reports/mutants.md (one row per bug, the score, date and commit) and reports/mutants.json,
and exits 1 if the score is below 100 % (a bug that no test kills). Entries marked
``equivalent`` in the catalogue are run too and reported as "equivalent" with their
reason, outside the score's denominator. A failing or interrupted run (pytest's exit
status 1 or 2) kills a bug; a timeout or a run that collects nothing does not.

tests/integration/test_suite_catches_bugs.py stays outside the catalogue: it is the fast
CI subset (seconds, in every ``nox -s tests`` run), planting its stand-in bugs in process
as a fake "triton" backend to show that the suite's own comparison helpers fail on them;
the catalogue lists it as the test path of the cluster.testing bugs instead.

Before the bugs, every distinct test selection runs once on the unmutated copy, and the
tool stops (exit 2) if one fails: a selection that fails anyway would "kill" every bug.

Options: ``--only ID [ID ...]`` runs some bugs; ``--no-baseline`` skips the unmutated
runs; ``--timeout S`` per bug (default 240); ``--workers N`` (default 2); ``--list``
prints the catalogue.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.mutants.catalogue import CATALOGUE, Mutant  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT_MD = os.path.join(ROOT, "reports", "mutants.md")
REPORT_JSON = os.path.join(ROOT, "reports", "mutants.json")


def _copy_tree(dst: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.so", "*.egg-info")
    for name in ("src", "tests"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name), ignore=ignore)
    shutil.copy2(os.path.join(ROOT, "pyproject.toml"), os.path.join(dst, "pyproject.toml"))


def _env(work: str) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.path.join(work, "src"), PYTHONHASHSEED="0",
               PYTHONDONTWRITEBYTECODE="1")
    if shutil.which("nvidia-smi") is None:
        env["TRITON_INTERPRET"] = "1"
    return env


def _pytest(work: str, tests: tuple[str, ...], workers: int, timeout: float) -> tuple[str, float, str]:
    """(status, seconds, last lines of output): status killed / survived / timeout / error."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-n",
           str(workers), *tests]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=_env(work), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.time() - t0, out[-2000:]
    seconds = time.time() - t0
    # 1: tests failed; 2: interrupted, which is how xdist's -x (or a collection error the
    # bug caused) ends. The baseline shows the selections pass unmutated.
    status = {0: "survived", 1: "killed", 2: "killed"}.get(proc.returncode, "error")
    return status, seconds, out[-2000:]


def _check_imports(work: str) -> None:
    out = subprocess.run([sys.executable, "-c", "import cluster; print(cluster.__file__)"],
                         cwd=work, env=_env(work), capture_output=True, text=True, check=True)
    where = out.stdout.strip()
    if not os.path.realpath(where).startswith(os.path.realpath(work)):
        raise SystemExit(f"mutants: the copy imports cluster from {where}, not from {work}")


def _apply(work: str, m: Mutant) -> str:
    path = os.path.join(work, m.module)
    with open(path) as f:
        text = f.read()
    if text.count(m.original) != 1:
        raise SystemExit(f"mutants: {m.id}: the original text occurs {text.count(m.original)} "
                         f"times in {m.module} (expected once)")
    with open(path, "w") as f:
        f.write(text.replace(m.original, m.replacement))
    return text


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_reports(rows: list[dict], total_s: float, complete: bool) -> dict:
    counted = [r for r in rows if r["status"] != "equivalent"]
    killed = sum(r["status"] == "killed" for r in counted)
    score = 100.0 * killed / len(counted) if counted else 100.0
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(), "bugs": len(rows), "counted": len(counted), "killed": killed,
        "equivalent": len(rows) - len(counted), "score_percent": round(score, 2),
        "seconds": round(total_s, 1), "complete_catalogue": complete, "rows": rows,
    }
    os.makedirs(os.path.dirname(REPORT_JSON), exist_ok=True)
    with open(REPORT_JSON, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    lines = [
        "# Mutation score of the test suite",
        "",
        f"`nox -s mutants` (tests/mutants/run.py) on commit {summary['commit']}, "
        f"{summary['date']}: **{score:.1f} %** ({killed} of {len(counted)} planted bugs killed; "
        f"{summary['equivalent']} equivalent, outside the score), {total_s:.0f} s"
        + ("" if complete else " (a subset of the catalogue, --only)") + ".",
        "",
        "The bugs are in tests/mutants/catalogue.py; each ran on a copy of src/ and tests/ "
        "with its listed tests (pytest-xdist, `-x`).",
        "",
        "| bug | module | what | result | seconds |",
        "|---|---|---|---|---:|",
    ]
    for r in rows:
        result = r["status"] if r["status"] != "equivalent" else f"equivalent: {r['reason']}"
        lines.append(f"| {r['id']} | {r['module']} | {r['what']} | {result} | {r['seconds']:.1f} |")
    with open(REPORT_MD, "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the planted bugs of tests/mutants/catalogue.py.")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these bugs")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per bug (default 240)")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the first, unmutated run of every distinct test selection")
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    args = ap.parse_args(argv)

    chosen = list(CATALOGUE)
    if args.only:
        known = {m.id for m in CATALOGUE}
        unknown = sorted(set(args.only) - known)
        if unknown:
            ap.error(f"--only: unknown bug ids {unknown}")
        chosen = [m for m in CATALOGUE if m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:42s} {m.module:40s} {m.what}")
        return 0

    t_all = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cluster-mutants-") as work:
        _copy_tree(work)
        _check_imports(work)
        if args.baseline:
            for sel in dict.fromkeys(m.tests for m in chosen):
                status, sec, out = _pytest(work, sel, args.workers, args.timeout)
                print(f"baseline {'passed' if status == 'survived' else status:8s} {sec:6.1f} s  "
                      f"{' '.join(sel)}", flush=True)
                if status != "survived":
                    print(out)
                    return 2
        for i, m in enumerate(chosen, 1):
            text = _apply(work, m)
            try:
                status, sec, out = _pytest(work, m.tests, args.workers, args.timeout)
            finally:
                with open(os.path.join(work, m.module), "w") as f:
                    f.write(text)
            shown = status
            if m.equivalent:
                shown = f"equivalent ({status})"
                status = "equivalent"
            print(f"[{i:2d}/{len(chosen)}] {shown:22s} {sec:6.1f} s  {m.id}: {m.what}", flush=True)
            if status in ("survived", "timeout", "error"):
                print("    " + "\n    ".join(out.strip().splitlines()[-6:]), flush=True)
            rows.append(dict(id=m.id, module=m.module, what=m.what, status=status,
                             seconds=round(sec, 1), reason=m.equivalent, tests=list(m.tests)))
    summary = _write_reports(rows, time.time() - t_all, complete=not args.only)
    print(f"mutation score {summary['score_percent']:.1f} % ({summary['killed']}/"
          f"{summary['counted']} killed, {summary['equivalent']} equivalent) in "
          f"{summary['seconds']:.0f} s; reports/mutants.md, reports/mutants.json", flush=True)
    return 0 if summary["killed"] == summary["counted"] else 1


if __name__ == "__main__":
    sys.exit(main())
