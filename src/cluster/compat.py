"""Version-compatibility reports: one JSON per (torch, triton) pair, a combined table, a diff.

Run as a script path (``python src/cluster/compat.py ...``), not as ``-m cluster.compat``:
the `table` and `diff` commands, and `run` for a pair whose install failed, must work with
an interpreter that has no torch, so this file imports nothing of the package at the top.

    run   --pair P --torch X --triton Y --out F.json [--install-ok 0|1] [--build-arch '90 80']
          [pytest args]
    table DIR                       -> DIR/README.md from every DIR/*.json
    diff  OLD.json NEW.json [--drift 0.5]    exit 1 if NEW regressed
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET


def _junit(path: str) -> dict:
    res = {"passed": 0, "failed": 0, "skipped": 0, "failing": [], "skipped_ids": {}}
    if not os.path.exists(path):
        return res
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            res["failed"] += 1
            res["failing"].append(tid)
        elif case.find("skipped") is not None:
            res["skipped"] += 1
            res["skipped_ids"][tid] = (case.find("skipped").get("message") or "")[:200]
        else:
            res["passed"] += 1
    return res


def _commit() -> str:
    """HEAD, plus "+changes" when the code under test differs from it (reports/ may differ)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "csrc", "tests"],
                               capture_output=True, text=True, cwd=os.path.join(here, "..", "..")).stdout
    except OSError:
        return "unknown"
    return (head + ("+changes" if dirty.strip() else "")) if head else "unknown"


# Run by the pair's own interpreter: versions, the CUDA extension's status and nvcc, at once.
_PROBE = """
import json, torch, triton
from cluster import cuda_ext, ops
info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "nvcc": cuda_ext.find_nvcc()}
try:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["extension"] = ops.backend_unavailable_reason("cuda", dev, torch.float32) or "available"
except Exception as exc:
    info["extension"] = f"{type(exc).__name__}: {exc}"[-300:]
print(json.dumps(info))
"""


def _build_check(arches: list[str]) -> dict:
    """Every Triton kernel launch compiled for the CUDA ``arches`` by this pair's Triton,
    through ``cluster.build_check`` (no GPU needed). The suite's CPU run goes through the
    interpreter, which compiles nothing, so a Triton release whose compiler rejects a
    kernel would otherwise pass here."""
    cp = subprocess.run([sys.executable, "-m", "cluster.build_check", "--arch", *arches],
                        capture_output=True, text=True)
    out = (cp.stdout + cp.stderr).splitlines()
    failing = set()
    for line in out:
        words = line.split()
        if words[:1] == ["FAIL"] and len(words) > 1:
            failing.add(words[1])
        elif words[:2] == ["NOT", "REACHED"] and len(words) > 2:
            failing.add(words[2].rstrip(":"))
    summary = next((line for line in reversed(out) if line.startswith("build_check:")), "")
    res = {"ok": cp.returncode == 0, "arch": list(arches), "summary": summary,
           "failing": sorted(failing)}
    if cp.returncode != 0:
        res["tail"] = "\n".join(out[-15:])[-1500:]
    return res


def _case_key(c: dict) -> str:
    """backend[/mode]|dtype|config of one cluster.validate case."""
    mode = "" if c["mode"] == "-" else "/" + c["mode"]
    return f"{c['backend']}{mode}|{c['dtype']}|{c['config']}"


