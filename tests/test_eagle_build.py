"""EAGLE3 builds: the base and the draft into one engine dir (role checks, layout, builder_config, pairing checks,
atomicity), the generation profiles with tree sizes, and the profiles against the real exported graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from helpers import make_tiny_checkpoint
from test_builder import assert_one_line_error, run_build
from test_quantization_draft import TARGET_LAYERS, make_draft

from builder.detect import detect
from builder.profiles import Limits, ModelDims, llm_profiles
from builder.trt_graph import check_profiles
from contract import engine_dir as engine_dir_mod
from contract.atomic import MARKER
from contract.engine_dir import load_engine_config
from contract.errors import InputError
from contract.graph_io import (
    HIDDEN_STATES_FROM_DRAFT,
    HIDDEN_STATES_INPUT,
    ROPE_COS_SIN,
)
from llm_loader.export_all_cli import export

LIMITS = Limits(max_batch_size=4, max_input_len=1024, max_kv_cache_capacity=4096)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """A tiny 6-layer llama exported as an EAGLE3 base for a random draft (and with the default layers), the draft,
    and a vanilla export."""
    root = tmp_path_factory.mktemp("eagle")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint, num_hidden_layers=6)
    draft = make_draft(root / "draft")
    return {"base": export(ckpt, root / "base", eagle_base=True, eagle_draft_dir=draft),
            "base_default": export(ckpt, root / "base_default", eagle_base=True),
            "draft": export(draft, root / "draft_out"), "vanilla": export(ckpt, root / "vanilla")}


def dims_of(onnx_dir: Path) -> ModelDims:
    found = detect(onnx_dir)
    return ModelDims(found.num_layers, found.hidden_size, found.num_kv_heads, found.head_dim, found.rotary_dim,
                     tree=found.engine_role != "llm", draft_hidden_input=found.config.get("base_model_hidden_size"))


def test_tree_profiles():
    dims = ModelDims(num_layers=1, hidden_size=576, num_kv_heads=3, head_dim=64, rotary_dim=64, tree=True,
                     draft_hidden_input=1728)
    context, generation = llm_profiles(LIMITS, dims, gen_tokens=60)
    assert generation.shapes["inputs_embeds"] == ((1, 1, 576), (4, 60, 576), (4, 60, 576))
    assert generation.shapes["attention_mask"] == ((1, 1, 1), (4, 60, 2), (4, 60, 2))
    assert generation.shapes["attention_pos_id"] == ((1, 1), (4, 60), (4, 60))
    assert generation.shapes["last_token_ids"] == ((1, 1), (4, 60), (4, 60))
    assert generation.shapes["hidden_states_input"] == ((1, 1, 1728), (4, 60, 1728), (4, 60, 1728))
    assert generation.shapes["hidden_states_from_draft"] == ((1, 1, 576), (4, 60, 576), (4, 60, 576))
    # a prefill passes the causal mask of up to max_input_len tokens (contracts.md 2.2)
    assert context.shapes["attention_mask"] == ((1, 1, 1), (4, 512, 16), (4, 1024, 32))
    assert context.shapes["last_token_ids"] == ((1, 1), (4, 1), (4, 1))
    for profile in (context, generation):
        for name, (lo, opt, hi) in profile.shapes.items():
            assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)), (profile.name, name)


@pytest.mark.parametrize("which", ["base", "draft"])
def test_tree_profiles_name_exactly_the_graph_inputs(exports, which):
    model = onnx.load(str(exports[which] / "model.onnx"), load_external_data=False)
    check_profiles(model, llm_profiles(Limits(2, 16, 64), dims_of(exports[which]), gen_tokens=8))


def test_detect_roles(exports):
    base, draft = detect(exports["base"]), detect(exports["draft"])
    assert (base.engine_role, draft.engine_role) == ("base", "draft")
    assert draft.embedding_format is None and draft.num_layers == 1
    assert f"layers {TARGET_LAYERS}" in base.summary() and "draft vocab 512" in draft.summary()


def test_base_and_draft_share_one_engine_dir(exports, tmp_path):
    eng = tmp_path / "eng"
    first = run_build(exports["base"], eng, "--specBase", "--maxVerifyTreeSize", "12")
    assert first.exit_code == 0, first.stderr
    assert "role            base" in first.stderr and "tree size       12" in first.stderr
    second = run_build(exports["draft"], eng, "--specDraft", "--maxDraftTreeSize", "9", "--maxBatchSize", "2")
    assert second.exit_code == 0, second.stderr
    assert "adds to the base already there" in second.stderr
    assert sorted(p.name for p in eng.iterdir()) == sorted([
        "base_config.json", "spec_base.onnx", "spec_base.onnx.data", "embedding.onnx", "embedding.onnx.data",
        "embedding.safetensors",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "draft_config.json", "spec_draft.onnx", "spec_draft.onnx.data", "d2t.safetensors", MARKER])
    base, draft = load_engine_config(eng, "base"), load_engine_config(eng, "draft")
    assert base["builder_config"]["spec_base"] and not base["builder_config"]["spec_draft"]
    assert base["builder_config"]["max_verify_tree_size"] == 12 and "max_draft_tree_size" not in base["builder_config"]
    assert draft["builder_config"]["spec_draft"] and draft["builder_config"]["max_draft_tree_size"] == 9
    assert draft["builder_config"]["embedding_format"] is None and draft["builder_config"]["max_batch_size"] == 2
    engine_dir_mod.check_spec_pair(base, draft, "test")
    with pytest.raises(InputError, match="run it with --specDecode"):
        load_engine_config(eng)

    # rebuilding the base keeps the draft (the same files, not copies of other bytes)
    before = (eng / "spec_draft.onnx.data").read_bytes()
    again = run_build(exports["base"], eng, "--specBase")
    assert again.exit_code == 0, again.stderr
    assert (eng / "spec_draft.onnx.data").read_bytes() == before and (eng / "draft_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_draft_first_then_base(exports, tmp_path):
    eng = tmp_path / "eng"
    assert run_build(exports["draft"], eng, "--specDraft").exit_code == 0
    with pytest.raises(InputError, match="no EAGLE3 base engine"):
        load_engine_config(eng, "base")
    result = run_build(exports["base"], eng, "--specBase")
    assert result.exit_code == 0, result.stderr
    assert "adds to the draft already there" in result.stderr
    assert {"spec_base.onnx", "spec_draft.onnx", "d2t.safetensors"} <= {p.name for p in eng.iterdir()}


@pytest.mark.parametrize("onnx_key, flags, fragments", [
    ("base", [], ["no --specBase/--specDraft", "found 'base'", "--specBase"]),
    ("draft", ["--specBase"], ["--specBase", "found 'draft'", "--specDraft"]),
    ("base", ["--specBase", "--specDraft"], ["at most one"]),
    ("base", ["--specBase", "--maxVerifyTreeSize", "65"], ["--maxVerifyTreeSize", "found 65"]),
    ("draft", ["--specDraft", "--maxDraftTreeSize", "0"], ["--maxDraftTreeSize"]),
])
def test_role_and_tree_errors(exports, tmp_path, onnx_key, flags, fragments):
    assert_one_line_error(run_build(exports[onnx_key], tmp_path / "eng", *flags), *fragments)
    assert not (tmp_path / "eng").exists()


def test_mismatched_pair_is_refused_and_leaves_the_engine_dir_alone(exports, tmp_path):
    """A base exported with the default layers (not the draft's) and the draft: the second build fails, ENG keeps
    exactly the base."""
    eng = tmp_path / "eng"
    assert run_build(exports["base_default"], eng, "--specBase").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in eng.iterdir()}
    assert_one_line_error(run_build(exports["draft"], eng, "--specDraft"), "target layers", str(TARGET_LAYERS))
    assert {p.name: p.stat().st_mtime_ns for p in eng.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_config_and_graph_must_agree_on_the_role(exports, tmp_path):
    onnx_dir = Path(shutil.copytree(exports["base"], tmp_path / "llm"))
    config = json.loads((onnx_dir / "config.json").read_text())
    (onnx_dir / "config.json").write_text(json.dumps({**config, "engine_role": "llm"}))
    with pytest.raises(InputError, match="config.json says 'llm', model.onnx's inputs and outputs say 'base'"):
        detect(onnx_dir)


def test_spec_build_into_a_vanilla_engine_dir_is_refused(exports, tmp_path):
    eng = tmp_path / "eng"
    assert run_build(exports["vanilla"], eng).exit_code == 0
    assert_one_line_error(run_build(exports["base"], eng, "--specBase"), "found a vanilla engine")
    assert (eng / "config.json").exists() and not (eng / "base_config.json").exists()


@pytest.mark.parametrize("which", ["base", "draft"])
@pytest.mark.parametrize("batch, seq, selected", [(2, 8, 8), (2, 1, 1), (1, 12, 1), (2, 3, 1)])
def test_tensorrt_tree_bindings_fit_the_graph_and_profile(exports, which, batch, seq, selected):
    """The inputs `Engine.forward_tree` gives the TensorRT backend (fp16 hidden states), bound as TensorRTBackend
    binds them: the graph's names and dtypes, within the profile it picks (generation up to the tree size 8)."""
    import numpy as np
    import torch

    from contract.kv import KvDtype
    from plugins.attention.tree_mask import causal_mask
    from runtime.engine import tree_inputs
    from runtime.kv_cache import KvLayout
    from runtime.tensorrt_backend import llm_bindings, new_cache_layers, profile_for

    found, limits = detect(exports[which]), Limits(2, 16, 64)
    dims = dims_of(exports[which])
    extra = {}
    if which == "draft":
        extra = {HIDDEN_STATES_INPUT: np.zeros((batch, seq, dims.draft_hidden_input)),
                 HIDDEN_STATES_FROM_DRAFT: np.zeros((batch, seq, dims.hidden_size))}
    starts = np.zeros(batch, np.int32)
    inputs = tree_inputs(np.zeros((batch, seq, dims.hidden_size), np.float16), np.full(batch, seq, np.int32), starts,
                         np.zeros((batch, selected), np.int64), causal_mask(batch, seq),
                         np.zeros((batch, seq), np.int32), extra, np.float16)
    layers = new_cache_layers(batch, KvLayout(dims.num_layers, dims.num_kv_heads, 64, dims.head_dim,
                                              KvDtype(found.kv_cache_dtype)), "cpu")
    bound, _ = llm_bindings({ROPE_COS_SIN: np.zeros((1, 64, dims.rotary_dim), np.float32)}, inputs, layers)
    graph = onnx.load(str(exports[which] / "model.onnx"), load_external_data=False).graph
    assert set(bound) == {i.name for i in graph.input}
    profile = llm_profiles(limits, dims, gen_tokens=8)[profile_for(seq, 8)]
    for value in graph.input:
        array = bound[value.name]
        dtype = array.dtype if isinstance(array, np.ndarray) else {torch.float16: np.float16}[array.dtype]
        assert onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) == value.type.tensor_type.elem_type, value.name
        lo, _, hi = profile.shapes[value.name]
        assert all(a <= n <= b for a, n, b in zip(lo, array.shape, hi, strict=True)), (value.name, array.shape)


