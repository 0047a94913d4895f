"""cluster.keops_probe: KeOps is tried in a child process, its verdict cached; knn obeys it.

The child's code is swapped for one that crashes, fails or hangs, so these tests need
neither pykeops nor a compiler (``keops_installed`` is patched to True).
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import pytest
import torch

from cluster import keops_probe as kp
from cluster import neighbors as nbr

OK_CHILD = f"print({kp._MARK!r} + '{{\"ok\": true}}')"
SEGFAULT_CHILD = "import ctypes; ctypes.string_at(0)"
ABORT_CHILD = "import os; os.abort()"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A private cache folder, an empty memo before and after, pykeops 'installed', and a
    counter of child runs; ``probe.child(code)`` sets what the child runs."""
    monkeypatch.setenv("CLUSTER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CLUSTER_KEOPS_REPROBE", raising=False)
    monkeypatch.delenv("CLUSTER_KEOPS_PROBE_TIMEOUT", raising=False)
    monkeypatch.setattr(kp, "keops_installed", lambda: True)
    kp.clear_cache(disk=False)
    runs = []
    real = kp._run_child

    def counting(device, timeout):
        runs.append(device)
        return real(device, timeout)

    monkeypatch.setattr(kp, "_run_child", counting)

    class P:
        dir = tmp_path / "keops_probe"

        @staticmethod
        def child(code):
            monkeypatch.setattr(kp, "_CHILD_CODE", code)

        @staticmethod
        def files():
            return sorted(P.dir.glob("keops-*.json")) if P.dir.exists() else []

    P.runs = runs
    yield P
    kp.clear_cache(disk=False)  # no fake verdict outlives the test


@pytest.mark.parametrize("code,sig", [(SEGFAULT_CHILD, "SIGSEGV"), (ABORT_CHILD, "SIGABRT")])
def test_crashing_child_gives_crashed_verdict(probe, code, sig):
    probe.child(code)
    res = kp.probe_keops("cpu")
    # Still here: the crash happened in the child.
    assert res.ok is False and res.status == "crashed" and res.source == "probe"
    assert sig in res.reason and probe.runs == ["cpu"]
    if sig == "SIGSEGV":
        assert "Segmentation fault" in res.reason  # faulthandler's report, from the child
    stored = json.loads(probe.files()[0].read_text())
    assert stored["status"] == "crashed" and stored["key"] == kp.probe_key("cpu")


def test_failing_child_gives_failed_verdict_with_reason(probe):
    probe.child("raise ImportError('libnvrtc.so.13 not found')")
    res = kp.probe_keops("cpu")
    assert res.status == "failed" and "ImportError: libnvrtc.so.13 not found" in res.reason
    probe.child(f"print({kp._MARK!r} + '{{\"ok\": false, \"got\": [1]}}')")
    res = kp.probe_keops("cpu", refresh=True)
    assert res.status == "failed" and "wrong answer" in res.reason


def test_ok_child_and_the_cache(probe, monkeypatch):
    probe.child(OK_CHILD)
    first = kp.probe_keops("cpu")
    assert first.ok and first.status == "ok" and first.source == "probe" and probe.runs == ["cpu"]
    # Memo: no second child.
    again = kp.probe_keops("cpu")
    assert again.ok and again.source == "memo" and len(probe.runs) == 1
    # A new process (memo forgotten) reads the stored verdict.
    kp.clear_cache(disk=False)
    disk = kp.probe_keops("cpu")
    assert disk.ok and disk.source == "disk" and len(probe.runs) == 1
    # Another key (a different torch, say): probed anew, stored beside the first.
    real_key = kp.probe_key
    monkeypatch.setattr(kp, "probe_key", lambda d: {**real_key(d), "torch": "9.9.9"})
    other = kp.probe_keops("cpu")
    assert other.source == "probe" and len(probe.runs) == 2 and len(probe.files()) == 2


def test_reprobe_switches(probe, monkeypatch):
    probe.child(SEGFAULT_CHILD)
    assert kp.probe_keops("cpu").status == "crashed"
    probe.child(OK_CHILD)  # "KeOps got fixed"
    kp.clear_cache(disk=False)
    assert kp.probe_keops("cpu").status == "crashed"  # the stored verdict stands ...
    # ... until a re-probe: the environment variable (once per process, then memo) ...
    kp.clear_cache(disk=False)
    monkeypatch.setenv("CLUSTER_KEOPS_REPROBE", "1")
    res = kp.probe_keops("cpu")
    assert res.ok and res.source == "probe" and len(probe.runs) == 2
    assert kp.probe_keops("cpu").source == "memo" and len(probe.runs) == 2
    monkeypatch.delenv("CLUSTER_KEOPS_REPROBE")
    kp.clear_cache(disk=False)
    assert kp.probe_keops("cpu").source == "disk"  # the new verdict was stored
    # ... refresh=True ...
    probe.child(ABORT_CHILD)
    assert kp.probe_keops("cpu", refresh=True).status == "crashed" and len(probe.runs) == 3
    # ... and clear_cache(), which also deletes the files.
    kp.clear_cache()
    assert probe.files() == []
    probe.child(OK_CHILD)
    assert kp.probe_keops("cpu").source == "probe" and len(probe.runs) == 4


