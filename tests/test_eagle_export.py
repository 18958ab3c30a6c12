"""EAGLE3 export: the base (`--eagle-base`) and draft graphs against independent references.

The exported graphs run in `onnx.reference.ReferenceEvaluator` with the AttentionPlugin's torch reference (the graph as
TensorRT would run it). The base is compared with `transformers`: `hidden_states` with `output_hidden_states`, and
each node of a token tree with a plain causal run over the prompt plus that node's root-to-node path. The draft is
compared with the torch draft forward of `quantization/eagle3.py`, also per tree path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import hf_model, run_cli
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import rope_table
from test_quantization_draft import DRAFT_VOCAB, TARGET_LAYERS, make_draft
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from contract.atomic import MARKER
from contract.embedding import EMBEDDING_FP8, read_embedding_sidecar
from llm_loader.export_all_cli import export, main
from plugins.attention.reference import AttentionPlugin
from plugins.attention.tree_mask import ancestors_mask, causal_mask, pack_tree_mask
from quantization import eagle3

BASE_LAYERS = 6
PROMPTS = (5, 3)  # prompt lengths of the two rows (row 1 right-padded in the prefill)
TREES = ([-1, 0, 0, 1, 1, 2], [-1, 0, 1, 0])  # parent of each tree node, per row


@pytest.fixture
def base(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_hidden_layers=BASE_LAYERS)


def path_of(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def tree_feeds(trees, starts, seq: int):
    """attention_mask, attention_pos_id and context_lengths of right-padded trees over prompts of `starts` tokens."""
    visible = np.zeros((len(trees), seq, seq), bool)
    pos = np.zeros((len(trees), seq), np.int32)
    for b, parents in enumerate(trees):
        visible[b, : len(parents), : len(parents)] = ancestors_mask(parents)
        pos[b, : len(parents)] = [starts[b] + len(path_of(parents, i)) - 1 for i in range(len(parents))]
    return pack_tree_mask(visible), pos, np.array([len(t) for t in trees], np.int32)


def run(session, feeds: dict, outputs: list[str]):
    return dict(zip(outputs, session.run(outputs, feeds)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_base_graph_matches_transformers_on_a_tree(base, tmp_path):
    """Prefill (causal mask) then one tree call: logits and hidden_states of every node against HF runs of
    prompt + the node's path; hidden_states of the prompt against HF output_hidden_states."""
    draft = make_draft(tmp_path / "draft")
    llm = export(base, tmp_path / "out", eagle_base=True, eagle_draft_dir=draft)
    config = json.loads((llm / "config.json").read_text())
    assert (config["spec_decode_type"], config["engine_role"]) == ("eagle3", "base")
    assert config["eagle_hidden_state_layers"] == TARGET_LAYERS
    table = read_embedding_sidecar(llm / "embedding.safetensors").table
    model = hf_model(base)
    session = ReferenceEvaluator(str(llm / "model.onnx"), new_ops=[AttentionPlugin])
    h, capacity = config["hidden_size"], 16
    kv = (2, 2, config["num_key_value_heads"], capacity, config["head_dim"])
    names = ["logits", "hidden_states"] + [f"present_key_values_{i}" for i in range(BASE_LAYERS)]
    torch.manual_seed(0)
    prompt = torch.randint(0, config["vocab_size"], (2, max(PROMPTS)))
    rope = rope_table(model, capacity)

    seq = max(PROMPTS)
    out = run(session, {
        "inputs_embeds": table[prompt].numpy(), "context_lengths": np.array(PROMPTS, np.int32),
        "kvcache_start_index": np.zeros(2, np.int32), "last_token_ids": np.array([[p - 1] for p in PROMPTS]),
        "rope_rotary_cos_sin": rope, "attention_mask": causal_mask(2, seq),
        "attention_pos_id": np.tile(np.arange(seq, dtype=np.int32), (2, 1)),
        **{f"past_key_values_{i}": np.zeros(kv, np.float16) for i in range(BASE_LAYERS)}}, names)
    assert out["hidden_states"].dtype == np.float16 and out["hidden_states"].shape == (2, seq, 3 * h)
    for b, n in enumerate(PROMPTS):
        with torch.no_grad():
            states = model(prompt[b : b + 1, :n], output_hidden_states=True).hidden_states
        want = torch.cat([states[i][0] for i in TARGET_LAYERS], -1).numpy()
        assert relative_error(out["hidden_states"][b, :n].astype(np.float32), want) < 5e-3

    tree_seq = max(len(t) for t in TREES)
    mask, pos, lengths = tree_feeds(TREES, PROMPTS, tree_seq)
    tokens = torch.randint(0, config["vocab_size"], (2, tree_seq))
    step = run(session, {
        "inputs_embeds": table[tokens].numpy(), "context_lengths": lengths,
        "kvcache_start_index": np.array(PROMPTS, np.int32), "last_token_ids": np.tile(np.arange(tree_seq), (2, 1)),
        "rope_rotary_cos_sin": rope, "attention_mask": mask, "attention_pos_id": pos,
        **{f"past_key_values_{i}": out[f"present_key_values_{i}"] for i in range(BASE_LAYERS)}}, names)
    for b, parents in enumerate(TREES):
        for i in range(len(parents)):
            ids = torch.cat([prompt[b, : PROMPTS[b]], tokens[b, path_of(parents, i)]])[None]
            with torch.no_grad():
                hf = model(ids, output_hidden_states=True)
            want_logits = hf.logits[0, -1].numpy()
            assert relative_error(step["logits"][b, i], want_logits) < 5e-3
            assert step["logits"][b, i].argmax() == want_logits.argmax()
            want_hidden = torch.cat([hf.hidden_states[k][0, -1] for k in TARGET_LAYERS]).numpy()
            assert relative_error(step["hidden_states"][b, i].astype(np.float32), want_hidden) < 5e-3