@pytest.mark.parametrize("onnx_key, field, value, fragment", [
    ("base", "eagle_hidden_state_layers", 5, "eagle_hidden_state_layers: expected a list of layer indices"),
    ("base", "eagle_hidden_state_layers", [2, 99], "in [0, 6]"),
    ("draft", "base_model_hidden_size", None, "base_model_hidden_size: expected a positive integer"),
    ("draft", "draft_vocab_size", "8", "draft_vocab_size: expected a positive integer"),
    ("draft", "eagle3_config", [1], "eagle3_config: expected an object"),
    ("base", "engine_role", "verifier", "engine_role: expected one of"),
])
def test_tampered_eagle_fields_are_one_line_errors(exports, tmp_path, onnx_key, field, value, fragment):
    """In the ONNX dir being built, and in the other role's config already in ENG (read before pairing)."""
    onnx_dir = Path(shutil.copytree(exports[onnx_key], tmp_path / "llm"))
    config = json.loads((onnx_dir / "config.json").read_text())
    (onnx_dir / "config.json").write_text(json.dumps({**config, field: value}))
    flag = "--specBase" if onnx_key == "base" else "--specDraft"
    assert_one_line_error(run_build(onnx_dir, tmp_path / "eng", flag), fragment)
    assert not (tmp_path / "eng").exists()
    if field == "engine_role":
        return
    eng = tmp_path / "eng2"
    assert run_build(exports[onnx_key], eng, flag).exit_code == 0
    name = engine_dir_mod.CONFIG_FILES[onnx_key]
    (eng / name).write_text(json.dumps({**json.loads((eng / name).read_text()), field: value}))
    other, other_flag = ("draft", "--specDraft") if onnx_key == "base" else ("base", "--specBase")
    before = sorted(p.name for p in eng.iterdir())
    assert_one_line_error(run_build(exports[other], eng, other_flag), fragment)
    assert sorted(p.name for p in eng.iterdir()) == before