def cmd_run(a, pytest_args) -> int:
    t0 = time.time()
    rep = {"pair": a.pair, "torch_requested": a.torch, "triton_requested": a.triton,
           "install_ok": bool(a.install_ok), "import_ok": False, "extension": "not checked",
           "tests": None, "errors": {}, "python": sys.version.split()[0], "commit": _commit()}
    if a.install_ok:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
        rep["import_ok"] = probe.returncode == 0
        if rep["import_ok"]:
            rep.update(json.loads(probe.stdout.strip().splitlines()[-1]))
            nvcc = rep.pop("nvcc")
            # A CUDA build of torch plus nvcc can compile csrc/ without a GPU; a CPU build refuses.
            if a.check_compile == "auto":
                a.check_compile = bool(rep.get("cuda")) and nvcc is not None
            if a.check_compile:
                cc = subprocess.run([sys.executable, "-m", "cluster.cuda_ext", "check-compile"],
                                    capture_output=True, text=True)
                rep["extension"] = ("compiles" if cc.returncode == 0
                                    else "compile FAILED: " + (cc.stdout + cc.stderr)[-300:])
        else:
            rep["import_error"] = probe.stderr.strip()[-500:]
    rep["build"] = None
    arches = [x for x in a.build_arch.replace(",", " ").split() if x != "none"]
    if rep["import_ok"] and arches:
        rep["build"] = _build_check(arches)
    if rep["import_ok"]:
        with tempfile.TemporaryDirectory() as tmp:
            xml = os.path.join(tmp, "junit.xml")
            t1 = time.time()
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", *(pytest_args or ["-n", "auto"])])
            rep["tests"] = _junit(xml)
            rep["tests"]["seconds"] = round(time.time() - t1, 1)
            subprocess.run([sys.executable, "-m", "cluster.validate", "--configs", "suite",
                            "--out", tmp], capture_output=True, text=True)
            vpath = os.path.join(tmp, "validate.json")
            if os.path.exists(vpath):
                with open(vpath) as f:
                    v = json.load(f)
                rep["errors"] = {_case_key(c): max(r["abs"] for r in c["results"].values())
                                 for c in v["cases"]}
                rep["validate_verdict"] = v["verdict"]
                rep["validate_failures"] = {_case_key(c): c.get("error", "tolerance")
                                            for c in v["cases"] if not c["ok"]}
                rep["skipped_backends"] = v["skipped"]
    rep["seconds"] = round(time.time() - t0, 1)
    t = rep["tests"]
    rep["ok"] = bool(rep["import_ok"] and t and t["failed"] == 0 and t["passed"] > 0
                     and rep.get("validate_verdict") == "PASS"
                     and (rep["build"] is None or rep["build"]["ok"]))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    counts = f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped" if t else "not run"
    print(f"compat {a.pair}: install {rep['install_ok']}, import {rep['import_ok']}, "
          f"kernels build {_build_cell(rep.get('build'))}, tests {counts}, "
          f"validate {rep.get('validate_verdict', '-')}, {rep['seconds']} s -> {a.out}")
    for tid in (t or {}).get("failing", []):
        print(f"  FAILED {tid}")
    return 0 if rep["ok"] else 1


def _arches(build: dict) -> str:
    return "/".join(f"sm_{x}" for x in build["arch"])


def _build_cell(build: dict | None) -> str:
    if not build:
        return "-"
    arch = _arches(build)
    if build["ok"]:
        return f"yes ({arch})"
    names = ", ".join(build["failing"][:3]) + (" ..." if len(build["failing"]) > 3 else "")
    return f"**no** ({arch}: {names or 'see JSON'})"