def test_base_graph_contract(tiny_checkpoint, tmp_path):
    """Default target layers [2, N//2, N-4]; tree inputs on every AttentionPlugin; FP8 embedding unchanged."""
    base = tiny_checkpoint("qwen3", num_hidden_layers=10)
    llm = export(base, tmp_path / "out", eagle_base=True, fp8_embedding=True)
    config = json.loads((llm / "config.json").read_text())
    assert config["eagle_hidden_state_layers"] == [2, 5, 6]
    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(inputs["attention_mask"]) == ["batch", "seq_len", "mask_words"]
    assert inputs["attention_mask"].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert dims(inputs["attention_pos_id"]) == ["batch", "seq_len"]
    assert dims(inputs["last_token_ids"]) == ["batch", "num_selected"]
    hidden = next(o for o in model.graph.output if o.name == "hidden_states")
    assert dims(hidden) == ["batch", "seq_len", 3 * 64] and hidden.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert len(plugins) == 10
    for node in plugins:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["enable_tree_attention"] == 1
        assert list(node.input[-2:]) == ["attention_mask", "attention_pos_id"] and len(node.input) == 9  # qk-norm
    assert read_embedding_sidecar(llm / "embedding.safetensors").format == EMBEDDING_FP8


def torch_draft_path(draft: eagle3.Eagle3Draft, embeds: torch.Tensor, hidden: torch.Tensor):
    """The torch draft over one causal sequence from position 0, given h (= fc(aux) + from_draft) per token:
    (logits, pre-norm hidden) at every position."""
    positions = torch.arange(embeds.shape[1])[None]
    cos, sin = draft.rotary(hidden, positions)
    out = draft.midlayer(embeds, hidden, cos, sin)
    return draft.lm_head(draft.norm(out)), out


