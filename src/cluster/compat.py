"""Version-compatibility reports: one JSON per (torch, triton) pair, a combined table, a diff.

Run as a script path (``python src/cluster/compat.py ...``), not as ``-m cluster.compat``:
the `table` and `diff` commands, and `run` for a pair whose install failed, must work with
an interpreter that has no torch, so this file imports nothing of the package at the top.

    run   --pair P --torch X --triton Y --out F.json [--install-ok 0|1] [--install-seconds S]
          [--build-arch '90 80'] [--build-full 0|1] [pytest args]
    table DIR [--base PAIR]         -> DIR/README.md from every DIR/*.json; with a base pair
                                       also the upgrade verdicts, DIR/upgrade-{torch,triton}.txt
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
from cluster import cuda_build, ops
info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "nvcc": cuda_build.find_nvcc()}
try:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["extension"] = ops.backend_unavailable_reason("cuda", dev, torch.float32) or "available"
except Exception as exc:
    info["extension"] = f"{type(exc).__name__}: {exc}"[-300:]
print(json.dumps(info))
"""


def _build_check(arches: list[str], full: bool = False) -> dict:
    """Every Triton kernel launch compiled for the CUDA ``arches`` by this pair's Triton,
    through ``cluster.build_check`` (no GPU needed). The suite's CPU run goes through the
    interpreter, which compiles nothing, so a Triton release whose compiler rejects a
    kernel would otherwise pass here."""
    cp = subprocess.run([sys.executable, "-m", "cluster.build_check", "--arch", *arches,
                         *(["--full"] if full else [])], capture_output=True, text=True)
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
           "failing": sorted(failing), "stage": "cubin" if full else "front end",
           "notes": [line[len("build_check: "):] for line in out
                     if line.startswith("build_check: _")]}
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
           "install_ok": bool(a.install_ok), "install_seconds": a.install_seconds,
           "import_ok": False, "extension": "not checked",
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
        rep["build"] = _build_check(arches, bool(a.build_full))
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


def _version(v: str) -> tuple:
    """'2.15.0' or '2.13.0+cpu' -> (2, 15, 0), for ordering releases."""
    return tuple(int(x) for x in v.split("+")[0].split(".") if x.isdigit())


def _reports(d: str) -> dict:
    reps = {}
    for p in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        reps[r["pair"]] = r
    return reps


def upgrades(reps: dict, base: str) -> dict:
    """{"torch": pair, "triton": pair}: the upgrades a maintainer on ``base`` weighs. The
    newest torch (with the newest triton it was run with), and the newest triton beside
    base's torch (or beside any torch, if base's torch was never run with it)."""
    if base not in reps:
        return {}
    order = sorted(reps.values(), key=lambda r: (_version(r["torch_requested"]),
                                                  _version(r["triton_requested"])))
    out = {"torch": order[-1]["pair"]}
    newest_triton = max(_version(r["triton_requested"]) for r in order)
    same_torch = [r for r in order if r["torch_requested"] == reps[base]["torch_requested"]
                  and _version(r["triton_requested"]) == newest_triton]
    out["triton"] = (same_torch or [max(order, key=lambda r: _version(r["triton_requested"]))])[-1]["pair"]
    return out


README_BEGIN, README_END = "<!-- compat-verdicts: written by compat.py table -->", "<!-- /compat-verdicts -->"


def _write_readme_block(readme: str, block: list[str]) -> None:
    """Replace the text between README_BEGIN and README_END in ``readme`` with ``block``."""
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    _old, tail = rest.split(README_END, 1)
    with open(readme, "w") as f:
        f.write(head + README_BEGIN + "\n" + "\n".join(block) + "\n" + README_END + tail)


