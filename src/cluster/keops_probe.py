"""Crash-safe check that PyKeOps works on this machine, for ``cluster.neighbors.knn``.

PyKeOps compiles each formula at its first use (NVRTC for CUDA, g++ for the CPU). Where that
compile crashes, it takes the calling process with it: PyKeOps 2.3 under CUDA 13 (torch
2.11+cu130 on an H200) segfaults in keopscore's NVRTC code generation, and no ``try`` can
catch a segfault. So nothing here calls KeOps in-process. ``probe_keops`` runs a tiny
``argKmin`` (4 points, k = 2) in a *child* Python process, with a timeout, and caches the
verdict.

Verdicts (``ProbeResult.status``): ``"ok"`` (the child computed the right answer), ``"crashed"``
(killed by a signal: segfault, abort), ``"failed"`` (a Python exception or a wrong answer:
the reason holds its last line), ``"timeout"``, ``"error"`` (no child could be started) and
``"not-installed"`` (pykeops not importable here; no child is started for that).

Cache. Key: the device type ("cuda" or "cpu"), host name, machine architecture, Python
version, torch version, torch's CUDA version, the CUDA driver version and GPU name and
compute capability (CUDA only), the pykeops and keopscore versions, and ``CUDA_HOME`` /
``CUDA_PATH``. Change any of them and the next call probes again.

* in-process memo: one probe per key per process;
* on disk: one JSON file per key in ``$CLUSTER_CACHE_DIR/keops_probe/`` if that variable is
  set, else ``$XDG_CACHE_HOME/cluster-attention/keops_probe/``, else
  ``~/.cache/cluster-attention/keops_probe/`` (``cache_dir()``). Verdicts ``ok``, ``crashed``
  and ``failed`` are stored; ``timeout`` and ``error`` may be passing troubles (a loaded
  machine, a slow first compile), so they are memoised in-process only. An unwritable
  cache folder only costs a probe per process.

Re-probing (after installing a compiler, a new driver, a fixed KeOps ...):

* ``CLUSTER_KEOPS_REPROBE=1`` in the environment: every process ignores the stored verdict,
  probes once and stores the new one;
* ``probe_keops(device, refresh=True)``: probe again now (this process, this key);
* ``clear_cache()``: forget the memo (and the once-only warnings) and delete the stored
  verdicts; or delete the folder by hand.

``CLUSTER_KEOPS_PROBE_TIMEOUT`` (seconds, default 240) bounds the child; its first run on a
machine compiles KeOps' binder and one formula, which takes from seconds to a minute or so.
A timed-out child is killed with its whole process group (the compilers it started too).

PyKeOps picks its backend from whether it found CUDA, not from where the tensors are: with
a GPU present it runs even CPU tensors through NVRTC. ``keops_argkmin`` (used by the kNN and
by the child) therefore asks for ``backend="CPU"`` for CPU tensors, so a CPU verdict is about
KeOps' CPU (g++) path and a CUDA verdict about its NVRTC path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = [
    "KeOpsFallbackWarning",
    "ProbeResult",
    "cache_dir",
    "clear_cache",
    "keops_installed",
    "probe_keops",
]

_FORMAT = 1  # version of the stored file's layout
_DEFAULT_TIMEOUT_S = 240.0
_PERSISTED = ("ok", "crashed", "failed")
_MARK = "CLUSTER_KEOPS_PROBE_RESULT "
REPROBE_HINT = ("re-probe with CLUSTER_KEOPS_REPROBE=1, cluster.keops_probe.probe_keops(device, "
                "refresh=True) or cluster.keops_probe.clear_cache()")


class KeOpsFallbackWarning(RuntimeWarning):
    """``knn(method="auto")`` found pykeops installed but unusable and used torch instead."""


@dataclass(frozen=True)
class ProbeResult:
    """One verdict of ``probe_keops``; ``source`` says where it came from this time."""

    ok: bool
    status: str  # ok | crashed | failed | timeout | error | not-installed
    reason: str
    key: dict = field(compare=False)
    source: str = "probe"  # probe | memo | disk | none (not installed: nothing to probe)
    seconds: float = 0.0  # the child's wall time, when this call ran it

    def describe(self) -> str:
        return f"KeOps probe on {self.key.get('device', '?')}: {self.status} ({self.reason})"


# In-process memo (hash of the key -> verdict) and the keys already warned about; both are
# reset by clear_cache().
_MEMO: dict[str, ProbeResult] = {}
_WARNED: set[str] = set()

# What the child runs: it loads this very file (not the cluster package, whose imports
# have nothing to do with KeOps) and calls _child_main. A test swaps it for a crashing one.
_CHILD_CODE = r"""
import importlib.util, json, sys
sys.path[:] = json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("_cluster_keops_probe_child", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
mod._child_main(sys.argv[1])
"""


# --------------------------------------------------------------------------- shared formula

def keops_argkmin(q: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """KeOps' ``argKmin`` of squared distances, ``[B, Q, k]`` int64 (order among ties
    unspecified). ``q`` ``[B, Q, 2]``, ``p`` ``[B, P, 2]``, float32, contiguous.
    Imports pykeops: call it only where the probe said ``ok`` (or in the probe's child)."""
    from pykeops.torch import LazyTensor

    x_i = LazyTensor(q[:, :, None, :])
    y_j = LazyTensor(p[:, None, :, :])
    d = ((x_i - y_j) ** 2).sum(-1)
    kw = {"backend": "CPU"} if q.device.type == "cpu" else {}
    return d.argKmin(k, dim=2, **kw).long()  # batch dim 0, i dim 1, j dim 2


def _child_main(device: str) -> None:
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]]], device=device)
    got = keops_argkmin(x, x, 2).cpu().tolist()
    want = [[[0, 1], [1, 0], [2, 1], [3, 2]]]
    print(_MARK + json.dumps({"ok": got == want, "got": got}), flush=True)