def test_draft_graph_matches_the_torch_draft(tmp_path, smollm2_checkpoint):
    draft_dir = make_draft(tmp_path / "draft")
    llm = export(draft_dir, tmp_path / "out")
    assert sorted(p.name for p in llm.iterdir()) == sorted([MARKER, "config.json", "d2t.safetensors", "model.onnx",
                                                           "model.onnx.data"])
    config = json.loads((llm / "config.json").read_text())
    assert (config["engine_role"], config["spec_decode_type"], config["kv_cache_dtype"]) == ("draft", "eagle3", "fp16")
    assert config["draft_vocab_size"] == DRAFT_VOCAB and config["base_model_hidden_size"] == 3 * 64
    assert config["eagle3_config"] == {"target_layer_ids": TARGET_LAYERS, "num_target_layers": 3}
    with safe_open(str(llm / "d2t.safetensors"), "pt") as f:
        d2t = f.get_tensor("d2t")
    assert d2t.dtype == torch.int32 and torch.equal(d2t.long(), load_file(draft_dir / "model.safetensors")["d2t"])

    tensors = eagle3.read_draft_tensors(draft_dir)
    dconfig = eagle3.read_draft_config(draft_dir)
    draft = eagle3.build_draft(dconfig, tensors, 64, 3, draft_dir)
    session = ReferenceEvaluator(str(llm / "model.onnx"), new_ops=[AttentionPlugin])
    names = ["logits", "hidden_states", "present_key_values_0"]
    capacity, seq = 16, 5
    rotary = LlamaRotaryEmbedding(draft.rotary.config)
    cos, sin = rotary(torch.zeros(1), torch.arange(capacity)[None])
    rope = torch.cat([cos[..., :8], sin[..., :8]], -1).numpy()
    torch.manual_seed(2)
    embeds, aux = torch.randn(2, seq, 64).half(), (torch.randn(2, seq, 3 * 64) * 2).half()
    kv = np.zeros((2, 2, 2, capacity, 16), np.float16)
    # prefill: hidden_states_input = the base's hidden states, hidden_states_from_draft zero
    out = run(session, {
        "inputs_embeds": embeds.numpy(), "hidden_states_input": aux.numpy(),
        "hidden_states_from_draft": np.zeros((2, seq, 64), np.float16), "context_lengths": np.array([5, 4], np.int32),
        "kvcache_start_index": np.zeros(2, np.int32), "last_token_ids": np.tile(np.arange(seq), (2, 1)),
        "rope_rotary_cos_sin": rope, "attention_mask": causal_mask(2, seq),
        "attention_pos_id": np.tile(np.arange(seq, dtype=np.int32), (2, 1)), "past_key_values_0": kv}, names)
    assert out["logits"].shape == (2, seq, DRAFT_VOCAB) and out["logits"].dtype == np.float32
    with torch.no_grad():
        want = draft(embeds.float(), aux.float())
        fc = draft.fc(aux.float())
        _, want_hidden = torch_draft_path(draft, embeds.float(), fc)
    for b, n in enumerate([5, 4]):
        assert relative_error(out["logits"][b, :n], want[b, :n].numpy()) < 1e-2
        assert (out["logits"][b, :n].argmax(-1) == want[b, :n].argmax(-1).numpy()).all()
        assert relative_error(out["hidden_states"][b, :n].astype(np.float32), want_hidden[b, :n].numpy()) < 1e-2

    # a tree call over the cached prompts: hidden_states_input zero, hidden_states_from_draft = the parent's hidden
    tree_seq = max(len(t) for t in TREES)
    starts = [5, 4]
    mask, pos, lengths = tree_feeds(TREES, starts, tree_seq)
    tree_embeds = torch.randn(2, tree_seq, 64).half()
    from_draft = torch.randn(2, tree_seq, 64).half()
    step = run(session, {
        "inputs_embeds": tree_embeds.numpy(), "hidden_states_input": np.zeros((2, tree_seq, 3 * 64), np.float16),
        "hidden_states_from_draft": from_draft.numpy(), "context_lengths": lengths,
        "kvcache_start_index": np.array(starts, np.int32), "last_token_ids": np.tile(np.arange(tree_seq), (2, 1)),
        "rope_rotary_cos_sin": rope, "attention_mask": mask, "attention_pos_id": pos,
        "past_key_values_0": out["present_key_values_0"]}, names)
    for b, parents in enumerate(TREES):
        for i in range(len(parents)):
            path = path_of(parents, i)
            e = torch.cat([embeds[b, : starts[b]], tree_embeds[b, path]]).float()[None]
            hid = torch.cat([fc[b, : starts[b]], from_draft[b, path].float()])[None]
            with torch.no_grad():
                logits, hidden = torch_draft_path(draft, e, hid)
            assert relative_error(step["logits"][b, i], logits[0, -1].numpy()) < 1e-2
            assert relative_error(step["hidden_states"][b, i].astype(np.float32), hidden[0, -1].numpy()) < 1e-2


