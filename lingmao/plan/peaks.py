"""Datasheet peak throughput of one GPU, by the name CUDA reports for it.

Dense figures (no 2:4 sparsity) in TFLOPS per device, from NVIDIA's product
datasheets and architecture whitepapers (Hopper H100/H200, Ampere A100 and
GA10x, Ada AD102/AD103/AD106, Turing, Volta V100, L4, L40/L40S, A10). GeForce
cards run 16-bit tensor math with fp32 accumulate (what autocast does) at half
their fp16-accumulate rate; those are the figures here. `None` where the
device has no such unit (bf16 and TF32 before Ampere): the plan never picks
that precision there. A device not in the table has no peak: the engine
measures a matmul instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    bf16: float | None  # bf16 tensor cores, fp32 accumulate
    fp16: float | None  # fp16 tensor cores, fp32 accumulate
    tf32: float | None  # fp32 matmuls on TF32 tensor cores
    fp32: float  # plain fp32 (CUDA cores)

    def for_precision(self, precision: str, tf32: bool = False) -> float | None:
        """Peak of the matmuls a run at `precision` does; fp32 with TF32 on uses the TF32 units."""
        if precision == "fp32":
            return self.tf32 if tf32 and self.tf32 else self.fp32
        return {"bf16": self.bf16, "fp16": self.fp16}[precision]


# Matched as whole words, in order: "H100 NVL" before "H100", "A10" does not
# match "A100" or "A10G", "L4" does not match "L40S". The datacenter cards'
# datasheets quote tensor figures with 2:4 sparsity: the dense ones are half.
PEAKS: tuple[tuple[str, Peak], ...] = (
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: BF16/FP16 1,671, TF32 835 (sparse), FP32 60 TFLOPS
    ("H200 NVL", Peak(835.5, 835.5, 417.5, 60.0)),
    # the same datasheet, H200 SXM: BF16/FP16 1,979, TF32 989 (sparse), FP32 67 TFLOPS: the H100 SXM5's chip
    ("H200", Peak(989.4, 989.4, 494.7, 66.9)),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL: BF16/FP16 1,671, TF32 835 (sparse), FP32 60
    ("H100 NVL", Peak(835.0, 835.0, 417.5, 60.0)),
    # the same datasheet, H100 PCIe: BF16/FP16 1,513, TF32 756 (sparse), FP32 51
    ("H100 PCIe", Peak(756.0, 756.0, 378.0, 51.2)),
    # the same, H100 SXM: BF16/FP16 1,979, TF32 989 (sparse), FP32 67 (66.9: NVIDIA H100 whitepaper, table 3)
    ("H100", Peak(989.4, 989.4, 494.7, 66.9)),
    # NVIDIA A100 Tensor Core GPU datasheet (40GB and 80GB alike): BF16/FP16 312, TF32 156, FP32 19.5 (dense)
    ("A100", Peak(312.0, 312.0, 156.0, 19.5)),
    ("L40S", Peak(362.0, 362.0, 183.0, 91.6)),
    ("L40", Peak(181.0, 181.0, 90.5, 90.5)),
    ("L4", Peak(121.0, 121.0, 60.0, 30.3)),
    ("A10", Peak(125.0, 125.0, 62.5, 31.2)),
    ("RTX A6000", Peak(154.8, 154.8, 77.4, 38.7)),
    ("V100-PCIE", Peak(None, 112.0, None, 14.0)),
    ("V100", Peak(None, 125.0, None, 15.7)),  # SXM2
    ("T4", Peak(None, 65.0, None, 8.1)),
    ("RTX 4090", Peak(165.2, 165.2, 82.6, 82.6)),
    ("RTX 4080", Peak(97.5, 97.5, 48.7, 48.7)),
    ("RTX 3090", Peak(71.0, 71.0, 35.6, 35.6)),
    ("RTX 3080", Peak(59.5, 59.5, 29.8, 29.8)),
    ("RTX 3060", Peak(25.6, 25.6, 12.8, 12.7)),
    ("RTX 2080 Ti", Peak(None, 53.8, None, 13.4)),
)


def _matches(key: str, name: str) -> bool:
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", name, re.IGNORECASE) is not None


def peak_for(name: str) -> Peak | None:
    """The datasheet peaks of the GPU CUDA calls `name` (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    for key, peak in PEAKS:
        if _matches(key, name):
            return peak
    return None


def dense_bf16_tflops(name: str) -> float | None:
    peak = peak_for(name)
    return peak.bf16 if peak else None
