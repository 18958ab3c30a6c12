"""The KV cache dtype and its forms in each library, and how an ONNX Runtime engine takes its cache
(contracts.md 2, 3.1, 5.1). It imports neither torch nor onnx at module level, so a CLI's `--help` stays fast:
the forms that need those libraries are built when asked for."""

from __future__ import annotations

import enum

from contract.errors import InputError


class KvDtype(str, enum.Enum):
    """config.json `kv_cache_dtype`. One value per engine; each library names it differently."""

    FP16 = "fp16"
    FP8 = "fp8"

    @property
    def onnx(self) -> int:
        """elem_type of `past_key_values_*` in model.onnx (and of a TensorRT engine's binding)."""
        from onnx import TensorProto

        return TensorProto.FLOAT16 if self is KvDtype.FP16 else TensorProto.FLOAT8E4M3FN

    @property
    def ort_onnx(self) -> int:
        """elem_type of the cache in the ONNX Runtime engine: it computes in fp32, so an fp16 cache is held in fp32."""
        from onnx import TensorProto

        return TensorProto.FLOAT if self is KvDtype.FP16 else TensorProto.FLOAT8E4M3FN

    @property
    def numpy(self):
        """numpy dtype of the ONNX Runtime engine's cache buffers (FP8 as its bytes)."""
        import numpy as np

        return np.dtype(np.float32) if self is KvDtype.FP16 else np.dtype(np.uint8)

    @property
    def torch(self):
        """torch dtype of the GPU cache."""
        import torch

        return torch.float16 if self is KvDtype.FP16 else torch.float8_e4m3fn

    @property
    def tensorrt(self) -> str:
        """`tensorrt.DataType` name of the engine's cache binding."""
        return "HALF" if self is KvDtype.FP16 else "FP8"

    @classmethod
    def parse(cls, value, where: str) -> "KvDtype":
        try:
            return cls(value)
        except ValueError:
            raise InputError(f"{where}: expected kv_cache_dtype one of {[k.value for k in cls]}, "
                             f"found {value!r}") from None

    @classmethod
    def from_onnx(cls, elem_type: int, ort_engine: bool = False) -> "KvDtype | None":
        """The KvDtype a graph binding's elem_type stands for (model.onnx, or a lowered ORT engine), else None."""
        for kv in cls:
            if (kv.ort_onnx if ort_engine else kv.onnx) == elem_type:
                return kv
        return None

    @classmethod
    def from_tensorrt(cls, name: str) -> "KvDtype | None":
        return next((kv for kv in cls if kv.tensorrt == name), None)


def layer_kv_dtypes(num_layers: int, kv_dtype: KvDtype, fp16_layers=()) -> list[KvDtype]:
    """Each layer's KV cache dtype: `kv_dtype`, but FP16 for the layers kept in FP16 (`--kv_cache_fp16_layers`)."""
    return [KvDtype.FP16 if i in fp16_layers else kv_dtype for i in range(num_layers)]


# How an ONNX Runtime engine takes its KV cache (builder_config `kv_io`, contracts.md 3.1 and 5.1): "in_place" binds
# the whole cache as past and present; "prefix" passes the filled prefix in and returns only this call's K/V.
KV_IN_PLACE, KV_PREFIX = "in_place", "prefix"
KV_IO_FORMS = (KV_IN_PLACE, KV_PREFIX)
# The ORT engine splits each layer's cache binding into halves named `{past_key_values_i}.key` / `.value` (and the
# same for present), `[B,Hkv,T,D]` each, K first (contracts.md 3.1).
ORT_KV_HALVES = ("key", "value")