def test_unreadable_cache_file_means_probe_again(probe):
    probe.child(OK_CHILD)
    kp.probe_keops("cpu")
    probe.files()[0].write_text("{not json")
    kp.clear_cache(disk=False)
    assert kp.probe_keops("cpu").source == "probe" and len(probe.runs) == 2


def test_timeout_kills_the_child_and_its_children_and_is_not_stored(probe, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    probe.child("import subprocess, sys, time\n"
                "p = subprocess.Popen(['sleep', '60'])\n"
                f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                "time.sleep(60)\n")
    t0 = time.monotonic()
    res = kp.probe_keops("cpu", timeout=3)
    assert time.monotonic() - t0 < 30
    assert res.status == "timeout" and not res.ok and "3 s" in res.reason
    assert probe.files() == []  # a timeout may pass: memoised only
    assert kp.probe_keops("cpu").source == "memo"
    pid = int(pid_file.read_text())
    # The compiler-like grandchild went with the child's process group (dead or a zombie).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)  # ours: clean up before failing
        pytest.fail("the probe's grandchild outlived the timeout")


def test_not_installed_spawns_nothing(probe, monkeypatch):
    monkeypatch.setattr(kp, "keops_installed", lambda: False)
    res = kp.probe_keops("cpu")
    assert res.status == "not-installed" and not res.ok and probe.runs == []
    x = torch.rand(1, 5, 2)
    with pytest.raises(ImportError, match="pip install pykeops"):
        nbr.knn(x, x, 2, method="keops")
    assert probe.runs == []


def test_auto_falls_back_to_torch_with_one_warning(probe):
    probe.child(SEGFAULT_CHILD)
    with pytest.warns(kp.KeOpsFallbackWarning, match="crashed.*CLUSTER_KEOPS_REPROBE"):
        assert nbr._keops_usable(torch.device("cpu")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning, no child
        assert nbr._keops_usable(torch.device("cpu")) is False
    assert len(probe.runs) == 1
    # clear_cache resets the once-only warning too.
    kp.clear_cache(disk=False)
    with pytest.warns(kp.KeOpsFallbackWarning):
        nbr._keops_usable(torch.device("cpu"))


def test_auto_on_cpu_never_probes(probe):
    probe.child(SEGFAULT_CHILD)
    x = torch.rand(2, 30, 2)
    assert torch.equal(nbr.knn(x, x, 3, method="auto"), nbr.knn(x, x, 3, method="torch"))
    assert probe.runs == []


def test_explicit_keops_with_failed_verdict_raises_and_never_calls_keops(probe, monkeypatch):
    def must_not_run(*a):
        raise AssertionError("KeOps called despite a crashing verdict")

    monkeypatch.setattr(nbr, "_knn_keops", must_not_run)
    probe.child(SEGFAULT_CHILD)
    x = torch.rand(1, 5, 2)
    with pytest.raises(RuntimeError, match=r"unusable.*crashed.*SIGSEGV.*CLUSTER_KEOPS_REPROBE"):
        nbr.knn(x, x, 2, method="keops")
    with pytest.raises(RuntimeError, match="crashed"):
        nbr.build_neighborhoods(nbr.make_synthetic_positions(1, 64, 8, 8), 8, 32, 8, 8,
                                knn_method="keops")
    assert len(probe.runs) == 1


def test_explicit_keops_with_ok_verdict_calls_keops(probe, monkeypatch):
    calls = []
    monkeypatch.setattr(nbr, "_knn_keops", lambda *a: calls.append(a) or "keops result")
    probe.child(OK_CHILD)
    x = torch.rand(1, 5, 2)
    assert nbr.knn(x, x, 2, method="keops") == "keops result" and len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_obeys_the_verdict(probe):
    probe.child(SEGFAULT_CHILD)
    x = torch.rand(2, 40, 2, device="cuda") * 9
    with pytest.warns(kp.KeOpsFallbackWarning):
        got = nbr.knn(x, x, 4, method="auto")
    assert torch.equal(got, nbr.knn(x, x, 4, method="torch"))
    assert probe.runs == ["cuda:" + str(torch.cuda.current_device())]
    assert kp.probe_key("cuda")["gpu"] == torch.cuda.get_device_name()

