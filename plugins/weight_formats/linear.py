"""What every weight format's module shares: the stored linear it reads into, the checks of its tensors, and the
graph builder its graph forms write into.

The checks raise `InputError` naming the tensor; `llm_loader.quantized_checkpoint` prefixes the checkpoint path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from contract.errors import InputError

FP8 = torch.float8_e4m3fn
FP16_MAX = torch.finfo(torch.float16).max  # the graph holds most scales in fp16


@dataclass
class QuantizedLinear:
    """One linear as a checkpoint stores it; `format` names its row of `contract.weight_formats.WEIGHT_FORMATS`."""

    name: str
    format: str
    weight: torch.Tensor  # fp16/bf16 [out,in], FP8 [out,in], or NVFP4 packed uint8 [out,in/2]
    # fp8 [], fp8_pc [out], fp8_block [ceil(out/b), ceil(in/b)] (the file's weight_scale_inv),
    # fp8_pb_wo [out/128, 1, in/128, 1], nvfp4 FP8 [out, in/16]
    weight_scale: torch.Tensor | None = None
    weight_scale_2: torch.Tensor | None = None  # NVFP4 global scale
    input_scale: torch.Tensor | None = None  # static activation scale (fp8, nvfp4)
    bias: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None  # fp8_block / fp8_pb_wo tile, nvfp4 (1, group)
    packing: int = 1  # values per stored element along `in` (NVFP4: 2)

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``[out, in]``."""
        out, inp = self.weight.shape
        return out, inp * self.packing


class ExportGraph(Protocol):
    """The exporter's graph builder (`llm_loader.onnx_graph.Graph`) as a format's graph form uses it."""

    def op(self, op_type: str, inputs: list[str], name: str, **kwargs) -> str: ...

    def scalar(self, name: str, value, dtype: torch.dtype) -> str:
        """A 0-d initializer."""

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """An initializer of the tensor as it is."""

    def add_raw(self, name: str, array: np.ndarray, data_type: int, dims: tuple[int, ...] | None = None) -> str:
        """An initializer of `array`'s bytes read as ONNX `data_type` (FP8 as uint8, packed FP4)."""

    def shared_const(self, name: str, values, dtype) -> str:
        """A constant written once per graph."""


def need(tensors: dict, name: str, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensors[name]`, of `dtype` if given."""
    if name not in tensors:
        raise InputError(f"tensor {name}: expected by {what}, found none")
    t = tensors[name]
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"tensor {name}: expected {dtype} for {what}, found {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise InputError(f"tensor {name}: expected shape {list(expected)}, found {list(t.shape)}")


def check_scale(name: str, t: torch.Tensor, *, scalar: bool = False, zero_ok: bool = False) -> torch.Tensor:
    """`t` after checking that the graph can multiply or divide by it: finite, positive (an NVFP4 block scale may be 0:
    an all-zero block) and within fp16; one value where the format has one. A NaN, negative or zero scale would turn
    every output of the engine into NaN or noise."""
    if scalar and t.numel() != 1:
        raise InputError(f"tensor {name}: expected one scale value, found shape {list(t.shape)}")
    x = t.float()
    ok = ((x >= 0) if zero_ok else (x > 0)) & (x <= FP16_MAX)
    if not bool(ok.all()):
        kind = "non-negative" if zero_ok else "positive"
        raise InputError(f"tensor {name}: expected {kind} finite scales of at most {FP16_MAX:g}, found "
                         f"{float(x[~ok][0])}")
    return t


def check_fp8_values(name: str, t: torch.Tensor) -> torch.Tensor:
    """An FP8 E4M3 tensor holds no NaN (its one non-finite code); checked in chunks, without a big temporary."""
    if any(torch.isnan(chunk.float()).any() for chunk in t.reshape(-1).split(1 << 20)):
        raise InputError(f"tensor {name}: expected finite FP8 values, found NaN")
    return t


def fp8_weight(module: str, tensors: dict, fmt: str) -> torch.Tensor:
    """The module's FP8 E4M3 `weight`, checked."""
    return check_fp8_values(f"{module}.weight", need(tensors, f"{module}.weight", f"format {fmt}", FP8))


def scale_of(tensors: dict, module: str, suffix: str) -> torch.Tensor | None:
    return tensors.get(f"{module}.{suffix}")