def cmd_table(d: str, base: str | None = None, readme: str | None = None) -> int:
    rows = []
    reps = _reports(d)
    for r in reps.values():
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
            f"{_install_time(r)} | {r.get('commit', '-')} | {'PASS' if r.get('ok') else '**FAIL**'} |")
    md = ["# torch x triton compatibility", "",
          "Written by `nox -s compat` (one row per pair; JSON beside this file). Tests: "
          "passed / failed / skipped. Kernels build: every Triton kernel launch compiled "
          "by the pair's Triton for the CUDA arch (`python -m cluster.build_check`; the CPU "
          "suite runs the interpreter, which compiles nothing). "
          "Validate: verdict of `cluster.validate` on the suite "
          "configurations. Worst fp32 error: largest max-abs error (output or any gradient) of "
          "any float32 backend x configuration against the float64 reference; every error, "
          "float16/bfloat16 included, is in the JSON. Time: the checks; install: pip's time "
          "for the pair (downloads included). Commit: the tree the row was run on.", "",
          "| pair | torch | triton | installs | imports | CUDA extension | kernels build | tests "
          "| validate | worst fp32 error | time | install | commit | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    ups = upgrades(reps, base) if base else {}
    if ups:
        md += ["## Upgrade verdicts", "",
               f"From CI's pair `{base}` (`nox -s compat-diff`; the whole diff beside this file):", "",
               "| upgrade | to | verdict | diff |", "|---|---|---|---|"]
        block = ["| upgrade from CI's pair | to | verdict |", "|---|---|---|"]
        for what, pair in ups.items():
            lines, bad = diff_lines(reps[base], reps[pair])
            name = f"upgrade-{what}.txt"
            with open(os.path.join(d, name), "w") as f:
                f.write("\n".join(lines) + "\n")
            stale = reps[base].get("commit") != reps[pair].get("commit")
            md.append(f"| newest {what} | {pair} | {'**REGRESSION**' if bad else 'OK to upgrade'}"
                      f"{' (rows from different commits)' if stale else ''} | [{name}]({name}) |")
            block.append(f"| newest {what} | {pair} | {'REGRESSION' if bad else 'OK to upgrade'}"
                         f"{' (rows from different commits)' if stale else ''} |")
        md.append("")
        if readme:
            _write_readme_block(readme, block)
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


DRIFT_FLOOR = 1e-7  # error changes below this are float32 rounding noise whatever the ratio


def _install_time(r: dict) -> str:
    s = r.get("install_seconds")
    return "-" if s is None else f"{s:.0f} s"


def cmd_diff(old_p: str, new_p: str, drift: float = 0.5) -> int:
    with open(old_p) as f:
        old = json.load(f)
    with open(new_p) as f:
        new = json.load(f)
    lines, bad = diff_lines(old, new, drift)
    print("\n".join(lines))
    return 1 if bad else 0


def diff_lines(old: dict, new: dict, drift: float = 0.5) -> tuple[list[str], bool]:
    """The diff of two pair reports, line by line, and whether NEW regressed."""
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
    return lines, bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compat.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pair", required=True)
    r.add_argument("--torch", required=True)
    r.add_argument("--triton", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--install-ok", type=int, default=1)
    r.add_argument("--install-seconds", type=float, default=None,
                   help="how long the pair's install took, for the table")
    r.add_argument("--build-full", type=int, default=0,
                   help="1: build_check goes on to cubins (ptxas), 0: the front end only")
    r.add_argument("--build-arch", default="90",
                   help="CUDA arches (e.g. '90 80') to compile the Triton kernels for with "
                        "cluster.build_check; 'none' skips it (default %(default)s)")
    r.add_argument("--check-compile", default="auto", type=lambda v: v if v == "auto" else bool(int(v)),
                   help="compile csrc/ with nvcc: 1, 0, or auto (when torch is a CUDA build and nvcc exists)")
    t = sub.add_parser("table")
    t.add_argument("dir")
    t.add_argument("--base", help="the pair upgrades start from (CI's), for the upgrade verdicts")
    t.add_argument("--readme", help="also write the verdicts into this file's compat-verdicts block")
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
        return cmd_table(args.dir, args.base, args.readme)
    return cmd_diff(args.old, args.new, args.drift)


if __name__ == "__main__":
    sys.exit(main())
