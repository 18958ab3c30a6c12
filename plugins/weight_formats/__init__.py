"""Weight formats: one module per format, each holding every operation a stage performs on that format.

The data of a format (its ModelOpt name, bits, scale tensors, activation scheme, which recipes apply) is its row in
`contract.weight_formats.WEIGHT_FORMATS`; its operations are the module of the same name here:

| operation | who calls it |
|---|---|
| `unfit(shape)`, `quantize(w, input_amax, scales)`, `config_json(exclude)` | the quantizer's checkpoint writer |
| `weight_qdq(w)`, `input_qdq(x, amax)` | the searches (smoothing, `auto` sensitivities): fake quantization |
| `group_scales(weights, input_sq, search)` | shared per-tensor scales of a fusion group (rows with `shared_scale`) |
| `scale_error(w, scales, h)`, `amax_scales(w)` | `--scale_search mse` (rows with `scale_search`) |
| `gptq(w, h, scales, search, loop)` | `--gptq` (rows with `gptq`) |
| `holds(module, tensors)`, `read(module, tensors, meta)`, `dequantize(linear)` | the quantized-checkpoint reader |
| `graph_activation(g, x, q, name)`, `graph_weight(g, q, name)` | the exporter's `linear()` (contracts.md 2.1) |
| `recognize(dq, init, inits, quantized_input)` | `llm-build`'s detection, from model.onnx alone |
| `ort_lowering(graph, ctx)` or None | the ONNX Runtime lowering, where ORT lacks the graph form's ops |

Adding a format: its row, its module, `MODULES` below, and its tests; `tests/test_weight_formats.py` fails while an
operation is missing. Importing this package imports torch and onnx: the CLIs' `--help` reads the rows only.
"""

from __future__ import annotations

from types import ModuleType

from contract.errors import InputError
from contract.weight_formats import WEIGHT_FORMATS, WeightFormat
from plugins.weight_formats import fp8, fp8_block, fp8_pb_wo, fp8_pc, fp16, nvfp4
from plugins.weight_formats.linear import QuantizedLinear

__all__ = ["MODULES", "OPERATIONS", "QuantizedLinear", "classify", "get", "recognize", "row"]

# every format's operations, and those its row's capabilities call for
OPERATIONS = ("unfit", "weight_qdq", "input_qdq", "holds", "read", "dequantize", "graph_activation", "graph_weight",
              "recognize", "ort_lowering")
CAPABILITY_OPERATIONS = {"writable": ("quantize", "config_json"), "shared_scale": ("group_scales",),
                         "scale_search": ("scale_error", "amax_scales"), "gptq": ("gptq",)}

# in the order `classify` asks them (each `holds` excludes the others, so the order only reads well)
MODULES: dict[str, ModuleType] = {m.FORMAT.name: m for m in (fp8_block, nvfp4, fp8_pb_wo, fp8, fp8_pc, fp16)}


def get(name: str) -> ModuleType:
    """The module of format `name`."""
    if name not in MODULES:
        raise InputError(f"expected a weight format of {list(MODULES)}, found {name!r}")
    return MODULES[name]


def row(name: str) -> WeightFormat:
    return WEIGHT_FORMATS[name]


def classify(module: str, tensors: dict) -> str:
    """The format a module's tensors hold (whatever the metadata claims)."""
    return next(name for name, m in MODULES.items() if m.holds(module, tensors))


def recognize(dq, init, inits: dict, quantized_input: bool) -> str | None:
    """The format of a linear in model.onnx from the DequantizeLinear `dq` of its weight initializer `init`."""
    return next((name for name, m in MODULES.items() if m.recognize(dq, init, inits, quantized_input)), None)
