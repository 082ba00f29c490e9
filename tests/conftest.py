import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors (tests/test_triton.py). The variable is
# read when a kernel is defined, so it must be set before torchlamb.kernels.triton_steps is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/reference.py is imported as a plain module by the tests beside it.
sys.path.insert(0, str(Path(__file__).parent))

# `make test` runs the default profile; HYPOTHESIS_PROFILE=soak searches much longer for rare failures.
settings.register_profile("default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
