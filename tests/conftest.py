"""Suite-wide settings."""
import sys
from pathlib import Path

import torch

# Tiny models on a 2-core machine: intra-op threads only spin against each other (a
# 64-unit MLP step measured 89 ms with 2 threads under load vs 0.7 ms with 1).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypothesis import settings  # noqa: E402

# `pytest --hypothesis-profile=long`: the runtime state machines (tests/runtime_statesync.py)
# run this many examples per method instead of the CI default.
settings.register_profile("long", max_examples=400, deadline=None)
