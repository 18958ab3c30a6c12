"""`trt_edgellm::AttentionPlugin`: names, attributes and the node builder (contracts.md section 3.1).

The exporter builds nodes with `make_node`; the reference, the ORT lowering and the GPU plugin read them back with
`read_attrs`, so the attribute names and defaults live only here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from contract.errors import InputError
from contract.stage import CUSTOM_DOMAIN, KvDtype

DOMAIN = CUSTOM_DOMAIN
OP_TYPE = "AttentionPlugin"
OPSET = onnx.helper.make_opsetid(DOMAIN, 1)

INPUTS = ("qkv", "past_key_value", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index")
QK_NORM_INPUTS = ("q_norm_gamma", "k_norm_gamma")
OUTPUTS = ("attn", "present_key_value")


@dataclass(frozen=True)
class AttentionAttrs:
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    attention_scale: float
    enable_fp8_kv_cache: bool = False
    qkv_scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    enable_qk_norm: bool = False
    rms_norm_eps: float = 1e-6

    @property
    def kv_dtype(self) -> KvDtype:
        return KvDtype.FP8 if self.enable_fp8_kv_cache else KvDtype.FP16

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.num_q_heads // self.num_kv_heads


def make_node(
    inputs: list[str],
    outputs: list[str],
    *,
    name: str,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    attention_scale: float | None = None,
    enable_fp8_kv_cache: bool = False,
    qkv_scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    enable_qk_norm: bool = False,
    rms_norm_eps: float = 1e-6,
) -> onnx.NodeProto:
    """One attention layer: inputs `qkv, past_key_value, context_lengths, rope_rotary_cos_sin, kvcache_start_index`
    (+ `q_norm_gamma, k_norm_gamma` with qk-norm); outputs `attn, present_key_value`."""
    expected = len(INPUTS) + (len(QK_NORM_INPUTS) if enable_qk_norm else 0)
    if len(inputs) != expected:
        raise ValueError(f"{name}: AttentionPlugin expects {expected} inputs, got {len(inputs)}")
    if len(outputs) != len(OUTPUTS):
        raise ValueError(f"{name}: AttentionPlugin expects {len(OUTPUTS)} outputs, got {len(outputs)}")
    if attention_scale is None:
        attention_scale = 1.0 / math.sqrt(head_size)
    return onnx.helper.make_node(
        OP_TYPE,
        inputs,
        outputs,
        name=name,
        domain=DOMAIN,
        num_q_heads=int(num_q_heads),
        num_kv_heads=int(num_kv_heads),
        head_size=int(head_size),
        attention_scale=float(attention_scale),
        enable_fp8_kv_cache=int(enable_fp8_kv_cache),
        qkv_scales=[float(s) for s in qkv_scales],
        enable_qk_norm=int(enable_qk_norm),
        rms_norm_eps=float(rms_norm_eps),
        sliding_window_size=-1,
        enable_tree_attention=0,
    )


def read_attrs(node: onnx.NodeProto) -> AttentionAttrs:
    """The node's attributes, checked against what this project supports."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    where = f"AttentionPlugin node {node.name!r}"
    for key in ("num_q_heads", "num_kv_heads", "head_size"):
        if key not in attrs:
            raise InputError(f"{where}: expected attribute {key!r}, found none")
    if attrs.get("sliding_window_size", -1) != -1:
        raise InputError(f"{where}: expected sliding_window_size -1 (off), found {attrs['sliding_window_size']}")
    if attrs.get("enable_tree_attention", 0) != 0:
        raise InputError(f"{where}: expected enable_tree_attention 0, found {attrs['enable_tree_attention']}")
    hq, hkv, d = int(attrs["num_q_heads"]), int(attrs["num_kv_heads"]), int(attrs["head_size"])
    if hkv <= 0 or hq % hkv != 0:
        raise InputError(f"{where}: expected num_q_heads a multiple of num_kv_heads, found {hq} and {hkv}")
    scales = tuple(float(s) for s in attrs.get("qkv_scales", (1.0, 1.0, 1.0)))
    if len(scales) != 3 or not all(s > 0 for s in scales):
        raise InputError(f"{where}: expected qkv_scales of 3 positive floats, found {list(scales)}")
    qk_norm = bool(attrs.get("enable_qk_norm", 0))
    n_inputs = len(INPUTS) + (len(QK_NORM_INPUTS) if qk_norm else 0)
    if len(node.input) != n_inputs:
        raise InputError(f"{where}: expected {n_inputs} inputs (enable_qk_norm={int(qk_norm)}), found {len(node.input)}")
    return AttentionAttrs(
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_size=d,
        attention_scale=float(attrs.get("attention_scale", 1.0 / math.sqrt(d))),
        enable_fp8_kv_cache=bool(attrs.get("enable_fp8_kv_cache", 0)),
        qkv_scales=scales,
        enable_qk_norm=qk_norm,
        rms_norm_eps=float(attrs.get("rms_norm_eps", 1e-6)),
    )
