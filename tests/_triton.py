"""The preamble every test module of the triton backend shares.

Without a GPU the kernels run on Triton's CPU interpreter, which Triton reads when the
kernels are decorated: TRITON_INTERPRET is set here (as in conftest), before any test
module imports cluster.triton_kernels. ``PYTESTMARK`` skips a module where the backend
is unavailable (with the reason) and puts each test on this xdist worker's device
(conftest's ``device`` fixture makes its GPU the current one, so "cuda" means it).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster import ops  # noqa: E402

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
WHY = ops.backend_unavailable_reason("triton", DEV, torch.float32)
PYTESTMARK = [pytest.mark.skipif(WHY is not None, reason=f"triton backend unavailable: {WHY}"),
              pytest.mark.usefixtures("device")]
