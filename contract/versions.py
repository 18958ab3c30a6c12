"""Versions and names every output carries: the contract version, the TensorRT-Edge-LLM contract it mirrors,
the producer, and the ONNX opset / IR / custom domain of every graph (contracts.md 1 and 2)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

CONTRACT_VERSION = 1  # config.json `contract_version` of an ONNX dir and of an engine dir (and its builder_config)
EDGELLM_VERSION = "0.10.0"  # the TensorRT-Edge-LLM contract this one mirrors (config.json `edgellm_version`)
PRODUCER = "edgellm-toolchain"  # the distribution name: config.json, hf_quant_config.json and sidecar metadata

ONNX_OPSET = 23  # default-domain opset of model.onnx and of every engine graph
IR_VERSION = 11  # the IR that introduced opset 23
CUSTOM_DOMAIN = "trt_edgellm"  # domain of the custom ops (AttentionPlugin, Fp8Gather), version 1


def producer() -> dict:
    """`{"name", "version"}` of this installation ("0+unknown" in a source tree that was never installed)."""
    try:
        return {"name": PRODUCER, "version": version(PRODUCER)}
    except PackageNotFoundError:
        return {"name": PRODUCER, "version": "0+unknown"}
