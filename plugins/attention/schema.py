"""`trt_edgellm::AttentionPlugin`: names, attributes and the node builder (contracts.md section 3.1).

The exporter builds nodes with `make_node`; every consumer checks the attributes with `attrs_from_fields` (the
reference and the ORT lowering through `read_attrs`, the TensorRT plugin on the fields TensorRT hands it), so the
attribute names, defaults and checks live only here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from contract.errors import InputError
from contract.kv import KvDtype
from contract.versions import CUSTOM_DOMAIN

DOMAIN = CUSTOM_DOMAIN
OP_TYPE = "AttentionPlugin"
OPSET = onnx.helper.make_opsetid(DOMAIN, 1)

INPUTS = ("qkv", "past_key_value", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index")
QK_NORM_INPUTS = ("q_norm_gamma", "k_norm_gamma")
TREE_INPUTS = ("attention_mask", "attention_pos_id")  # with enable_tree_attention=1, after the qk-norm gammas
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
    enable_tree_attention: bool = False

    @property
    def num_inputs(self) -> int:
        """Inputs of a node with these attributes (the optional groups of reference 2.5 that are on)."""
        return (len(INPUTS) + (len(QK_NORM_INPUTS) if self.enable_qk_norm else 0)
                + (len(TREE_INPUTS) if self.enable_tree_attention else 0))

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
    enable_tree_attention: bool = False,
) -> onnx.NodeProto:
    """One attention layer: inputs `qkv, past_key_value, context_lengths, rope_rotary_cos_sin, kvcache_start_index`
    (+ `q_norm_gamma, k_norm_gamma` with qk-norm, + `attention_mask, attention_pos_id` with tree attention);
    outputs `attn, present_key_value`."""
    expected = len(INPUTS) + (len(QK_NORM_INPUTS) if enable_qk_norm else 0)
    expected += len(TREE_INPUTS) if enable_tree_attention else 0
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
        enable_tree_attention=int(enable_tree_attention),
    )


def attrs_from_fields(fields: Mapping[str, object], where: str) -> AttentionAttrs:
    """The attributes, checked against what this project supports, whoever hands them over: an ONNX node's
    (`read_attrs`) or TensorRT's plugin fields (`trt_plugin`). `where` names the node or plugin in the message."""
    for key in ("num_q_heads", "num_kv_heads", "head_size"):
        if key not in fields:
            raise InputError(f"{where}: expected attribute {key!r}, found none")
    if _int(fields, "sliding_window_size", -1, where) != -1:
        raise InputError(f"{where}: expected sliding_window_size -1 (off), found {fields['sliding_window_size']}")
    hq, hkv, d = (_int(fields, key, None, where) for key in ("num_q_heads", "num_kv_heads", "head_size"))
    if hq <= 0 or hkv <= 0 or hq % hkv != 0:
        raise InputError(f"{where}: expected num_q_heads a multiple of num_kv_heads, found {hq} and {hkv}")
    if d <= 0:
        raise InputError(f"{where}: expected a positive head_size, found {d}")
    flags = {key: _int(fields, key, 0, where)
             for key in ("enable_fp8_kv_cache", "enable_qk_norm", "enable_tree_attention")}
    for key, value in flags.items():
        if value not in (0, 1):
            raise InputError(f"{where}: expected {key} 0 or 1, found {value}")
    raw = fields.get("qkv_scales", (1.0, 1.0, 1.0))  # a list from ONNX, a float32 array from TensorRT
    try:
        scales = tuple(float(s) for s in np.asarray(raw, np.float32).reshape(-1))
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected qkv_scales of 3 positive finite floats, found {raw!r}") from None
    if len(scales) != 3 or not all(0 < s < math.inf for s in scales):
        raise InputError(f"{where}: expected qkv_scales of 3 positive finite floats, found {list(scales)}")
    return AttentionAttrs(
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_size=d,
        attention_scale=_positive_float(fields, "attention_scale", 1.0 / math.sqrt(d), where),
        enable_fp8_kv_cache=bool(flags["enable_fp8_kv_cache"]),
        qkv_scales=scales,
        enable_qk_norm=bool(flags["enable_qk_norm"]),
        rms_norm_eps=_positive_float(fields, "rms_norm_eps", 1e-6, where),
        enable_tree_attention=bool(flags["enable_tree_attention"]),
    )


def read_attrs(node: onnx.NodeProto) -> AttentionAttrs:
    """The node's attributes (checked by `attrs_from_fields`) and its input count."""
    where = f"AttentionPlugin node {node.name!r}"
    attrs = attrs_from_fields({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, where)
    if len(node.input) != attrs.num_inputs:
        raise InputError(f"{where}: expected {attrs.num_inputs} inputs (enable_qk_norm={int(attrs.enable_qk_norm)}, "
                         f"enable_tree_attention={int(attrs.enable_tree_attention)}), found {len(node.input)}")
    return attrs


def _int(fields: Mapping[str, object], key: str, default: int | None, where: str) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: expected an int {key}, found {value!r}")
    return int(value)


def _positive_float(fields: Mapping[str, object], key: str, default: float, where: str) -> float:
    value = fields.get(key, default)
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not 0 < value < math.inf:
        raise InputError(f"{where}: expected a positive finite float {key}, found {value!r}")
    return float(value)
