"""The one place that decides the arithmetic precision of a model run.

``resolve_precision(device, precision)`` turns a user's choice (``"auto"``, ``"bf16"``,
``"fp16"``, ``"fp32"``) into what actually runs on ``device``. The engine resolves it once per
run and :meth:`HistoLensModel.predict_tiles` runs what it is given (``"auto"`` there resolves
through the same function), so the two can never disagree. Torch is imported only for CUDA.
"""

from __future__ import annotations

__all__ = ["cpu_has_native_bf16", "resolve_precision"]

#: Precisions a run can be asked for; "auto" resolves to one of the other three.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX or AVX-512 BF16).

    Elsewhere bf16 is emulated: an AVX2-only EPYC ran a bf16 convolution 137x slower than fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:  # not Linux: no way to tell, fp32 is the safe choice
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(device: str, precision: str = "auto") -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for ``device`` (``"cpu"``, ``"cuda:0"``, ``"mps"``).

    ``"auto"`` picks mixed precision where the hardware runs it natively: bf16 on CUDA GPUs
    that support it (else fp16), fp16 on Apple MPS, bf16 on CPUs with AMX/AVX-512 BF16, fp32
    on other CPUs. An explicit choice is kept as given.
    """
    p = str(precision).lower()
    if p not in PRECISIONS:
        msg = f"precision {precision!r} is not one of {', '.join(map(repr, PRECISIONS))}"
        raise ValueError(msg)
    if p != "auto":
        return p
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "mps":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"
