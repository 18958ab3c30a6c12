"""The reader on hand-built checkpoints of the layouts other tools write (ModelOpt FP8_PB_WO, HF fine-grained FP8,
clamped ModelOpt KV scales) and on checkpoints that claim a format they do not hold."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from contract.errors import InputError
from llm_loader.quantized_checkpoint import dequantize_linear, read_quantized_checkpoint

CONFIG = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 256, "tie_word_embeddings": False}
PROJ = "model.layers.0.self_attn.q_proj"


def write(path: Path, tensors: dict, config: dict = CONFIG, quant: dict | None = None) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    if quant is not None:
        (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "test"}, "quantization": quant}))
    return path


def fp8(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)).view(torch.float8_e4m3fn)


def base_tensors() -> dict:
    return {"model.embed_tokens.weight": torch.randn(10, 256, dtype=torch.float16),
            "model.norm.weight": torch.ones(256, dtype=torch.float16)}


def test_modelopt_fp8_pb_wo_and_clamped_kv(tmp_path):
    w = np.random.randn(256, 384).astype(np.float32)
    tiles = np.abs(w).reshape(2, 128, 3, 128).max(axis=(1, 3)) / 448
    q = fp8(w / np.repeat(np.repeat(tiles, 128, 0), 128, 1))
    tensors = {**base_tensors(), f"{PROJ}.weight": q, f"{PROJ}.weight_scale": torch.from_numpy(tiles).reshape(2, 1, 3, 1),
               "model.layers.0.self_attn.k_proj.k_scale": torch.tensor(1.0),
               "model.layers.0.self_attn.v_proj.v_scale": torch.tensor(1.0)}
    ckpt = write(tmp_path / "c", tensors, quant={"quant_algo": "FP8_PB_WO", "kv_cache_quant_algo": "FP8",
                                                   "exclude_modules": ["lm_head"]})
    qc = read_quantized_checkpoint(ckpt)
    lin = qc.linears[PROJ]
    assert lin.format == "fp8_pb_wo" and lin.block_size == (128, 128)
    expected = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.repeat(np.repeat(tiles, 128, 0), 128, 1)
    np.testing.assert_array_equal(dequantize_linear(lin).numpy(), expected)
    assert qc.kv_scales[0].k_scale == 1.0 and qc.kv_scales[0].q_scale is None  # ModelOpt's clamp, no q_scale
    assert set(qc.tensors) == {"model.embed_tokens.weight", "model.norm.weight"}


def test_hf_fine_grained_fp8_without_hf_quant_config(tmp_path):
    w = np.random.randn(200, 300).astype(np.float32)
    scale = np.random.rand(2, 3).astype(np.float32) + 0.01
    q = fp8(w)
    config = {**CONFIG, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": [128, 128]}}
    ckpt = write(tmp_path / "c", {**base_tensors(), f"{PROJ}.weight": q, f"{PROJ}.weight_scale_inv": torch.from_numpy(scale)}, config)
    qc = read_quantized_checkpoint(ckpt)
    lin = qc.linears[PROJ]
    assert lin.format == "fp8_block" and qc.kv_scales == {}
    full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:200, :300]
    expected = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32) * full
    np.testing.assert_array_equal(dequantize_linear(lin).numpy(), expected)


def test_plain_checkpoint_is_all_fp16(tmp_path):
    w = torch.randn(64, 256, dtype=torch.float16)
    qc = read_quantized_checkpoint(write(tmp_path / "c", {**base_tensors(), f"{PROJ}.weight": w}))
    assert qc.quant_algo is None and qc.linears[PROJ].format == "fp16"
    assert torch.equal(dequantize_linear(qc.linears[PROJ]), w.float())


def test_claimed_format_missing_tensor_is_named(tmp_path):
    q = fp8(np.random.randn(64, 256).astype(np.float32))
    ckpt = write(tmp_path / "a", {**base_tensors(), f"{PROJ}.weight": q},
                 quant={"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]})
    with pytest.raises(InputError, match=rf"{PROJ}\.weight_scale"):
        read_quantized_checkpoint(ckpt)

    ckpt = write(tmp_path / "b", {**base_tensors(), f"{PROJ}.weight": q, f"{PROJ}.weight_scale": torch.tensor(0.1)},
                 quant={"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": []})
    with pytest.raises(InputError, match=rf"{PROJ}\.input_scale"):
        read_quantized_checkpoint(ckpt)

    ckpt = write(tmp_path / "c", base_tensors(), quant={"quant_algo": None, "kv_cache_quant_algo": "FP8", "exclude_modules": []})
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.k_proj\.k_scale"):
        read_quantized_checkpoint(ckpt)

    packed = torch.zeros(64, 128, dtype=torch.uint8)
    ckpt = write(tmp_path / "d", {**base_tensors(), f"{PROJ}.weight": packed, f"{PROJ}.weight_scale": torch.ones(64, 8),
                                  f"{PROJ}.weight_scale_2": torch.tensor(1.0), f"{PROJ}.input_scale": torch.tensor(1.0)},
                 quant={"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": []})
    with pytest.raises(InputError, match=rf"{PROJ}\.weight_scale: expected torch.float8_e4m3fn"):
        read_quantized_checkpoint(ckpt)


def test_excluded_module_may_stay_fp16(tmp_path):
    w = torch.randn(64, 256, dtype=torch.float16)
    ckpt = write(tmp_path / "c", {**base_tensors(), f"{PROJ}.weight": w},
                 quant={"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "exclude_modules": ["model.layers.0.self_attn*"]})
    assert read_quantized_checkpoint(ckpt).linears[PROJ].format == "fp16"
