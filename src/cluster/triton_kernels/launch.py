"""Where and how the triton backend's kernels run: version gates, the interpreter switch,
the launcher every kernel goes through, and :func:`unavailable_reason`.

* ``MIN_TRITON`` / ``_TRITON_RELEASE``: the oldest Triton the kernels compile on and the
  installed one, as (major, minor).
* ``_INTERPRET``: whether the kernels run on Triton's CPU interpreter. Triton reads
  ``TRITON_INTERPRET`` when a kernel is decorated, i.e. at import, and so does this flag;
  the host code reads it to pick block sizes and kernels the interpreter can afford.
* ``_Launch``: wraps each ``@triton.jit`` kernel and replays its compiled launcher once a
  specialization has been seen (the JIT's own launch path costs more host time than the
  compiled launch itself).

These flags live here only. Every other module of the package reads them as
``launch._INTERPRET`` / ``launch._TRITON_RELEASE`` inside its functions, never as
``from .launch import _INTERPRET``, so that one assignment here (a test's monkeypatch,
build_check's GPU-decision pass) switches every decision at once.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
from triton.runtime import driver as _driver

# Largest head dimension the backend takes (ops checks it before any launch).
MAX_HEAD_DIM = 256


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# The group kernels' tl.dot operands have a cluster's 8 rows. Triton takes fewer than 16
# rows on NVIDIA GPUs (and pads mma.sync itself) from 3.5 on; 3.4 and older refuse to
# compile them.
MIN_TRITON = (3, 5)
_TRITON_RELEASE = _release(triton.__version__)


# Triton releases whose JIT launch path _Launch reproduces and that a GPU has checked it on
# (the GPU suite sends every launch through it). Other releases take the JIT path.
_LAUNCH_TRITON = ((3, 6),)
# Keys kept per kernel. Each shape's strides and sizes are in its keys, so a workload whose
# shapes keep changing would grow the cache without end; past this many it starts over.
_LAUNCH_KEYS = 256


class _Launch:
    """A ``@triton.jit`` kernel, launched as one (``kernel[grid](*args, **options)``), that
    skips the JIT's per-launch work once its specialization has been compiled.

    Triton's JIT path binds every argument, derives the specialization (each pointer's
    dtype and 16-byte alignment, each integer's value class), formats the options into a
    string and looks the kernel up: more host time per launch than the compiled kernel's
    own launcher takes (figures: benchmarks/TUNING.md). A training step makes about seven
    launches, and at config_3_large the eager step's time is the host's.

    The key here is finer than the JIT's: each non-tensor argument by class and exact
    value, each tensor by dtype and by whether its address is a multiple of 16, the launch
    options, the device, and the two runtime knobs the JIT folds into its options. Two
    launches with one key thus have one JIT specialization, and the compiled kernel the
    JIT returned for the first runs the second, with the same arguments in the same order.
    A key not seen yet goes through the JIT, which compiles (or finds) and launches.
    The JIT path stays in use under the interpreter, on other Triton releases, while a
    launch hook or one of the kernel's pre-run hooks is set (profilers, instrumentation),
    for grids given as functions, and for kernels that read global variables (whose values
    the JIT checks at every launch).
    """

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters
        self.names = tuple(params)
        self.param_set = frozenset(params)
        self.defaults = tuple(p.default for p in params.values())
        self.kernels: dict = {}
        self.enabled = not _INTERPRET and _TRITON_RELEASE in _LAUNCH_TRITON

    def __getattr__(self, name):
        if name == "fn":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **options: self.run(grid, args, options)

    def run(self, grid, args, options):
        runtime = triton.knobs.runtime
        if (not self.enabled or callable(grid) or _hooked(runtime.launch_enter_hook)
                or _hooked(runtime.launch_exit_hook) or getattr(self.fn, "pre_run_hooks", None)):
            return self.fn[grid](*args, **options)
        names, defaults = self.names, self.defaults
        full = list(args)
        for i in range(len(args), len(names)):
            full.append(options[names[i]] if names[i] in options else defaults[i])
        device = _driver.active.get_current_device()
        # One flat list, not a tuple of pairs from a generator: half the host time.
        key = [device, runtime.debug, getattr(triton.knobs.compilation, "instrumentation_mode",
                                              None)]
        for item in options.items():
            if item[0] not in self.param_set:
                key.append(item)
        for a in full:
            if isinstance(a, torch.Tensor):
                key.append(a.dtype)
                key.append(a.data_ptr() % 16 == 0)
            else:
                key.append(a.__class__)
                key.append(a)
        key = tuple(key)
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **options)
            if (kernel is not None and not hasattr(kernel, "result")
                    and not self.fn.used_global_vals):
                if len(self.kernels) >= _LAUNCH_KEYS:
                    self.kernels.clear()
                self.kernels[key] = kernel
            return kernel
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   _driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *full)
        return kernel


def _hooked(hook) -> bool:
    # Triton 3.6 keeps each launch hook as a chain of calls (empty: none); older releases
    # keep a callable or None.
    return bool(getattr(hook, "calls", hook))


def _interpreter_numpy_shim() -> None:
    """Let the interpreter run loops with runtime bounds under numpy >= 2.4.

    triton's interpreter (3.5 to 3.8 at least) turns a scalar tensor into a Python int with
    ``int(one_element_array)``, which numpy 2.4 refuses; every ``range(M)`` over a
    kernel argument then fails. Only the interpreter is touched, and only when numpy
    actually refuses the conversion.
    """
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    # Another triton layout, or already shimmed: leave the interpreter alone.
    if original is None or getattr(original, "_cluster_numpy_shim", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    # triton 3.6+ passes a patch scope that records attributes; 3.5 sets them directly.
    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._cluster_numpy_shim = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRET:
    _interpreter_numpy_shim()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    device = torch.device(device)
    if _TRITON_RELEASE < MIN_TRITON:
        return (f"the triton backend needs triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]} "
                f"(installed: {triton.__version__})")
    if dtype not in _DTYPES:
        return f"the triton backend does not support dtype {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRET:
        return None
    return (
        f"Triton needs a CUDA GPU, or TRITON_INTERPRET=1 set before import for the CPU "
        f"interpreter (device is {device})"
    )