def test_other_side_file_that_leaves_the_engine_dir_is_refused(exports, tmp_path):
    eng = tmp_path / "eng"
    assert run_build(exports["draft"], eng, "--specDraft").exit_code == 0
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"not yours")
    (eng / "d2t.safetensors").unlink()
    (eng / "d2t.safetensors").symlink_to(outside)
    assert_one_line_error(run_build(exports["base"], eng, "--specBase"), "d2t.safetensors")
    assert (eng / "d2t.safetensors").is_symlink() and outside.read_bytes() == b"not yours"


@pytest.mark.parametrize("tamper, fragment", [
    ("config", "draft_config.json: num_hidden_layers 2 disagrees with"),
    ("graph", "spec_draft.onnx: expected the LLM engine (an ONNX model), found a file onnx cannot parse"),
])
def test_other_side_engine_that_disagrees_with_its_config_is_refused(exports, tmp_path, tamper, fragment):
    """The draft's ONNX Runtime engine already in ENG is checked by its backend before the base build keeps it."""
    eng = tmp_path / "eng"
    assert run_build(exports["draft"], eng, "--specDraft").exit_code == 0
    if tamper == "config":
        path = eng / "draft_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 2}))
    else:
        (eng / "spec_draft.onnx").write_bytes(b"not a graph")
    before = {p.name: p.read_bytes() for p in eng.iterdir()}
    assert_one_line_error(run_build(exports["base"], eng, "--specBase"), fragment)
    assert {p.name: p.read_bytes() for p in eng.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
