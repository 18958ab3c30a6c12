"""llm-build: detection, disagreement errors, profiles and the engine directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from helpers import edit_config, make_fp8_kv, make_tiny_checkpoint, run_cli
from safetensors.torch import load_file, save_file

from builder.cli import main as llm_build
from builder.cli import resolve_backend
from builder.detect import detect
from builder.profiles import (
    Limits,
    ModelDims,
    embedding_profiles,
    llm_profiles,
    validate_limits,
)
from contract.engine_dir import load_engine_config
from contract.errors import InputError
from llm_loader.export_all_cli import export

LIMITS = Limits(max_batch_size=4, max_input_len=1024, max_kv_cache_capacity=4096)
DIMS = ModelDims(num_layers=3, hidden_size=576, num_kv_heads=3, head_dim=64, rotary_dim=64)


def test_profiles_cover_every_input_with_ordered_shapes():
    context, generation = llm_profiles(LIMITS, DIMS)
    assert (context.name, generation.name) == ("context", "generation")
    expected = {"inputs_embeds", "context_lengths", "kvcache_start_index", "rope_rotary_cos_sin", "last_token_ids",
                "past_key_values_0", "past_key_values_1", "past_key_values_2"}
    for profile in (context, generation):
        assert set(profile.shapes) == expected
        for name, (lo, opt, hi) in profile.shapes.items():
            assert len(lo) == len(opt) == len(hi), name
            assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)), (profile.name, name, lo, opt, hi)


def test_profiles_match_the_limits():
    context, generation = llm_profiles(LIMITS, DIMS)
    assert context.shapes["inputs_embeds"] == ((1, 1, 576), (4, 512, 576), (4, 1024, 576))
    assert generation.shapes["inputs_embeds"] == ((1, 1, 576), (4, 1, 576), (4, 1, 576))
    for profile in (context, generation):
        assert profile.shapes["past_key_values_1"] == ((1, 2, 3, 4096, 64), (4, 2, 3, 4096, 64), (4, 2, 3, 4096, 64))
        assert profile.shapes["rope_rotary_cos_sin"] == ((1, 4096, 64),) * 3
        assert profile.shapes["context_lengths"][2] == (4,)
        assert profile.shapes["last_token_ids"][2] == (4, 1)
    (lookup,) = embedding_profiles(LIMITS)
    assert lookup.shapes == {"input_ids": ((1, 1), (4, 512), (4, 1024))}


def test_generation_profile_grows_with_speculative_tokens():
    _, generation = llm_profiles(LIMITS, DIMS, gen_tokens=60)
    assert generation.shapes["inputs_embeds"][2] == (4, 60, 576)


@pytest.mark.parametrize("limits, flag", [
    (Limits(0, 16, 64), "--maxBatchSize"),
    (Limits(1, 0, 64), "--maxInputLen"),
    (Limits(1, 128, 64), "--maxKVCacheCapacity"),
    (Limits(1, 16, 10**12), "--maxKVCacheCapacity"),
])
def test_impossible_limits_are_input_errors(limits, flag):
    with pytest.raises(InputError, match=flag):
        validate_limits(limits)


# --- detection and the CLI on real (tiny) exports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """One tiny llama checkpoint exported twice: FP16 and FP8 embedding."""
    root = tmp_path_factory.mktemp("exports")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    return {"fp16": export(ckpt, root / "fp16"), "fp8": export(ckpt, root / "fp8", fp8_embedding=True)}


@pytest.fixture
def onnx_dir(exports, tmp_path) -> Path:
    """A private copy of the FP16 export that a test may edit."""
    return Path(shutil.copytree(exports["fp16"], tmp_path / "llm"))


def run_build(onnx_dir: Path, engine_dir: Path, *extra: str):
    return run_cli(llm_build, "--onnxDir", onnx_dir, "--engineDir", engine_dir, "--backend", "onnxruntime",
                   "--maxInputLen", "32", "--maxKVCacheCapacity", "64", *extra)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    assert not any("Traceback" in line for line in lines)
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_detect_fp16_and_fp8_embedding(exports):
    plain, fp8 = detect(exports["fp16"]), detect(exports["fp8"])
    assert (plain.embedding_format, plain.kv_cache_dtype) == ("fp16", "fp16")
    assert (fp8.embedding_format, fp8.kv_cache_dtype) == ("fp8_e4m3_row_block", "fp16")
    assert (plain.num_layers, plain.vocab_size, plain.hidden_size, plain.head_dim) == (2, 49152, 64, 16)
    assert "fp8_e4m3_row_block" in fp8.summary()


def test_detect_fp8_kv_when_all_witnesses_agree(onnx_dir):
    make_fp8_kv(onnx_dir)
    assert detect(onnx_dir).kv_cache_dtype == "fp8"


@pytest.mark.parametrize("which", ["config", "plugins", "inputs"])
def test_kv_dtype_disagreement_names_the_witnesses(onnx_dir, which):
    make_fp8_kv(onnx_dir, **{which: True, **{k: False for k in ("config", "plugins", "inputs") if k != which}})
    with pytest.raises(InputError, match="KV cache dtype disagrees") as err:
        detect(onnx_dir)
    assert "config.json kv_cache_dtype says" in str(err.value) and "AttentionPlugin" in str(err.value)


def test_sidecar_with_wrong_dtype_is_rejected(onnx_dir):
    path = onnx_dir / "embedding.safetensors"
    save_file({"embedding": load_file(path)["embedding"].float()}, path, metadata={"format": "fp16"})
    with pytest.raises(InputError, match="embedding"):
        detect(onnx_dir)


def test_sidecar_with_wrong_shape_is_rejected(onnx_dir):
    path = onnx_dir / "embedding.safetensors"
    save_file({"embedding": load_file(path)["embedding"][:100].contiguous()}, path, metadata={"format": "fp16"})
    with pytest.raises(InputError, match=r"expected \[49152, 64\].*found \[100, 64\]"):
        detect(onnx_dir)


def test_sidecar_metadata_disagreeing_with_dtype_is_rejected(onnx_dir):
    path = onnx_dir / "embedding.safetensors"
    save_file(load_file(path), path, metadata={"format": "fp8_e4m3_row_block", "block_size": "128"})
    with pytest.raises(InputError, match="metadata format"):
        detect(onnx_dir)


def test_missing_weights_file_is_rejected(onnx_dir):
    (onnx_dir / "model.onnx.data").unlink()
    with pytest.raises(InputError, match="model.onnx.data"):
        detect(onnx_dir)


def test_cli_builds_a_complete_engine_dir_and_replaces_an_old_one(exports, tmp_path):
    eng = tmp_path / "eng"
    assert run_build(exports["fp16"], eng).exit_code == 0  # an earlier engine dir, which the next build replaces
    result = run_build(exports["fp8"], eng, "--maxBatchSize", "2")
    assert result.exit_code == 0, result.stderr
    names = {p.name for p in eng.iterdir()}
    assert {"llm.onnx", "llm.onnx.data", "embedding.onnx", "config.json", "embedding.safetensors",
            "tokenizer.json", "chat_template.jinja"} <= names
    config = load_engine_config(eng)
    source = json.loads((exports["fp8"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "builder_config"} == source
    assert config["builder_config"] == {
        "backend": "onnxruntime", "max_batch_size": 2, "max_input_len": 32, "max_kv_cache_capacity": 64,
        "spec_base": False, "spec_draft": False, "max_lora_rank": 0, "kv_cache_dtype": "fp16",
        "embedding_format": "fp8_e4m3_row_block", "weight_format": "fp16", "kv_io": "in_place",
        "weight_storage": "fp16", "contract_version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    assert "detect" in result.stderr and "fp8_e4m3_row_block" in result.stderr


def test_build_summary_names_profile_backend_reason_precision_and_memory(exports, tmp_path):
    """The summary says what was built: the profile, why this backend, the compute precision, the weights' form and
    a resident-memory estimate whose KV cache part is the engine's own cache at the profile's batch."""
    from runtime.engine import Engine

    result = run_cli(llm_build, "--onnxDir", exports["fp16"], "--engineDir", tmp_path / "eng", "--maxBatchSize", "2",
                     "--maxInputLen", "32", "--maxKVCacheCapacity", "64")
    assert result.exit_code == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stderr.splitlines() if line and not line.startswith("[")}
    assert lines["profile"].split(None, 1)[1] == "batch 1..2, 1..32 new tokens per call, KV cache 64 tokens per row"
    backend, reason = resolve_backend("auto")
    assert lines["backend"].split(None, 1)[1] == f"{backend} ({reason})"
    if backend == "onnxruntime":
        assert reason.startswith("auto: ") and ("tensorrt" in reason or "GPU" in reason)
        assert lines["compute"].split()[1] == "fp32:" and "KV cache held in fp32" in lines["compute"]
        assert lines["weights"].split()[1:3] == ["fp16", "at"]  # the last "weights" line: after the build
        kv = Engine.load(tmp_path / "eng").new_cache(2).nbytes
        assert f"KV cache {kv / 2**20:.0f} MiB (2 rows x 64 tokens)" in lines["resident"]
    explicit = run_build(exports["fp16"], tmp_path / "eng2")
    assert "backend         onnxruntime (--backend onnxruntime)" in explicit.stderr


def test_cli_reports_disagreement_in_one_line_and_writes_nothing(onnx_dir, tmp_path):
    edit_config(onnx_dir, kv_cache_dtype="fp8")
    result = run_build(onnx_dir, tmp_path / "eng")
    assert_one_line_error(result, "KV cache dtype disagrees")
    assert not (tmp_path / "eng").exists()


def test_cli_failure_inside_the_build_leaves_no_partial_engine_dir(onnx_dir, tmp_path):
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Bogus", ["inputs_embeds"], ["bogus"], domain="trt_edgellm"))
    onnx.save(model, str(path))
    result = run_build(onnx_dir, tmp_path / "eng")
    assert_one_line_error(result, "Bogus")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm"]  # no ENG, no temp sibling


def test_cli_rejects_an_engine_dir_as_onnx_dir_and_spec_flags(onnx_dir, tmp_path):
    assert_one_line_error(run_build(onnx_dir, tmp_path / "eng", "--specBase"), "--specBase", "found 'llm'")
    assert_one_line_error(run_build(onnx_dir, tmp_path / "eng", "--specDraft"), "--specDraft", "found 'llm'")
    edit_config(onnx_dir, builder_config={"backend": "onnxruntime"})
    assert_one_line_error(run_build(onnx_dir, tmp_path / "eng"), "engine dir")
    assert not (tmp_path / "eng").exists()


def test_cli_tensorrt_without_tensorrt_is_a_clear_error(onnx_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; TensorRT may be too")
    result = run_cli(llm_build, "--onnxDir", onnx_dir, "--engineDir", tmp_path / "eng", "--backend", "tensorrt")
    assert_one_line_error(result, "--backend tensorrt")
    backend, reason = resolve_backend("auto")
    assert backend == "onnxruntime" and reason.startswith("auto: ")
    result = run_cli(llm_build, "--onnxDir", onnx_dir, "--engineDir", tmp_path / "eng", "--backend", "onnxruntime",
                     "--cpuWeights", "sometimes")
    assert result.exit_code == 2 and "--cpuWeights" in result.stderr
