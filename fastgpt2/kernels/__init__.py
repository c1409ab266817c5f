"""Triton kernels, one file per op: the @triton.jit kernel(s), a launcher and a *_ref reference.

Nothing is imported here on purpose: importing triton kernels decides between compiled and
interpreted mode (TRITON_INTERPRET), so the model imports these modules only when the triton
backend is asked for.
"""
