"""Shared fixtures: device per xdist worker, backends present here, dtypes, configurations,
tolerances and a cache of float64 reference results.

Backends absent on this machine are skipped with the reason in the skip message. Inputs
are built fresh per test from fixed seeds (cluster.testing.make_inputs); only the float64
reference *results* are cached, keyed by everything that determines them, so no test
depends on another's state.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter, which triton reads when the
# kernels are decorated: set it before anything imports cluster.triton_kernels, so plain
# `pytest` behaves like the nox sessions whichever test file is imported first (the triton
# test modules' shared preamble is tests/_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster import ops, testing  # noqa: E402
from cluster.testing import CONFIGS, RAGGED_CONFIGS, TOLERANCES

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64"}


def pytest_addoption(parser):
    parser.addoption("--shard", default=None,
                     help="run only shard i of K of the collected tests, as i/K (1-based)")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard:
        i, k = testing.parse_shard(shard)
        keep, drop = testing.split_shard(items, i, k, key=lambda it: it.nodeid)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)


def _worker_index() -> int | None:
    wid = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist
    return int(wid[2:]) if wid and wid.startswith("gw") else None


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda:<worker % count> on GPU hosts (one GPU per xdist worker), else cpu."""
    dev = testing.worker_device(_worker_index(), torch.cuda.device_count()
                                if torch.cuda.is_available() else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


@pytest.fixture(scope="session", autouse=True)
def _report_device(request):
    # Printed into the run's log so a multi-GPU run shows which worker used which GPU.
    dev = testing.worker_device(_worker_index(), torch.cuda.device_count()
                                if torch.cuda.is_available() else 0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\n[cluster-tests] worker={os.environ.get('PYTEST_XDIST_WORKER', 'main')} "
          f"device={dev} name={name}", flush=True)


def require_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    why = ops.backend_unavailable_reason(name, device, dtype)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable for {dtype} on {device}: {why}")


def skip_slow_on_cpu(device, backend: str, cfg, lists: str) -> None:
    """Skip the shared lists' triton cases at config_3_large on the CPU: minutes of
    interpreter time for a path the group-kernel tests cover there; the GPU suite runs them."""
    if (device.type == "cpu" and backend == "triton" and lists != "aff"
            and cfg.name == "config_3_large"):
        pytest.skip("interpreter time: shared lists at config_3_large run on the GPU; the "
                    "group-kernel tests cover the shared path on the CPU")


@pytest.fixture
def group_kernels_on():
    """Every group and union kernel of the triton backend on, in every dtype: TUNING_GROUP has the
    backward ones off for float32 (and float64, which uses the float32 entries), and in the
    interpreter the forward too (its FMA path, TUNING_GROUP_FMA, is the GPU's float32
    default), so the tests of those kernels switch them on here."""
    from cluster.triton_kernels import tuning

    with tuning.override(TUNING_GROUP={key: warps or 2
                                       for key, warps in tuning.TUNING_GROUP.items()},
                         TUNING_UNION={key: warps or 1
                                       for key, warps in tuning.TUNING_UNION.items()}):
        yield


@pytest.fixture
def cuda(device) -> torch.device:
    """This worker's GPU with the CUDA extension loaded, else skip with the backend's reason."""
    require_backend("cuda", device, torch.float32)
    return device


@pytest.fixture(params=ops.BACKENDS)
def backend(request, device) -> str:
    """Each backend; the test skips (with the reason) where it cannot run."""
    require_backend(request.param, device, torch.float32)
    return request.param


@pytest.fixture(params=ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=CONFIGS, ids=lambda c: c.name)
def config(request) -> testing.Config:
    return request.param


@pytest.fixture(params=RAGGED_CONFIGS, ids=lambda c: c.name)
def ragged_config(request) -> testing.Config:
    return request.param


@pytest.fixture(scope="session")
def tolerances() -> dict:
    return dict(TOLERANCES)


@pytest.fixture
def fwd_tol(tolerances) -> float:
    return tolerances["forward"]


@pytest.fixture
def bwd_tol(tolerances) -> float:
    return tolerances["backward"]


@pytest.fixture
def loss_tol(tolerances) -> float:
    return tolerances["loss"]


@pytest.fixture(scope="session")
def reference_cache():
    """float64 reference outputs and gradients, memoised per input recipe (results only)."""
    store: dict = {}

    def get(cfg, seed, **recipe):
        key = (cfg, seed, tuple(sorted(recipe.items())))
        if key not in store:
            store[key] = testing.reference_result(cfg, seed=seed, **recipe)
        return store[key]

    return get
