"""The Triton backend's launcher (cluster.triton_kernels.launch._Launch).

It replays a compiled kernel without Triton's JIT path once a launch's key has been
seen. Its key must separate every pair of launches the JIT would specialise differently,
and a replay must hand the launcher the arguments the JIT would. The CPU tests drive it
with a stand-in JIT function; on a GPU the real kernels' replays are compared with the
JIT path's results bit for bit.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from cluster import ops
from cluster.testing import random_case

from .. import _triton

_DEV, _WHY = _triton.DEV, _triton.WHY
pytestmark = _triton.PYTESTMARK

if _WHY is None:
    import triton

    from cluster import triton_kernels as tk
    from cluster.triton_kernels import forward, gluon_forward
    from cluster.triton_kernels import launch as tk_launch  # ("launch" is the fixture below)


def _kernel(X, Y, n, scale, FLAG, BLOCK=16):  # the stand-in's signature
    pass


class _Compiled:
    """What the JIT returns: a launcher (``run``), the loaded function and its metadata."""

    def __init__(self, log):
        self.function, self.packed_metadata, self.log = object(), object(), log

    @property
    def run(self):
        return lambda *a: self.log.append(("replay", a))


class _Jit:
    def __init__(self):
        self.fn = _kernel
        self.used_global_vals = {}
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.log.append(("jit", grid, args, options))
            return _Compiled(self.log)
        return launch


class _Driver:
    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 1234


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setattr(tk_launch, "_driver", _Driver)
    fn = _Jit()
    wrapped = tk_launch._Launch(fn)
    wrapped.enabled = True
    return wrapped, fn.log


def _kinds(log):
    return [entry[0] for entry in log]


def test_second_launch_replays_with_the_jits_arguments(launch):
    wrapped, log = launch
    x, y = torch.zeros(8), torch.zeros(8)
    wrapped[(3, 2)](x, y, 32, 0.5, FLAG=True, num_warps=2)
    wrapped[(5,)](x, y, 32, 0.5, FLAG=True, num_warps=2)
    assert _kinds(log) == ["jit", "replay"]
    args = log[1][1]
    # grid padded to three, the stream, the function and metadata, no launch metadata or
    # hooks, then every parameter in order: the constexpr by name, the default, no option.
    assert args[:4] == (5, 1, 1, 1234)
    assert args[6:9] == (None, None, None)
    assert args[9:11] == (x, y) and args[11:] == (32, 0.5, True, 16)


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_value", "bool_for_int",
                                    "constexpr", "option", "float_value"])
def test_any_specialisation_change_goes_through_the_jit(launch, change):
    wrapped, log = launch
    x = torch.zeros(8)
    base = dict(args=(x, x, 32, 0.5), kw=dict(FLAG=True, num_warps=2))
    wrapped[(1,)](*base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "misaligned":
        args[1] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[1] = x.double()
    elif change == "int_value":
        args[2] = 33
    elif change == "bool_for_int":
        args[2] = True  # equal to 1 as a key, but the JIT types it i1
        wrapped[(1,)](*args[:2], 1, *args[3:], **kw)
        log.clear()
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "option":
        kw["num_warps"] = 4
    elif change == "float_value":
        args[3] = 0.25
    wrapped[(1,)](*args, **kw)
    assert _kinds(log)[-1] == "jit"
    wrapped[(1,)](*args, **kw)
    assert _kinds(log)[-1] == "replay"


def test_the_cache_stays_bounded(launch, monkeypatch):
    # Shapes that keep changing must not grow the cache without end.
    wrapped, log = launch
    monkeypatch.setattr(tk_launch, "_LAUNCH_KEYS", 4)
    x = torch.zeros(8)
    for n in range(10):
        wrapped[(1,)](x, x, n + 2, 1.0, FLAG=False)
        assert len(wrapped.kernels) <= 4
    wrapped[(1,)](x, x, 11, 1.0, FLAG=False)  # the latest key is still there
    assert _kinds(log) == ["jit"] * 10 + ["replay"]


def test_grid_functions_take_the_jit(launch):
    wrapped, log = launch
    x = torch.zeros(8)
    for _ in range(2):
        wrapped[lambda meta: (1,)](x, x, 1, 1.0, FLAG=False)
    assert _kinds(log) == ["jit", "jit"]


def test_kernels_reading_globals_always_take_the_jit(launch):
    wrapped, log = launch
    wrapped.fn.used_global_vals = {("G", 0): (1, {})}
    x = torch.zeros(8)
    for _ in range(3):
        wrapped[(1,)](x, x, 1, 1.0, FLAG=False)
    assert _kinds(log) == ["jit"] * 3


def test_a_launch_hook_sends_launches_through_the_jit(launch, monkeypatch):
    wrapped, log = launch
    x = torch.zeros(8)
    wrapped[(1,)](x, x, 1, 1.0, FLAG=False)
    monkeypatch.setattr(tk_launch, "_hooked", lambda hook: True)
    wrapped[(1,)](x, x, 1, 1.0, FLAG=False)
    assert _kinds(log) == ["jit", "jit"]


def test_a_pre_run_hook_sends_launches_through_the_jit(launch):
    # The JIT calls a kernel's pre-run hooks at every launch; a replay would skip them.
    wrapped, log = launch
    x = torch.zeros(8)
    wrapped[(1,)](x, x, 1, 1.0, FLAG=False)
    wrapped.fn.pre_run_hooks = [lambda *a, **k: None]
    wrapped[(1,)](x, x, 1, 1.0, FLAG=False)
    assert _kinds(log) == ["jit", "jit"]


def test_hook_detection():
    class Chain:
        def __init__(self, calls):
            self.calls = calls
    assert not tk_launch._hooked(None) and not tk_launch._hooked(Chain([]))
    assert tk_launch._hooked(Chain([print])) and tk_launch._hooked(print)


@pytest.mark.parametrize("release,interpret,on", [((3, 6), False, True), ((3, 8), False, False),
                                                  ((3, 5), False, False), ((3, 6), True, False)])
def test_replays_only_on_checked_releases(release, interpret, on, monkeypatch):
    monkeypatch.setattr(tk_launch, "_TRITON_RELEASE", release)
    monkeypatch.setattr(tk_launch, "_INTERPRET", interpret)
    assert tk_launch._Launch(_Jit()).enabled is on


def test_every_backend_kernel_goes_through_the_launcher():
    # Every module of the package (gluon_forward holds the raw Gluon kernel, which
    # forward wraps): each *_kernel is a _Launch, and tk.kernels() lists them all. The
    # Gluon kernel is None on a Triton it is not built for (gluon_forward.MIN/MAX_TRITON).
    kernels = {}
    for info in pkgutil.iter_modules(tk.__path__):
        if info.name == "gluon_forward":
            continue
        module = importlib.import_module(f"{tk.__name__}.{info.name}")
        kernels.update((name, obj) for name, obj in vars(module).items()
                       if name.endswith("_kernel")
                       and not (name == "_attn_fwd_gluon_kernel" and obj is None))
    assert kernels and all(isinstance(obj, tk_launch._Launch) for obj in kernels.values())
    assert kernels == tk.kernels()
    assert (forward._attn_fwd_gluon_kernel is None) == (
        not gluon_forward.MIN_TRITON <= tk_launch._TRITON_RELEASE <= gluon_forward.MAX_TRITON)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_replays_match_the_jit_path(dtype, deterministic, monkeypatch):
    launched = list(tk.kernels().values())
    if not launched[0].enabled:
        pytest.skip(f"triton {triton.__version__}: launches take the JIT path")
    leaves = ("q", "k", "v", "pe_table", "blank_k", "blank_v")

    def step(seed):
        c = random_case(2, 2, 40, 16, 16, seed=seed, device=_DEV, T=9, whole_clusters=True)
        for n in leaves:
            c[n] = c[n].to(dtype if n in ("q", "k", "v") else torch.float32).requires_grad_()
        out = ops.cluster_attention(**c, backend="triton", deterministic=deterministic)
        g = torch.Generator().manual_seed(seed)
        out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out))
        return [out.detach()] + [c[n].grad for n in leaves]

    step(1)
    before = {id(k): len(k.kernels) for k in launched}
    step(1)  # the same keys: every launch of this step is a replay
    assert any(k.kernels for k in launched)
    assert all(len(k.kernels) == before[id(k)] for k in launched)
    replayed = step(2)
    for k in launched:
        monkeypatch.setattr(k, "enabled", False)
    jit = step(2)
    # The forward, dq and the blank gradients never use atomics, and in the deterministic
    # mode nothing does: bitwise. The fast mode's dk, dv and d_pe_table add in the order
    # its atomics take.
    exact = ("out", "q", "blank_k", "blank_v") if not deterministic else ("out",) + leaves
    for name, a, b in zip(("out",) + leaves, replayed, jit):
        if name in exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)
