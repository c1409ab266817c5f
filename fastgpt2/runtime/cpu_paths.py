"""Which GEMM and lm_head path the torch backend runs on this CPU, per dtype: chosen from torch's
CPU capability and a one-time probe of oneDNN's packed op (``choose_cpu_path``), never assumed.
The measurements behind each choice are in ``TorchOps`` (runtime/ops.py) and the README."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..errors import BackendError
from ..kernels.contract import DTYPES


def _onednn_packing_available() -> bool:
    """oneDNN's prepacked linear (the ops torch's inductor uses on CPU) is in this torch build.
    Whether this CPU can run it for a dtype is ``_onednn_probe``'s answer."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))


def onednn_pack(w_nk: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked form of a [N, K] weight for _linear_pointwise, tuned for small M (8 rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(w_nk, 8)


@functools.cache
def _onednn_probe(dtype: torch.dtype) -> str | None:
    """Whether this CPU runs oneDNN's packed linear in `dtype`: None when it does, else why not.
    Packs a tiny weight and multiplies by it once per process and dtype (cached; tests clear it):
    on an AVX2-only CPU bf16 packing raises "bf16 path needs the cpu support avx_ne_convert or
    avx512bw, avx512vl and avx512dq", which the op's presence in the build does not tell."""
    if not _onednn_packing_available():
        return "oneDNN's packed linear is not in this torch build"
    try:
        w = torch.arange(96, dtype=torch.float32).remainder_(7).sub_(3).view(8, 12)  # [N, K], exact in bf16/fp16
        x = torch.ones(2, 12)
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), onednn_pack(w.to(dtype)), None, "none", [], "")
    except RuntimeError as exc:  # oneDNN / the op's own CPU check, e.g. the AVX2 bf16 message above
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not torch.equal(y.float(), (x @ w.t())):
        return "oneDNN's packed linear gave a wrong product"
    return None


def cpu_capability() -> str:
    """torch's CPU vector capability: "AVX512", "AVX2", "DEFAULT", ... (ATen's kernel dispatch)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpuid(name: str) -> bool:
    """One of torch.cpu's CPUID checks (``_is_avx2_supported``, ...); False where torch lacks it."""
    check = getattr(torch.cpu, name, None)
    return bool(check and check())


def _amx() -> bool:
    return _cpuid("_is_amx_tile_supported")