def cmd_table(d: str) -> int:
    rows = []
    for p in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        t = r.get("tests") or {}
        # float16/bfloat16 errors are judged against the reference's own error, not a bound,
        # so the glanceable column is float32's.
        worst = max((e for k, e in r.get("errors", {}).items() if "|float32|" in k), default=float("nan"))
        rows.append(
            f"| {r['pair']} | {r.get('torch', '-')} | {r.get('triton', '-')} | "
            f"{'yes' if r['install_ok'] else '**no**'} | {'yes' if r['import_ok'] else '**no**'} | "
            f"{r.get('extension', '-')[:60]} | {_build_cell(r.get('build'))} | "
            f"{t.get('passed', '-')} / {t.get('failed', '-')} / "
            f"{t.get('skipped', '-')} | {r.get('validate_verdict', '-')} | {worst:.1e} | {r['seconds']:.0f} s | "
            f"{'PASS' if r.get('ok') else '**FAIL**'} |")
    md = ["# torch x triton compatibility", "",
          "Written by `nox -s compat` (one row per pair; JSON beside this file). Tests: "
          "passed / failed / skipped. Kernels build: every Triton kernel launch compiled "
          "by the pair's Triton for the CUDA arch (`python -m cluster.build_check`; the CPU "
          "suite runs the interpreter, which compiles nothing). "
          "Validate: verdict of `cluster.validate` on the suite "
          "configurations. Worst fp32 error: largest max-abs error (output or any gradient) of "
          "any float32 backend x configuration against the float64 reference; every error, "
          "float16/bfloat16 included, is in the JSON.", "",
          "| pair | torch | triton | installs | imports | CUDA extension | kernels build | tests "
          "| validate | worst fp32 error | time | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


DRIFT_FLOOR = 1e-7  # error changes below this are float32 rounding noise whatever the ratio


def cmd_diff(old_p: str, new_p: str, drift: float = 0.5) -> int:
    with open(old_p) as f:
        old = json.load(f)
    with open(new_p) as f:
        new = json.load(f)
    lines, bad = [f"compat diff: {old['pair']} -> {new['pair']}"], False
    for key in ("install_ok", "import_ok"):
        if old.get(key) and not new.get(key):
            lines.append(f"REGRESSION: {key} was true, now false")
            bad = True
    ob, nb = old.get("build"), new.get("build")
    if ob and ob["ok"] and nb and not nb["ok"]:
        lines.append(f"REGRESSION: kernels no longer build for {_arches(nb)}: "
                     f"{', '.join(nb['failing']) or nb.get('summary', '')}")
        bad = True
    elif ob and ob["ok"] and not nb and new.get("import_ok"):
        lines.append("kernels build: not checked in the new report")
    of = set((old.get("tests") or {}).get("failing", []))
    nf = set((new.get("tests") or {}).get("failing", []))
    for tid in sorted(nf - of):
        lines.append(f"NEWLY FAILING: {tid}")
        bad = True
    for tid in sorted(of - nf):
        lines.append(f"fixed: {tid}")
    # A test that starts skipping is a feature the new pair lacks; its reason decides whether
    # that matters (e.g. a CPU-build-only check skips on a CUDA build), so it is listed, not judged.
    os_, ns = (old.get("tests") or {}).get("skipped_ids"), (new.get("tests") or {}).get("skipped_ids")
    if os_ is not None and ns is not None:
        for tid in sorted(set(ns) - set(os_)):
            lines.append(f"newly skipped: {tid} ({ns[tid]})")
    oe, ne = old.get("errors", {}), new.get("errors", {})
    for key in sorted(set(oe) - set(ne)):
        lines.append(f"NEWLY MISSING: {key} (ran before, not now)")
        bad = True
    for key in sorted(set(ne) - set(oe)):
        lines.append(f"new coverage: {key}")
    for key in sorted(set(oe) & set(ne)):
        # Relative: the errors span 1e-7..1e-4 across configurations, and CPU float32
        # scatter-adds (d_pe_table) move by ~20 % from run to run on the same pair.
        change = abs(ne[key] - oe[key])
        if change > drift * max(oe[key], ne[key]) and change > DRIFT_FLOOR:
            grew = ne[key] > oe[key]
            lines.append(f"{'DRIFT UP' if grew else 'drift down'} {key}: {oe[key]:.3e} -> "
                         f"{ne[key]:.3e} (change > {drift:g} of the larger)")
            bad = bad or grew
    ot, nt = old.get("tests") or {}, new.get("tests") or {}
    lines.append(f"tests passed/failed/skipped: {ot.get('passed')}/{ot.get('failed')}/{ot.get('skipped')}"
                 f" -> {nt.get('passed')}/{nt.get('failed')}/{nt.get('skipped')}")
    lines.append(f"VERDICT: {'REGRESSION' if bad else 'OK to upgrade'}")
    print("\n".join(lines))
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compat.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pair", required=True)
    r.add_argument("--torch", required=True)
    r.add_argument("--triton", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--install-ok", type=int, default=1)
    r.add_argument("--build-arch", default="90",
                   help="CUDA arches (e.g. '90 80') to compile the Triton kernels for with "
                        "cluster.build_check; 'none' skips it (default %(default)s)")
    r.add_argument("--check-compile", default="auto", type=lambda v: v if v == "auto" else bool(int(v)),
                   help="compile csrc/ with nvcc: 1, 0, or auto (when torch is a CUDA build and nvcc exists)")
    t = sub.add_parser("table")
    t.add_argument("dir")
    d = sub.add_parser("diff")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--drift", type=float, default=0.5,
                   help="flag an error that changes by more than this fraction of the larger (default 0.5)")
    args, rest = p.parse_known_args(argv)
    if args.cmd == "run":
        return cmd_run(args, rest)
    if rest:
        p.error(f"unexpected arguments {rest}")
    if args.cmd == "table":
        return cmd_table(args.dir)
    return cmd_diff(args.old, args.new, args.drift)


if __name__ == "__main__":
    sys.exit(main())
