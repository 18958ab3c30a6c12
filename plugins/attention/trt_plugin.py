"""`trt_edgellm::AttentionPlugin` as a TensorRT Python plugin (`tensorrt.plugin`, TensorRT >= 10.6).

Importing this module never needs TensorRT; `register()` does the registration and returns False without it. What
the plugin decides (attributes -> AttentionAttrs, input dtypes, output shape) lives in plain functions that CI tests;
the registered functions only translate between TensorRT descriptors and those functions.

Two facts of `tensorrt.plugin` shape the registration:
- A plugin has a fixed input list, so it always takes the nine inputs `qkv, past_key_value, context_lengths,
  rope_rotary_cos_sin, kvcache_start_index, q_norm_gamma, k_norm_gamma, attention_mask, attention_pos_id`. For a
  layer without QK-norm (`enable_qk_norm=0`) the TensorRT builder puts two fp16 `[head_size]` placeholders in the
  gammas' places, and without tree attention (`enable_tree_attention=0`) an int32 `[1,1,1]` mask and `[1,1]`
  positions; the kernels never read them.
- The TensorRT ONNX parser finds the plugin by op type plus a string attribute `plugin_namespace="trt_edgellm"` on
  the node; the builder adds it (ONNX Runtime never sees it).
`present_key_value` is declared aliased to `past_key_value`: the kernels write the new K/V into the cache in place.
No annotations are postponed here (`tensorrt.plugin` reads the real type hints of the decorated functions).
"""

import functools

import numpy as np

from contract.errors import InputError
from plugins.attention.schema import AttentionAttrs, attrs_from_fields
from plugins.trt_tensors import as_torch

PLUGIN_ID = "trt_edgellm::AttentionPlugin"
INPUT_NAMES = (
    "qkv", "past_key_value", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index", "q_norm_gamma",
    "k_norm_gamma", "attention_mask", "attention_pos_id",
)
GPU_HEAD_SIZES = (64, 128)  # the head sizes the Triton kernels are tested with
WHERE = f"{PLUGIN_ID} attributes"


def check_head_size(head_size: int, where: str) -> None:
    """The GPU kernels take fewer head sizes than the ONNX contract; the builder asks before TensorRT parses."""
    if head_size not in GPU_HEAD_SIZES:
        raise InputError(f"{where}: expected head_size 64 or 128 (the GPU kernels' tile sizes), found {head_size}")


def plugin_attrs(**fields) -> AttentionAttrs:
    """The plugin's attributes as TensorRT hands them over (ints, floats, a float32 array): the contract's checks
    (`schema.attrs_from_fields`), then the GPU kernels' head sizes."""
    attrs = attrs_from_fields(fields, WHERE)
    check_head_size(attrs.head_size, WHERE)
    return attrs


def expected_input_dtypes(attrs: AttentionAttrs) -> tuple[str, ...]:
    """TensorRT DataType names of the nine inputs, in order."""
    return ("HALF", attrs.kv_dtype.tensorrt, "INT32", "FLOAT", "INT32", "HALF", "HALF", "INT32", "INT32")


def check_input_dtypes(dtype_names, attrs: AttentionAttrs) -> None:
    for name, want, found in zip(INPUT_NAMES, expected_input_dtypes(attrs), dtype_names, strict=True):
        if want != found:
            raise InputError(f"{PLUGIN_ID} input {name}: expected {want}, found {found}")


def attn_output_shape(qkv_shape, attrs: AttentionAttrs) -> tuple:
    """`attn [B, S, Hq, D]` from `qkv [B, S, (Hq + 2 Hkv) D]`; B and S may be TensorRT shape expressions."""
    return (qkv_shape[0], qkv_shape[1], attrs.num_q_heads, attrs.head_size)


@functools.cache
def register() -> bool:
    """Register the plugin with `tensorrt.plugin` (once); False when TensorRT is not installed."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    from typing import Tuple

    import numpy.typing as npt

    @trtp.register(PLUGIN_ID)
    def _describe(
        qkv: trtp.TensorDesc, past_key_value: trtp.TensorDesc, context_lengths: trtp.TensorDesc,
        rope_rotary_cos_sin: trtp.TensorDesc, kvcache_start_index: trtp.TensorDesc, q_norm_gamma: trtp.TensorDesc,
        k_norm_gamma: trtp.TensorDesc, attention_mask: trtp.TensorDesc, attention_pos_id: trtp.TensorDesc,
        num_q_heads: int, num_kv_heads: int, head_size: int, attention_scale: float,
        enable_fp8_kv_cache: int, qkv_scales: npt.NDArray[np.float32], enable_qk_norm: int, rms_norm_eps: float,
        sliding_window_size: int, enable_tree_attention: int,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        attrs = plugin_attrs(
            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, attention_scale=attention_scale,
            enable_fp8_kv_cache=enable_fp8_kv_cache, qkv_scales=qkv_scales, enable_qk_norm=enable_qk_norm,
            rms_norm_eps=rms_norm_eps, sliding_window_size=sliding_window_size,
            enable_tree_attention=enable_tree_attention,
        )
        inputs = (qkv, past_key_value, context_lengths, rope_rotary_cos_sin, kvcache_start_index, q_norm_gamma, k_norm_gamma,
                  attention_mask, attention_pos_id)
        check_input_dtypes([t.dtype.name for t in inputs], attrs)
        attn = trtp.from_shape_expr(attn_output_shape(qkv.shape_expr, attrs), dtype=trt.float16)
        return attn, past_key_value.aliased()

    @trtp.impl(PLUGIN_ID)
    def _run(
        qkv: trtp.Tensor, past_key_value: trtp.Tensor, context_lengths: trtp.Tensor, rope_rotary_cos_sin: trtp.Tensor,
        kvcache_start_index: trtp.Tensor, q_norm_gamma: trtp.Tensor, k_norm_gamma: trtp.Tensor,
        attention_mask: trtp.Tensor, attention_pos_id: trtp.Tensor, num_q_heads: int,
        num_kv_heads: int, head_size: int, attention_scale: float, enable_fp8_kv_cache: int,
        qkv_scales: npt.NDArray[np.float32], enable_qk_norm: int, rms_norm_eps: float, enable_tree_attention: int,
        outputs: Tuple[trtp.Tensor], stream: int,
    ) -> None:
        import torch

        from plugins.attention.triton_kernels import attention_forward

        attrs = plugin_attrs(
            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, attention_scale=attention_scale,
            enable_fp8_kv_cache=enable_fp8_kv_cache, qkv_scales=qkv_scales, enable_qk_norm=enable_qk_norm,
            rms_norm_eps=rms_norm_eps, enable_tree_attention=enable_tree_attention,
        )
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            views = [as_torch(t) for t in (qkv, past_key_value, context_lengths, rope_rotary_cos_sin,
                                            kvcache_start_index, q_norm_gamma, k_norm_gamma)]
            tree = [as_torch(t) for t in (attention_mask, attention_pos_id)] if attrs.enable_tree_attention else []
            attention_forward(*views, attrs, out=as_torch(outputs[0]), attention_mask=tree[0] if tree else None,
                              attention_pos_id=tree[1] if tree else None)  # outputs[1] aliases past: in place

    return True