def _cli(args: list[str]) -> int:
    return main([str(a) for a in args])


def test_quantized_draft_exports(base, tmp_path):
    """A draft written by `python -m quantization draft` exports with FP8 linears (lm_head fp16)."""
    from quantization.cli import main as quantize

    draft = make_draft(tmp_path / "draft")
    texts = tmp_path / "calib.jsonl"
    texts.write_text(json.dumps({"text": "To be, or not to be, that is the question."}))
    result = run_cli(quantize, "draft", "--base_model_dir", base, "--draft_model_dir", draft, "--output_dir",
                     tmp_path / "q", "--text_dataset", texts, "--num_samples", "1", "--max_seq_len", "16",
                     "--batch_size", "1")
    assert result.exit_code == 0, result.stderr
    llm = export(tmp_path / "q", tmp_path / "out")
    config = json.loads((llm / "config.json").read_text())
    assert config["weight_format"] == "fp8" and config["engine_role"] == "draft"
    graph = onnx.load(str(llm / "model.onnx"), load_external_data=False).graph
    fp8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert "fc.weight" in fp8 and "midlayer.self_attn.q_proj.weight" in fp8 and "lm_head.weight" not in fp8


def _draft_hidden_32(base, tmp_path):
    return ["--eagle-base", "--eagle-draft-dir", make_draft(tmp_path / "draft", hidden=32, base_hidden=32)], "hidden_size"


def _draft_bad_layers(base, tmp_path):
    draft = make_draft(tmp_path / "draft")
    config = json.loads((draft / "config.json").read_text())
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 3, BASE_LAYERS]
    (draft / "config.json").write_text(json.dumps(config))
    return ["--eagle-base", "--eagle-draft-dir", draft], f"expected decoder-layer indices in [0, {BASE_LAYERS})"


def _not_a_draft(base, tmp_path):
    return ["--eagle-base", "--eagle-draft-dir", base], "expected an EAGLE3 draft"


def _draft_dir_alone(base, tmp_path):
    return ["--eagle-draft-dir", make_draft(tmp_path / "draft")], "expected together with --eagle-base"


def _draft_architectures_a_number(base, tmp_path):
    draft = make_draft(tmp_path / "draft")
    config = json.loads((draft / "config.json").read_text())
    del config["draft_vocab_size"]
    (draft / "config.json").write_text(json.dumps({**config, "architectures": 3}))
    return ["--eagle-base", "--eagle-draft-dir", draft], "expected an EAGLE3 draft"


@pytest.mark.parametrize("make", [_draft_hidden_32, _draft_bad_layers, _not_a_draft, _draft_dir_alone,
                                  _draft_architectures_a_number])
