"""TensorRT plugin tensors as torch tensors, shared by every op's `tensorrt.plugin` registration.

Imports neither TensorRT nor torch at module level, so modules that only describe plugins stay light.
"""

# TensorRT DataType names -> what torch calls them, and the `__cuda_array_interface__` typestr of their bytes
TORCH_DTYPE_NAMES = {"HALF": "float16", "FLOAT": "float32", "INT32": "int32", "INT64": "int64", "FP8": "float8_e4m3fn"}
CUDA_TYPESTR = {"HALF": "<f2", "FLOAT": "<f4", "INT32": "<i4", "INT64": "<i8", "FP8": "|u1"}


def as_torch(tensor):
    """A zero-copy torch view of a `tensorrt.plugin.Tensor` on the GPU (FP8 goes through its bytes)."""
    import torch

    name = tensor.dtype.name

    class _Buffer:
        __cuda_array_interface__ = {
            "shape": tuple(int(n) for n in tensor.shape), "typestr": CUDA_TYPESTR[name],
            "data": (int(tensor.data_ptr), False), "version": 3, "strides": None,
        }

    return torch.as_tensor(_Buffer(), device="cuda").view(getattr(torch, TORCH_DTYPE_NAMES[name]))