# --------------------------------------------------------------------------- key and cache

def keops_installed() -> bool:
    """Whether ``import pykeops`` would find a package (without importing it)."""
    try:
        return importlib.util.find_spec("pykeops") is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def probe_key(device) -> dict:
    """What the verdict depends on (see the module docstring)."""
    dev = _device(device)
    key = {
        "device": dev.type,
        "host": platform.node(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "pykeops": _version("pykeops"),
        "keopscore": _version("keopscore"),
        "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        key["gpu"] = props.name
        key["capability"] = f"{props.major}.{props.minor}"
        try:
            key["driver"] = torch._C._cuda_getDriverVersion()
        except Exception:  # private API: absent in some builds
            key["driver"] = None
    return key


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """Folder of the stored verdicts (see the module docstring)."""
    root = os.environ.get("CLUSTER_CACHE_DIR")
    if root:
        return Path(root) / "keops_probe"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cluster-attention" / "keops_probe"


def _cache_file(h: str) -> Path:
    return cache_dir() / f"keops-{h}.json"


def _load(h: str, key: dict) -> ProbeResult | None:
    try:
        data = json.loads(_cache_file(h).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("key") != key
            or data.get("status") not in _PERSISTED):
        return None
    return ProbeResult(ok=data["status"] == "ok", status=data["status"],
                       reason=str(data.get("reason", "")), key=key, source="disk")


def _store(h: str, res: ProbeResult) -> None:
    if res.status not in _PERSISTED:
        return
    data = {"format": _FORMAT, "key": res.key, "status": res.status, "reason": res.reason,
            "seconds": round(res.seconds, 2),
            "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader sees the old file or the new, not half.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keops-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, _cache_file(h))
    except OSError:
        pass  # no writable cache: the memo still holds it for this process


def clear_cache(*, disk: bool = True) -> None:
    """Forget every verdict: the in-process memo, the once-only warnings and (``disk``) the
    stored files in ``cache_dir()``."""
    _MEMO.clear()
    _WARNED.clear()
    if disk:
        for f in cache_dir().glob("keops-*.json"):
            try:
                f.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------- the probe

def _timeout_s() -> float:
    try:
        return float(os.environ.get("CLUSTER_KEOPS_PROBE_TIMEOUT", _DEFAULT_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_TIMEOUT_S


def _run_child(device: str, timeout: float) -> tuple[int | None, str, str]:
    """Run the child; ``(returncode, stdout, stderr)``, returncode None on timeout."""
    # -X faulthandler: a segfault prints where it happened, for the verdict's reason.
    cmd = [sys.executable, "-X", "faulthandler", "-c", _CHILD_CODE, device, str(Path(__file__).resolve()),
           json.dumps(list(sys.path))]
    # Own process group, so a timeout also ends the compilers the child started.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def _tail(text: str, lines: int = 3, chars: int = 400) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-chars:]


def _crash_summary(err: str) -> str:
    """faulthandler's 'Fatal Python error' line and the innermost two frames (it prints the
    most recent call first); else the last lines of stderr."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("Fatal Python error")]
    if not fatal:
        return _tail(err)
    frames = [ln for ln in lines[lines.index(fatal[0]):] if ln.startswith("File ")][:2]
    return " | ".join(fatal[:1] + frames)[:600]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _verdict(rc: int | None, out: str, err: str, timeout: float) -> tuple[str, str]:
    if rc is None:
        return "timeout", f"no answer within {timeout:g} s (CLUSTER_KEOPS_PROBE_TIMEOUT)"
    if rc < 0:
        why = f"the child was killed by {_signal_name(-rc)}"
        where = _crash_summary(err)
        return "crashed", why + (f"; {where}" if where else "")
    if rc != 0:
        return "failed", f"exit status {rc}: {_tail(err, 1) or 'no stderr'}"
    for line in reversed(out.splitlines()):
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK):])
            if data.get("ok"):
                return "ok", "a test argKmin in a child process gave the right answer"
            return "failed", f"wrong answer from a test argKmin: {data.get('got')}"
    return "failed", "the child exited without an answer"


def probe_keops(device="cuda", *, refresh: bool = False,
                timeout: float | None = None) -> ProbeResult:
    """Whether PyKeOps runs on ``device``'s type here, decided in a child process.

    Cached per key (module docstring): memo, then the stored file (skipped when
    ``CLUSTER_KEOPS_REPROBE=1``), then a new child run. ``refresh=True`` always runs the
    child. Never raises for a broken KeOps; the verdict says what happened.
    """
    dev = _device(device)
    if not keops_installed():
        return ProbeResult(False, "not-installed", "pykeops is not importable here",
                           key={"device": dev.type}, source="none")
    key = probe_key(dev)
    h = _key_hash(key)
    if not refresh:
        if h in _MEMO:
            return replace(_MEMO[h], source="memo", seconds=0.0)
        if os.environ.get("CLUSTER_KEOPS_REPROBE", "") not in ("1", "true", "yes"):
            res = _load(h, key)
            if res is not None:
                _MEMO[h] = res
                return res
    timeout = _timeout_s() if timeout is None else float(timeout)
    t0 = time.perf_counter()
    try:
        rc, out, err = _run_child(str(dev), timeout)
        status, reason = _verdict(rc, out, err, timeout)
    except (OSError, ValueError) as e:
        status, reason = "error", f"could not run the probe's child process: {e}"
    res = ProbeResult(status == "ok", status, reason, key=key, source="probe",
                      seconds=time.perf_counter() - t0)
    _MEMO[h] = res
    _store(h, res)
    return res


def warn_fallback(res: ProbeResult) -> None:
    """Warn (``KeOpsFallbackWarning``) that ``knn(method="auto")`` uses torch because of
    ``res``; once per process and key (``clear_cache`` resets it)."""
    h = _key_hash(res.key)
    if h in _WARNED:
        return
    _WARNED.add(h)
    warnings.warn(f"knn(method='auto'): pykeops is installed but unusable, using the torch "
                  f"kNN. {res.describe()}; {REPROBE_HINT}", KeOpsFallbackWarning, stacklevel=4)