def cpu_features() -> tuple[str, ...]:
    """The vector extensions this CPU runs, as torch reads them from CPUID: ("AVX-512", "AVX512-BF16",
    "AMX"), ("AVX2",), ... Never /proc/cpuinfo's flags, which an emulated or virtual CPU can leave
    naming the host's (under ../shared/cpu/avx2 they list AVX-512 and AMX on an AVX2-only CPU)."""
    names = [name for name, check in (("AVX-512", "_is_avx512_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if _cpuid(check)]
    names += ["AMX"] * _amx()
    return tuple(names) or (("AVX2",) if _cpuid("_is_avx2_supported") else ())


# Private, for tests and measurements: force one CPU GEMM path (a CpuPath.gemm name: "onednn_packed",
# "addmm_nk" or "addmm") for every TorchOps on the CPU that packs its weights; the environment variable
# _FASTGPT2_CPU_PATH sets it at import (e.g. for `fastgpt2 bench`). Not an API.
_FORCE_CPU_PATH: str | None = os.environ.get("_FASTGPT2_CPU_PATH") or None

_GEMM_NAMES = {"onednn_packed": "oneDNN packed", "addmm_nk": "addmm on [N, K] weights", "addmm": "addmm"}


@dataclass(frozen=True)
class CpuPath:
    """Which GEMM and lm_head path the torch backend runs on this CPU for one dtype, chosen once, at
    construction (``TorchOps``), from the CPU's capability and ``_onednn_probe``. GEMMs (``gemm``):

    - "onednn_packed": every GEMM weight prepacked for oneDNN at construction, the packed form replacing
      the plain one (bf16 on AVX-512, fp32 on AVX-512 or AVX2)
    - "addmm_nk": addmm on weights stored [N, K] (a column-major [K, N] view), made once at construction:
      torch's own reduced-precision GEMV/GEMM kernels (bf16/fp16 where oneDNN is not used)
    - "addmm": plain addmm on the [K, N] (Conv1D) weights (fp32 where oneDNN cannot run; any dtype, forced)

    lm_head (``head``): "oneDNN y @ w^T" (oneDNN's matmul over the plain row-major [V, E] table, no
    packed copy, one row run as 2: fp32 where its GEMMs are oneDNN's), "w @ y^T" (a GEMV for one row over the [V, E] table;
    fp32 on addmm, bf16 with AMX) or "y @ w^T" (bf16 without AMX, fp16).
    """

    dtype: torch.dtype
    gemm: str  # "onednn_packed" | "addmm_nk" | "addmm"
    capability: str  # torch.backends.cpu.get_cpu_capability()
    amx: bool = False
    forced: bool = False  # set through the private switch, not chosen
    head: str = "w @ y^T"  # the lm_head's product: "oneDNN y @ w^T" | "w @ y^T" | "y @ w^T"

    @property
    def name(self) -> str:
        """e.g. "bf16: oneDNN packed (AVX512)", "bf16: addmm on [N, K] weights (AVX2)",
        "fp32: oneDNN packed (AVX512+AMX)", "fp32: MKL addmm (DEFAULT)"."""
        dtype = DTYPES.get(self.dtype, str(self.dtype).removeprefix("torch."))
        what = "MKL addmm" if self.gemm == "addmm" and self.dtype == torch.float32 else _GEMM_NAMES[self.gemm]
        isa = self.capability + ("+AMX" if self.amx and self.capability == "AVX512" else "")
        return f"{dtype}: {what} ({isa}{', forced' if self.forced else ''})"

    def __str__(self) -> str:
        return self.name


# the GEMM paths each dtype can take; the first is the one chosen where the CPU runs it (see choose_cpu_path)
_CPU_GEMMS = {torch.bfloat16: ("onednn_packed", "addmm_nk", "addmm"), torch.float32: ("onednn_packed", "addmm"),
              torch.float16: ("addmm_nk", "addmm")}
# the capabilities under which a dtype's "onednn_packed" is chosen (where its probe passes too)
_ONEDNN_CAPABILITIES = {torch.bfloat16: ("AVX512",), torch.float32: ("AVX512", "AVX2")}


def _cpu_head(dtype: torch.dtype, amx: bool, gemm: str) -> str:
    """The lm_head's product: for fp32 on oneDNN's GEMMs, oneDNN's matmul over the row-major table up
    to 64 rows, one row run as 2 (a product whose rows do not depend on the row count, with no copy of
    the table: MKL's w @ y^T over a column-major one gives rows other bits than its GEMV from 12 rows
    on under AVX-512, from 2 under AVX2, see TorchOps); w @ y^T for fp32 on addmm (the column-major table's GEMV) and
    bf16 on AMX (the Xeon's measurement); y @ w^T elsewhere
    (AMD EPYC AVX-512 bf16, GPT-2 small's head: 4.6 vs 7.1 ms at 1 row, 7.2 vs 9.2 at 8; under AVX2
    kernels equal at 1 and 8 rows, 3.8 vs 6.4 ms at 2)."""
    if dtype == torch.float32:
        return "oneDNN y @ w^T" if gemm == "onednn_packed" else "w @ y^T"
    return "w @ y^T" if dtype == torch.bfloat16 and amx else "y @ w^T"


def choose_cpu_path(dtype: torch.dtype, forced: str | None = None) -> CpuPath:
    """The CPU path for `dtype` (see TorchOps for the measurements behind it):

    | dtype | capability      | oneDNN probe | GEMM path     |
    |-------|-----------------|--------------|---------------|
    | bf16  | AVX512          | runs         | onednn_packed |
    | bf16  | AVX512          | fails        | addmm_nk      |
    | bf16  | AVX2, any other | (not asked)  | addmm_nk      |
    | fp32  | AVX512 or AVX2  | runs         | onednn_packed |
    | fp32  | AVX512 or AVX2  | fails        | addmm         |
    | fp32  | any other       | (not asked)  | addmm         |
    | fp16  | any             | (not asked)  | addmm_nk      |

    `forced` (the private switch) takes a GEMM path by name; one this dtype has no such path for, or
    one this CPU cannot run (the probe fails), is a BackendError naming the capability."""
    cap, amx = cpu_capability(), _amx()
    choices = _CPU_GEMMS.get(dtype, ("addmm",))
    if forced is not None:
        if forced not in choices:
            raise BackendError(f"CPU path {forced!r} does not exist for {dtype} (choose one of {choices})")
        why = _onednn_probe(dtype) if forced.startswith("onednn") else None
        if why is not None:
            raise BackendError(f"CPU path {forced!r} for {dtype} cannot run on this CPU (torch's CPU capability "
                               f"is {cap}): {why}")
        return CpuPath(dtype, forced, cap, amx, forced=True, head=_cpu_head(dtype, amx, forced))
    fast, fallback = choices[0], choices[1] if len(choices) > 1 else choices[0]
    if fast == "onednn_packed":
        ok = cap in _ONEDNN_CAPABILITIES[dtype] and _onednn_probe(dtype) is None
    else:
        ok = True
    gemm = fast if ok else fallback
    return CpuPath(dtype, gemm, cap, amx, head=_cpu_head(dtype, amx, gemm))


def cpu_path_for(dtype: torch.dtype, pack_weights: bool = True, forced: str | None = None) -> CpuPath:
    """The path a CPU ``TorchOps`` runs: ``choose_cpu_path`` (forced: the argument, else the private
    ``_FORCE_CPU_PATH``); pack_weights=False (a caller's live weights, never packed): plain addmm,
    nothing probed."""
    if not pack_weights:
        amx = _amx()
        return CpuPath(dtype, "addmm", cpu_capability(), amx, head=_cpu_head(dtype, amx, "addmm"))
    return choose_cpu_path(dtype, forced if forced is not None else _FORCE_CPU_PATH)
