"""`trt_edgellm::Fp8Gather` as a TensorRT Python plugin (`tensorrt.plugin`, TensorRT >= 10.6): the FP8 embedding
engine. Importing never needs TensorRT; `register()` returns False without it. The shape/type logic is in plain
functions that CI tests. Ids are range-checked by the runtime before the engine runs (contracts.md 3.2); inside the
engine an out-of-range id yields a zero row. The ONNX node needs `plugin_namespace="trt_edgellm"` for TensorRT's
parser (the builder adds it). No annotations are postponed here (`tensorrt.plugin` reads the real type hints).
"""

import functools
import math

from contract.errors import InputError
from plugins.fp8_gather.schema import block_size_from_fields
from plugins.trt_tensors import as_torch

PLUGIN_ID = "trt_edgellm::Fp8Gather"
INPUT_NAMES = ("table", "scale", "input_ids")
EXPECTED_DTYPES = ("FP8", "FLOAT", "INT32")
WHERE = f"{PLUGIN_ID} attributes"


def check_input_dtypes(dtype_names) -> None:
    for name, want, found in zip(INPUT_NAMES, EXPECTED_DTYPES, dtype_names, strict=True):
        if want != found:
            raise InputError(f"{PLUGIN_ID} input {name}: expected {want}, found {found}")


def check_scale_shape(table_shape, scale_shape, block_size: int) -> None:
    """`scale [V, ceil(H / block_size)]` for `table [V, H]` (both static in an engine)."""
    v, h = (int(n) for n in table_shape)
    want = (v, math.ceil(h / block_size))
    if tuple(int(n) for n in scale_shape) != want:
        raise InputError(f"{PLUGIN_ID} input scale: expected shape {list(want)}, found {list(scale_shape)}")


def output_shape(ids_shape, table_shape) -> tuple:
    """`[B, S, H]` from `input_ids [B, S]` and `table [V, H]`; entries may be TensorRT shape expressions."""
    return (ids_shape[0], ids_shape[1], table_shape[1])


@functools.cache
def register() -> bool:
    """Register the plugin with `tensorrt.plugin` (once); False when TensorRT is not installed."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    from typing import Tuple

    @trtp.register(PLUGIN_ID)
    def _describe(table: trtp.TensorDesc, scale: trtp.TensorDesc, input_ids: trtp.TensorDesc, block_size: int) -> trtp.TensorDesc:
        block_size_from_fields({"block_size": block_size}, WHERE)
        check_input_dtypes([t.dtype.name for t in (table, scale, input_ids)])
        return trtp.from_shape_expr(output_shape(input_ids.shape_expr, table.shape_expr), dtype=trt.float16)

    @trtp.impl(PLUGIN_ID)
    def _run(table: trtp.Tensor, scale: trtp.Tensor, input_ids: trtp.Tensor, block_size: int,
             outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from plugins.fp8_gather.triton_kernels import fp8_gather

        check_scale_shape(table.shape, scale.shape, block_size)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            fp8_gather(as_torch(table), as_torch(scale), as_torch(input_ids), block_size,
                       out=as_torch(outputs[0]), check=False)

    return True
