"""Test-wide set-up. Without CUDA, Triton kernels run in Triton's interpreter: the switch must be
set before anything imports triton, so it lives here, ahead of every test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