def test_base_errors(base, tmp_path, capsys, make):
    flags, message = make(base, tmp_path)
    assert _cli([base, tmp_path / "out", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def _d2t_out_of_range(draft: Path):
    tensors = load_file(draft / "model.safetensors")
    tensors["d2t"][3] = 10**6
    save_file(tensors, draft / "model.safetensors")
    return [], "tensor d2t: expected offsets with id + d2t[id] in [0, 49152)"


def _missing_fc(draft: Path):
    tensors = load_file(draft / "model.safetensors")
    del tensors["fc.weight"]
    save_file(tensors, draft / "model.safetensors")
    return [], "expected EAGLE3 draft tensor 'fc.weight'"


def _fc_one_dimensional(draft: Path):
    tensors = load_file(draft / "model.safetensors")
    tensors["fc.weight"] = tensors["fc.weight"][0].clone()
    save_file(tensors, draft / "model.safetensors")
    return [], "tensor fc.weight: expected [64, k * 64]"


def _fc_without_inputs(draft: Path):
    tensors = load_file(draft / "model.safetensors")
    tensors["fc.weight"] = tensors["fc.weight"][:, :0].contiguous()
    save_file(tensors, draft / "model.safetensors")
    return [], "tensor fc.weight: expected [64, k * 64]"


def _layer_ids(ids):
    def make(draft: Path):
        config = json.loads((draft / "config.json").read_text())
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = ids
        (draft / "config.json").write_text(json.dumps(config))
        return [], f"target layer ids: expected 3 non-negative integers (fc.weight reads 3 base hidden states), " \
                   f"found {ids if isinstance(ids, list) else [ids]}"
    return make


@pytest.mark.parametrize("make", [_d2t_out_of_range, _missing_fc, lambda d: (["--fp8-embedding"], "--fp8-embedding"),
                                  lambda d: (["--eagle-base"], "--eagle-base: expected no such flag"),
                                  _fc_one_dimensional, _fc_without_inputs, _layer_ids(5),
                                  _layer_ids([True, 1, 2])])
def test_draft_errors(tmp_path, capsys, make, smollm2_checkpoint):
    draft = make_draft(tmp_path / "draft")
    flags, message = make(draft)
    assert _cli([draft, tmp_path / "out", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_d2t_forms(tmp_path):
    """Offset (ours, and a reference file without metadata), direct by metadata, direct when only it fits, errors."""
    from contract.eagle3 import read_d2t_targets
    from contract.errors import InputError

    targets = torch.tensor([0, 5, 6, 90], dtype=torch.int64)
    offsets = (targets - torch.arange(4)).int()
    cases = [({"d2t": offsets}, {"form": "offset"}), ({"d2t": offsets}, None), ({"d2t": targets.int()}, {"form": "direct"})]
    for i, (tensors, meta) in enumerate(cases):
        save_file(tensors, tmp_path / f"{i}.safetensors", metadata=meta)
        assert torch.equal(read_d2t_targets(tmp_path / f"{i}.safetensors", 100, 4), targets)
    direct_only = torch.tensor([97, 98, 99, 3], dtype=torch.int32)  # as offsets, id 1 -> 99, id 2 -> 101: outside
    save_file({"d2t": direct_only}, tmp_path / "d.safetensors")
    assert read_d2t_targets(tmp_path / "d.safetensors", 100, 4).tolist() == [97, 98, 99, 3]
    direct = torch.tensor([5, 4, 3, 9], dtype=torch.int32)  # both readings fit; as offsets 5, 5, 5, 12 collide
    save_file({"d2t": direct}, tmp_path / "both.safetensors")
    assert read_d2t_targets(tmp_path / "both.safetensors", 100, 4).tolist() == [5, 4, 3, 9]
    save_file({"d2t": offsets}, tmp_path / "small.safetensors", metadata={"form": "offset"})
    with pytest.raises(InputError, match=r"base ids in \[0, 50\)"):
        read_d2t_targets(tmp_path / "small.safetensors", 50, 4)
    with pytest.raises(InputError, match=r"expected int32/int64 \[5\]"):
        read_d2t_targets(tmp_path / "0.safetensors", 100, 5)
