"""The pipeline against a hostile user: bad inputs and faults at every stage.

The promise under test: one `error:` line and exit code 2 (130 for Ctrl-C), no traceback, nothing half-written,
nothing of the user's deleted or overwritten, nothing read from outside the directories the user named. The fuzz table
runs each CLI in process on a broken copy of a tiny model's checkpoint, export or engine dir, and checks the exit
code, a fragment of the error line, and that the workspace is exactly as it was (every file's size and mtime: nothing
written, nothing deleted). Real signals (SIGINT, SIGKILL) and two concurrent writers run the CLIs as subprocesses;
disk-full and read-only runs use a small tmpfs where this machine lets the tests mount one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from helpers import (
    REPO,
    export_and_build,
    make_tiny_checkpoint,
    run_cli,
    sigint_as_from_a_terminal,
)
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

from builder.cli import main as build_main
from contract import chat_template
from contract.atomic import MARKER, stale_siblings
from contract.errors import InputError
from llm_loader.export_all_cli import main as export_main
from quantization.cli import main as quantize_main
from runtime.cli import main as infer_main

TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"
COMMANDS = {"export": export_main, "build": build_main, "quantize": quantize_main, "infer": infer_main}
USER = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory, smollm2_checkpoint) -> dict[str, Path]:
    """A tiny llama checkpoint, its export and its ONNX Runtime engine (max_input_len 64): never edited."""
    root = tmp_path_factory.mktemp("base")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    onnx_dir, engine = export_and_build(ckpt, root, max_batch_size=4, max_input_len=64, max_kv_cache_capacity=128)
    return {"ckpt": ckpt, "onnx": onnx_dir, "engine": engine}


@dataclass
class Workspace:
    """A test's own directory with private copies of the base dirs, made on request."""

    path: Path
    base: dict[str, Path]

    def copy(self, key: str) -> Path:
        target = self.path / key
        if not target.exists():
            shutil.copytree(self.base[key], target)
        return target

    def edit_json(self, path: Path, **changes) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def cases(self, messages=USER, **settings) -> Path:
        path = self.path / "cases.json"
        path.write_text(json.dumps({"requests": [{"messages": messages}], "max_generate_length": 2, **settings}))
        return path

    def snapshot(self) -> dict[str, tuple]:
        """Every entry under the workspace (hidden ones too, links not followed): kind, size, mtime."""
        entries = {}
        for root, dirs, files in os.walk(self.path):
            for name in dirs + files:
                st = os.lstat(Path(root) / name)
                entries[str(Path(root, name).relative_to(self.path))] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns)
        return entries


@pytest.fixture
def ws(tmp_path, base) -> Workspace:
    return Workspace(tmp_path, base)


def run(command: str, argv: list[str]) -> tuple[int, str]:
    """A command in process: (exit code, stderr)."""
    result = run_cli(COMMANDS[command], *argv)
    return result.exit_code, result.stderr


def assert_one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def export_args(ws: Workspace, ckpt: Path | None = None, out: Path | None = None):
    return "export", [str(ckpt or ws.copy("ckpt")), str(out or ws.path / "out")]


def build_args(ws: Workspace, onnx_dir: Path | None = None, engine: Path | None = None):
    return "build", ["--onnxDir", str(onnx_dir or ws.copy("onnx")), "--engineDir", str(engine or ws.path / "eng"),
                     "--backend", "onnxruntime", "--maxInputLen", "32", "--maxKVCacheCapacity", "64"]


def infer_args(ws: Workspace, cases: Path | None = None, engine: Path | None = None, out: Path | None = None):
    return "infer", ["--engineDir", str(engine or ws.base["engine"]), "--inputFile", str(cases or ws.cases()),
                     "--outputFile", str(out or ws.path / "out.json")]


def quantize_args(ws: Workspace, ckpt: Path | None = None, out: Path | None = None):
    return "quantize", ["llm", "--model_dir", str(ckpt or ws.copy("ckpt")), "--output_dir", str(out or ws.path / "q"),
                        "--quantization", "fp8_pc"]


def outside_secret(ws: Workspace) -> Path:
    """A file outside every directory handed to a stage (stands in for /etc/shadow)."""
    secret = ws.path / "secret.txt"
    secret.write_text("root:$6$not-for-you")
    return secret


def link(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def edit_graph(path: Path, edit) -> None:
    model = onnx.load(str(path), load_external_data=False)
    edit(model.graph)
    onnx.save(model, str(path))


def io(graph, name: str):
    return next(v for v in [*graph.input, *graph.output] if v.name == name)


# --- 1. no data loss ---------------------------------------------------------------------------------------------

def engine_dir_with_notes(ws):
    eng = ws.path / "eng"
    eng.mkdir()
    (eng / "notes.txt").write_text("my notes")
    return build_args(ws, engine=eng)


def engine_dir_is_onnx_dir(ws):
    return build_args(ws, engine=ws.copy("onnx"))


def engine_dir_inside_onnx_dir(ws):
    return build_args(ws, engine=ws.copy("onnx") / "engine")


def engine_dir_contains_onnx_dir(ws):
    return build_args(ws, engine=ws.copy("onnx").parent)


def engine_dir_is_another_export(ws):
    other = ws.path / "other"
    shutil.copytree(ws.base["onnx"], other)
    return build_args(ws, engine=other)


def earlier_engine_dir_plus_user_file(ws):
    eng = ws.copy("engine")
    (eng / "notes.txt").write_text("mine")
    return build_args(ws, engine=eng)


def engine_dir_is_a_file(ws):
    (ws.path / "eng").write_text("a file")
    return build_args(ws)


def engine_dir_under_a_file(ws):
    (ws.path / "file").write_text("a file")
    return build_args(ws, engine=ws.path / "file" / "eng")


def engine_dir_is_a_symlink(ws):
    link(ws.path / "eng", ws.copy("engine"))
    return build_args(ws)


def export_over_user_files(ws):
    (ws.path / "out" / "llm").mkdir(parents=True)
    (ws.path / "out" / "llm" / "draft.md").write_text("mine")
    return export_args(ws)


def export_into_the_checkpoint(ws):
    return export_args(ws, out=ws.copy("ckpt"))


def quantize_over_user_files(ws):
    (ws.path / "q").mkdir()
    (ws.path / "q" / "results.csv").write_text("mine")
    return quantize_args(ws)


def quantize_into_the_checkpoint(ws):
    ckpt = ws.copy("ckpt")
    return quantize_args(ws, ckpt=ckpt, out=ckpt)


def output_file_is_the_input_file(ws):
    cases = ws.cases()
    return infer_args(ws, cases=cases, out=cases)


# --- 2. nothing outside the checkpoint ---------------------------------------------------------------------------

def checkpoint_template_links_outside(ws):
    ckpt = ws.copy("ckpt")
    link(ckpt / "chat_template.jinja", outside_secret(ws))
    return export_args(ws, ckpt)


def checkpoint_tokenizer_links_outside(ws):
    ckpt = ws.copy("ckpt")
    outside = ws.path / "tokenizer.json"
    shutil.move(ckpt / "tokenizer.json", outside)
    link(ckpt / "tokenizer.json", outside)
    return export_args(ws, ckpt)


def shard_index(ws, shard: str):
    ckpt = ws.copy("ckpt")
    names = list(load_file(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    return ckpt


def shard_index_names_parent_dir(ws):
    ckpt = shard_index(ws, "../elsewhere.safetensors")
    shutil.copy(ckpt / "model.safetensors", ws.path / "elsewhere.safetensors")
    return export_args(ws, ckpt)


def shard_index_names_absolute_path(ws):
    ckpt = shard_index(ws, str(ws.path / "elsewhere.safetensors"))
    shutil.copy(ckpt / "model.safetensors", ws.path / "elsewhere.safetensors")
    return export_args(ws, ckpt)


def checkpoint_weights_link_outside(ws):
    ckpt = ws.copy("ckpt")
    shutil.move(ckpt / "model.safetensors", ws.path / "model.safetensors")
    link(ckpt / "model.safetensors", ws.path / "model.safetensors")
    return export_args(ws, ckpt)


def checkpoint_generation_config_is_a_fifo(ws):
    ckpt = ws.copy("ckpt")
    (ckpt / "generation_config.json").unlink()
    os.mkfifo(ckpt / "generation_config.json")  # a reader would block forever
    return export_args(ws, ckpt)


def checkpoint_tokenizer_is_garbage(ws):
    ckpt = ws.copy("ckpt")
    (ckpt / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    return export_args(ws, ckpt)


def checkpoint_template_does_not_compile(ws):
    ckpt = ws.copy("ckpt")
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    return export_args(ws, ckpt)


def onnx_dir_tokenizer_links_outside(ws):
    onnx_dir = ws.copy("onnx")
    link(onnx_dir / "tokenizer_config.json", outside_secret(ws))
    return build_args(ws, onnx_dir)


def quantize_tokenizer_links_outside(ws):
    ckpt = ws.copy("ckpt")
    link(ckpt / "tokenizer_config.json", outside_secret(ws))
    return quantize_args(ws, ckpt)


def engine_tokenizer_links_outside(ws):
    eng = ws.copy("engine")
    link(eng / "tokenizer_config.json", outside_secret(ws))
    return infer_args(ws, engine=eng)


# --- 3. chat templates are bounded, and their errors are errors ---------------------------------------------------

def engine_with_template(ws, template: str):
    eng = ws.copy("engine")
    (eng / "chat_template.jinja").write_text(template)
    return eng


def template_nested_range_loops(ws):
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    return infer_args(ws, engine=engine_with_template(ws, loops))


def template_nested_list_loops(ws):  # small enough for every size bound, and no sandbox hook runs inside the loops
    loops = ("{% set x = [1] * 4000 %}"
             "{% for a in x %}{% for b in x %}{% for c in x %}{% endfor %}{% endfor %}{% endfor %}")
    return infer_args(ws, engine=engine_with_template(ws, loops))


def template_huge_string(ws):
    return infer_args(ws, engine=engine_with_template(ws, "{{ 'a' * 4000000000 }}"))


def template_doubling_string(ws):
    template = ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s }}")
    return infer_args(ws, engine=engine_with_template(ws, template))


def template_raises_for_role_order(ws):
    eng = engine_with_template(ws, (TEMPLATES / "alternating_roles.jinja").read_text())
    return infer_args(ws, engine=eng, cases=ws.cases([{"role": "assistant", "content": "first?"}]))


def template_includes(ws):
    return infer_args(ws, engine=engine_with_template(ws, "{% include 'other.jinja' %}"))


def template_escapes_the_sandbox(ws):
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    return infer_args(ws, engine=engine_with_template(ws, escape))


def template_python_error(ws):
    return infer_args(ws, engine=engine_with_template(ws, "{{ messages[0].content + 1 }}"))


# --- 4. no tracebacks ----------------------------------------------------------------------------------------------

def request_nested_deeply(ws):
    cases = ws.path / "cases.json"
    cases.write_text('{"requests": ' + "[" * 100000 + "]" * 100000 + "}")
    return infer_args(ws, cases=cases)


def request_nested_under_the_parser_limit(ws):  # json parses 500 levels; recursive code walking it would not
    cases = ws.path / "cases.json"
    cases.write_text('{"requests": [{"messages": [{"role": "user", "content": ' + "[" * 500 + "]" * 500 + "}]}]}")
    return infer_args(ws, cases=cases)


def checkpoint_config_nested_deeply(ws):
    ckpt = ws.copy("ckpt")
    (ckpt / "config.json").write_text('{"model_type": ' + "[" * 100000 + "]" * 100000 + "}")
    return export_args(ws, ckpt)


def onnx_config_nested_deeply(ws):
    onnx_dir = ws.copy("onnx")
    ws.edit_json(onnx_dir / "config.json", generation_config=json.loads("[" * 500 + "]" * 500))
    return build_args(ws, onnx_dir)


def request_number_too_long(ws):  # Python refuses to convert an integer literal of more than 4300 digits
    cases = ws.path / "cases.json"
    cases.write_text('{"top_k": ' + "9" * 5000 + ', "requests": [{"messages": [{"role": "user", "content": "a"}]}]}')
    return infer_args(ws, cases=cases)


def request_number_beyond_float(ws):
    return infer_args(ws, cases=ws.cases(temperature=10**400))


def request_logit_bias_key_too_long(ws):
    return infer_args(ws, cases=ws.cases(logit_bias={"9" * 5000: 1.0}))


def prompt_with_lone_surrogate(ws):
    cases = ws.path / "cases.json"
    cases.write_text('{"requests": [{"messages": [{"role": "user", "content": "abc\\ud800"}]}]}')
    return infer_args(ws, cases=cases)


def prompt_longer_than_the_engine_takes(ws):
    return infer_args(ws, cases=ws.cases([{"role": "user", "content": "word " * 2_000_000}]))


def model_onnx_truncated(ws):
    onnx_dir = ws.copy("onnx")
    data = (onnx_dir / "model.onnx").read_bytes()
    (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 2])
    return build_args(ws, onnx_dir)


def model_onnx_garbage(ws):
    onnx_dir = ws.copy("onnx")
    (onnx_dir / "model.onnx").write_bytes(b"\x0a\xff\xff\xff" * 1000)
    return build_args(ws, onnx_dir)


def model_onnx_data_truncated(ws):
    onnx_dir = ws.copy("onnx")
    with open(onnx_dir / "model.onnx.data", "r+b") as f:
        f.truncate(os.path.getsize(onnx_dir / "model.onnx.data") // 2)
    return build_args(ws, onnx_dir)


def external_location(location: str):
    def edit(graph):
        for entry in graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
    return edit


def external_data_absolute(ws):
    onnx_dir = ws.copy("onnx")
    edit_graph(onnx_dir / "model.onnx", external_location(str(onnx_dir / "model.onnx.data")))
    return build_args(ws, onnx_dir)


def external_data_parent_dir(ws):
    onnx_dir = ws.copy("onnx")
    shutil.copy(onnx_dir / "model.onnx.data", ws.path / "weights.data")
    edit_graph(onnx_dir / "model.onnx", external_location("../weights.data"))
    return build_args(ws, onnx_dir)


def external_data_symlink(ws):
    onnx_dir = ws.copy("onnx")
    shutil.move(onnx_dir / "model.onnx.data", onnx_dir / "real.data")
    link(onnx_dir / "model.onnx.data", onnx_dir / "real.data")
    return build_args(ws, onnx_dir)


def external_data_length_lies(ws):  # the dtype says 2 bytes per element, the entry claims 4
    def edit(graph):
        tensor = next(t for t in graph.initializer if t.data_type == TensorProto.FLOAT16 and t.dims)
        for entry in tensor.external_data:
            if entry.key == "length":
                entry.value = str(int(entry.value) * 2)
    onnx_dir = ws.copy("onnx")
    edit_graph(onnx_dir / "model.onnx", edit)
    return build_args(ws, onnx_dir)


def engine_config(ws, **changes):
    eng = ws.copy("engine")
    ws.edit_json(eng / "config.json", **changes)
    return infer_args(ws, engine=eng)


def engine_config_more_layers(ws):
    return engine_config(ws, num_hidden_layers=3)


def engine_config_layers_true(ws):
    return engine_config(ws, num_hidden_layers=True)


def engine_config_fewer_kv_heads(ws):
    return engine_config(ws, num_key_value_heads=1)


def engine_config_eos_outside_vocab(ws):
    return engine_config(ws, eos_token_id=[10**9])


def engine_config_hidden_size(ws):
    return engine_config(ws, hidden_size=128)


def engine_config_rope(**changes):
    """A case: the engine dir's config.json with RoPE fields changed after the build."""
    def case(ws):
        eng = ws.copy("engine")
        ws.edit_json(eng / "config.json", **changes)
        return infer_args(ws, engine=eng)
    case.__name__ = "engine_config_" + "_".join(f"{k}_{v!r}" for k, v in changes.items()).replace(" ", "")
    return case


def engine_config_capacity(ws):
    eng = ws.copy("engine")
    config = json.loads((eng / "config.json").read_text())
    config["builder_config"]["max_kv_cache_capacity"] = -1
    (eng / "config.json").write_text(json.dumps(config))
    return infer_args(ws, engine=eng)


def engine_config_capacity_huge(ws):
    eng = ws.copy("engine")
    config = json.loads((eng / "config.json").read_text())
    config["builder_config"]["max_kv_cache_capacity"] = 10**12
    (eng / "config.json").write_text(json.dumps(config))
    return infer_args(ws, engine=eng)


def engine_llm_onnx_garbage(ws):
    eng = ws.copy("engine")
    (eng / "llm.onnx").write_bytes(b"\x0a\xff\xff\xff" * 1000)
    return infer_args(ws, engine=eng)


def engine_llm_onnx_truncated(ws):
    eng = ws.copy("engine")
    with open(eng / "llm.onnx.data", "r+b") as f:
        f.truncate(100)
    return infer_args(ws, engine=eng)


# --- 5. the build checks every layer and every dim ----------------------------------------------------------------

def onnx_config(ws, **changes):
    onnx_dir = ws.copy("onnx")
    ws.edit_json(onnx_dir / "config.json", **changes)
    return build_args(ws, onnx_dir)


def config_kv_heads_disagree(ws):
    return onnx_config(ws, num_key_value_heads=1)


def config_heads_disagree(ws):
    return onnx_config(ws, num_attention_heads=8, head_dim=16)


def config_head_dim_disagrees(ws):
    return onnx_config(ws, head_dim=8)


def config_hidden_disagrees(ws):
    return onnx_config(ws, hidden_size=128)


def config_rotary_disagrees(ws):
    return onnx_config(ws, partial_rotary_factor=0.5)


def config_layers_disagree(ws):
    return onnx_config(ws, num_hidden_layers=3)


def config_layers_huge(ws):
    return onnx_config(ws, num_hidden_layers=10**12)


def one_layer_kv_fp8(binding: str):
    """A case: one layer's cache binding `binding` retyped to FP8, nothing else."""
    def case(ws):
        onnx_dir = ws.copy("onnx")
        edit_graph(onnx_dir / "model.onnx",
                   lambda g: io(g, binding).type.tensor_type.__setattr__("elem_type", TensorProto.FLOAT8E4M3FN))
        return build_args(ws, onnx_dir)
    case.__name__ = f"only_{binding}_fp8"
    return case


def one_layer_plugin_fp8(ws):
    def edit(graph):
        node = next(n for n in graph.node if n.name == "layers.1/attention")
        next(a for a in node.attribute if a.name == "enable_fp8_kv_cache").i = 1
    onnx_dir = ws.copy("onnx")
    edit_graph(onnx_dir / "model.onnx", edit)
    return build_args(ws, onnx_dir)


# --- 6. the exporter refuses configs that give a wrong model ------------------------------------------------------

def checkpoint_config(ws, **changes):
    ckpt = ws.copy("ckpt")
    ws.edit_json(ckpt / "config.json", **changes)
    return export_args(ws, ckpt)


def config_field(key: str, value):
    """A case: the checkpoint's config.json with `key` set to `value`."""
    def case(ws):
        return checkpoint_config(ws, **{key: value})
    case.__name__ = f"config_{key}_{value!r}".replace(" ", "")
    return case


def extra_layer_tensors(ws):
    ckpt = ws.copy("ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.7.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return export_args(ws, ckpt)


def bias_the_config_switches_off(ws):
    ckpt = ws.copy("ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"].clone()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return export_args(ws, ckpt)


def safetensors_dtype_lies(ws):  # the header says F32, the bytes hold F16
    ckpt = ws.copy("ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + size])
    name = next(n for n, v in header.items() if n != "__metadata__" and v["dtype"] == "F16")
    header[name]["dtype"] = "F32"
    text = json.dumps(header).encode().ljust(size)
    (ckpt / "model.safetensors").write_bytes(data[:8] + text[:size] + data[8 + size:])
    return export_args(ws, ckpt)


# --- 7. a TensorRT-Edge-LLM 0.11 export is named ------------------------------------------------------------------

def token_major_export(ws):
    """An ONNX dir shaped like a 0.11 export (reference section 2.9): token-major inputs, a paged pool."""
    onnx_dir = ws.path / "edgellm-0.11" / "llm"
    onnx_dir.mkdir(parents=True)
    config = json.loads((ws.base["onnx"] / "config.json").read_text())
    for key in ("contract_version", "producer", "weight_format", "generation_config"):
        config.pop(key)
    (onnx_dir / "config.json").write_text(json.dumps({**config, "edgellm_version": "0.11.0"}))
    vi = helper.make_tensor_value_info
    inputs = [vi("inputs_embeds", TensorProto.FLOAT16, ["tokens", 64]), vi("positions", TensorProto.INT32, ["tokens"]),
              vi("query_start_offsets", TensorProto.INT32, ["seqs_plus_1"]),
              vi("kv_page_table", TensorProto.INT32, ["seqs", 2, "pages"]),
              vi("past_key_values_0", TensorProto.FLOAT16, [2, "pages", 128, 2, 16])]
    graph = helper.make_graph([helper.make_node("Identity", ["inputs_embeds"], ["logits"])], "llm", inputs,
                              [vi("logits", TensorProto.FLOAT16, ["tokens", 64])])
    onnx.save(helper.make_model(graph), str(onnx_dir / "model.onnx"))
    shutil.copy(ws.base["onnx"] / "embedding.safetensors", onnx_dir)
    return build_args(ws, onnx_dir)


FUZZ = [
    # 1. no data loss
    (engine_dir_with_notes, "holding other files (notes.txt)"),
    (engine_dir_is_onnx_dir, "that it is it"),
    (engine_dir_inside_onnx_dir, "that it lies inside it"),
    (engine_dir_contains_onnx_dir, "that it contains it"),
    (engine_dir_is_another_export, "expected an engine dir to replace, found an ONNX dir"),
    (earlier_engine_dir_plus_user_file, "also holds files that run did not write (notes.txt)"),
    (engine_dir_is_a_file, "found a file"),
    (engine_dir_under_a_file, "is a file"),
    (engine_dir_is_a_symlink, "symbolic link"),
    (export_over_user_files, "holding other files (draft.md)"),
    (export_into_the_checkpoint, "that it lies inside it"),
    (quantize_over_user_files, "holding other files (results.csv)"),
    (quantize_into_the_checkpoint, "that it is it"),
    (output_file_is_the_input_file, "--outputFile"),
    # 2. nothing outside the checkpoint
    (checkpoint_template_links_outside, "chat_template.jinja: expected a tokenizer file inside"),
    (checkpoint_tokenizer_links_outside, "tokenizer.json: expected"),
    (shard_index_names_parent_dir, "found '../elsewhere.safetensors'"),
    (shard_index_names_absolute_path, "as a file name inside the directory"),
    (checkpoint_weights_link_outside, "model.safetensors: expected a safetensors shard inside"),
    (checkpoint_generation_config_is_a_fifo, "found a special file"),
    (checkpoint_tokenizer_is_garbage, "tokenizer.json: expected a tokenizers tokenizer.json"),
    (checkpoint_template_does_not_compile, "found a syntax error at line 1"),
    (onnx_dir_tokenizer_links_outside, "tokenizer_config.json: expected a tokenizer file inside"),
    (quantize_tokenizer_links_outside, "tokenizer_config.json: expected a checkpoint file inside"),
    (engine_tokenizer_links_outside, "tokenizer_config.json: expected a tokenizer file inside"),
    # 3. chat templates
    (template_nested_range_loops, "requests[0]: the chat template was stopped"),
    (template_nested_list_loops, "requests[0]: the chat template was stopped: it ran longer than the limit of 1 s"),
    (template_huge_string, "it repeats a value 4000000000 times"),
    (template_doubling_string, "concatenation would build more than"),
    (template_raises_for_role_order, "requests[0]: the chat template refused it: Conversation roles must alternate"),
    (template_includes, "a chat template must be self-contained"),
    (template_escapes_the_sandbox, "the sandbox forbids"),
    (template_python_error, "requests[0]: the chat template failed"),
    # 4. no tracebacks
    (request_nested_deeply, "cases.json: expected an input JSON file (JSON nested at most 64 levels)"),
    (request_nested_under_the_parser_limit, "nested at most 64 levels"),
    (checkpoint_config_nested_deeply, "config.json: expected the model config (JSON nested at most"),
    (onnx_config_nested_deeply, "config.json: expected the ONNX dir's runtime config (JSON nested"),
    (request_number_too_long, "cases.json: expected an input JSON file (JSON), found a number it cannot hold"),
    (request_number_beyond_float, "temperature: expected a number in [0.0, 100.0], found a number of 401 digits"),
    (request_logit_bias_key_too_long, "logit_bias: expected a non-negative integer token id as key, found a long"),
    (prompt_with_lone_surrogate, "requests[0].messages[0].content: expected valid Unicode text, found a lone"),
    (prompt_longer_than_the_engine_takes, "expected a prompt of at most 64 tokens (the engine's max_input_len), "
                                          "found 10000000 characters"),
    (model_onnx_truncated, "model.onnx: expected the exported graph model.onnx (an ONNX model), found a file onnx "
                           "cannot parse"),
    (model_onnx_garbage, "found a file onnx cannot parse"),
    (model_onnx_data_truncated, "(truncated?)"),
    (external_data_absolute, "as a file name inside the directory"),
    (external_data_parent_dir, "found '../weights.data'"),
    (external_data_symlink, "model.onnx.data: expected an ONNX external data file, found a symbolic link"),
    (external_data_length_lies, "bytes for its dtype and shape"),
    (engine_config_more_layers, "num_hidden_layers 3 disagrees with"),
    (engine_config_layers_true, "num_hidden_layers: expected a positive integer, found True"),
    (engine_config_fewer_kv_heads, "num_key_value_heads 1 disagrees with"),
    (engine_config_eos_outside_vocab, "eos_token_id: expected a list of token ids in [0, 49152)"),
    (engine_config_hidden_size, "hidden_size 128 disagrees with"),
    (engine_config_capacity, "max_kv_cache_capacity: expected a positive integer, found -1"),
    (engine_config_rope(rope_theta=1e-300), "rope_theta: expected a RoPE base greater than 1, found 1e-300"),
    (engine_config_rope(rope_scaling={"rope_type": "yarn", "factor": -1.0, "original_max_position_embeddings": 256}),
     "rope_scaling: factor: expected a finite positive number, found -1.0"),
    (engine_config_capacity_huge, "max_kv_cache_capacity: expected at most 16777216, found 1000000000000"),
    (engine_llm_onnx_garbage, "llm.onnx: expected the LLM engine (an ONNX model), found a file onnx cannot parse"),
    (engine_llm_onnx_truncated, "llm.onnx.data, found a file of 100 bytes (truncated?)"),
    # 5. the build checks every layer and dim
    (config_kv_heads_disagree, "num_key_value_heads disagrees at layer 0: config.json num_key_value_heads says 1, "
                               "model.onnx past_key_values_0 dim 2 says 2"),
    (config_heads_disagree, "num_attention_heads disagrees at layer 0"),
    (config_head_dim_disagrees, "head_dim disagrees at layer 0"),
    (config_hidden_disagrees, "hidden_size disagrees: config.json hidden_size says 128, model.onnx inputs_embeds"),
    (config_rotary_disagrees, "head_dim x partial_rotary_factor disagrees"),
    (config_layers_disagree, "expected past_key_values_0..2 inputs (config.json num_hidden_layers 3), found 2"),
    (config_layers_huge, "(config.json num_hidden_layers 1000000000000), found 2"),
    (one_layer_kv_fp8("past_key_values_1"), "KV cache dtype disagrees at layer 1: model.onnx past_key_values_1 says "
                                            "fp8, model.onnx present_key_values_1 says fp16"),
    (one_layer_kv_fp8("present_key_values_0"), "KV cache dtype disagrees at layer 0"),
    (one_layer_plugin_fp8, "AttentionPlugin 'layers.1/attention' enable_fp8_kv_cache says fp8"),
    # 6. the exporter refuses configs that give a wrong model
    *[(config_field("num_hidden_layers", v), f"num_hidden_layers: expected a positive integer, found {v!r}")
      for v in (0, True, 2.5, "2")],
    *[(config_field("rope_parameters", {"rope_type": "default", "rope_theta": v}),
       "rope_theta: expected a finite positive number") for v in (float("inf"), float("nan"), 0, -10000.0, "10000")],
    (config_field("rope_parameters", {"rope_type": "default", "rope_theta": 10**400}),
     "rope_theta: expected a finite positive number"),
    (config_field("rope_parameters", {"rope_type": "default", "rope_theta": 1e-300}),
     "rope_theta: expected a RoPE base greater than 1, found 1e-300"),
    *[(config_field("rope_parameters", {"rope_type": "linear", "factor": v, "rope_theta": 10000.0}),
       f"rope_scaling: factor: expected a {'number of at least 1' if v == 0.5 else 'finite positive number'}")
      for v in (0.5, 0, -1.0, "2")],
    (config_field("hidden_size", 64.0), "hidden_size: expected a positive integer, found 64.0"),
    (config_field("head_dim", "16"), "head_dim: expected a positive integer"),
    (config_field("tie_word_embeddings", "false"), "tie_word_embeddings: expected true or false"),
    (extra_layer_tensors, "tensor 'model.layers.7.mlp.up_proj.weight': expected layers 0..1"),
    (bias_the_config_switches_off, "tensor 'model.layers.0.self_attn.q_proj.bias': expected only tensors of the "
                                   "llama model"),
    (safetensors_dtype_lies, "model.safetensors: expected a safetensors file, found a corrupt one"),
    # 7. a TensorRT-Edge-LLM 0.11 export
    (token_major_export, "found a TensorRT-Edge-LLM 0.11.0 token-major/paged export"),
]


@pytest.mark.parametrize("prepare, fragment", FUZZ, ids=[f"{i:02d}-{p.__name__}" for i, (p, _) in enumerate(FUZZ)])
def test_bad_input_is_one_error_line_and_changes_nothing(ws, prepare, fragment):
    command, argv = prepare(ws)
    before = ws.snapshot()
    code, err = run(command, argv)
    assert code == 2, err
    assert_one_error_line(err, fragment)
    assert ws.snapshot() == before  # nothing written, nothing deleted, no temp sibling left


# --- the same promises where the input is fine ---------------------------------------------------------------------

def test_earlier_outputs_are_replaced_and_stale_temp_siblings_cleaned(ws):
    """Each writer replaces its own earlier output (recognised by its marker) and sweeps what a killed run left."""
    for command, argv, target in (("export", export_args(ws)[1], ws.path / "out" / "llm"),
                                  ("build", build_args(ws)[1], ws.path / "eng")):
        assert run(command, argv)[0] == 0
        stale = target.with_name(f".{target.name}.abcd1234.partial")
        stale.mkdir()
        (stale / "half.onnx").write_text("half")
        assert run(command, argv)[0] == 0
        assert not stale.exists() and stale_siblings(target) == []
        marker = json.loads((target / MARKER).read_text())
        assert sorted(marker["files"]) == sorted(str(p.relative_to(target)) for p in target.rglob("*")
                                                 if p.name != MARKER)


def test_hugging_face_cache_layout_is_accepted(ws):
    """Snapshot files that are symlinks into the repository's blobs/ are inside the checkpoint."""
    repo = ws.path / "models--tiny--llama"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(ws.base["ckpt"].iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, err = run("export", [str(snapshot), str(ws.path / "out")])
    assert code == 0, err
    copied = ws.path / "out" / "llm" / "tokenizer.json"
    assert copied.read_bytes() == (ws.base["ckpt"] / "tokenizer.json").read_bytes()


# --- chat templates render as transformers renders them ------------------------------------------------------------

CONVERSATIONS = [
    USER,
    [{"role": "system", "content": "Be brief."}, *USER],
    [*USER, {"role": "assistant", "content": "<think>\nblue?\n</think>\n\nBlue."},
     {"role": "user", "content": "More."}],
]


@pytest.mark.parametrize("template", ["smollm2", "qwen2.5.jinja", "qwen3.jinja", "alternating_roles.jinja"])
def test_templates_render_as_apply_chat_template(tmp_path, smollm2_checkpoint, template):
    from transformers import AutoTokenizer

    from runtime.chat import format_prompt, load_tokenizer
    from runtime.requests import parse_test_cases

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_checkpoint / name, tmp_path / name)
    if template != "smollm2":
        shutil.copy(TEMPLATES / template, tmp_path / "chat_template.jinja")
    ours, reference = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    rendered = 0
    for conversation in CONVERSATIONS:
        messages = parse_test_cases({"requests": [{"messages": conversation}]}, "c.json").requests[0].messages
        for gen_prompt, thinking in ((True, False), (True, True), (False, False)):
            try:
                expected = reference.apply_chat_template(conversation, tokenize=False,
                                                         add_generation_prompt=gen_prompt, enable_thinking=thinking)
            except Exception as e:  # the template refused the conversation: ours must refuse it with its message
                with pytest.raises(InputError, match="the chat template refused it: " + str(e)):
                    format_prompt(ours, messages, True, gen_prompt, thinking, where="c.json: requests[0]")
                continue
            assert format_prompt(ours, messages, True, gen_prompt, thinking).text == expected
            rendered += 1
    assert rendered >= 5


@pytest.mark.parametrize("template, fragment", [
    ("{{ 'x'.center(10**10) }}", "a count of 10000000000"),
    ("{{ 'x' | indent(100000000) }}", "a count of 100000000"),
    ("{{ '%999999999s' % 'a' }}", "a width of 999999999"),
    ("{{ '{:>999999999}'.format('a') }}", "a width of 999999999"),
    ("{{ '%*s' % (999999999, 'a') }}", "a count of 999999999"),
    ("{{ '%.*f' % (999999999, 1.5) }}", "a count of 999999999"),
    ("{% set s = 'x' * 5000 %}{{ s.replace('x', s) }}", "a replace would build more than"),
    ("{% set s = 'x' * 5000 %}{{ s | replace('x', s) }}", "a replace would build more than"),
    ("{% set s = 'x' * 5000 %}{{ s.join(s | list) }}", "a join would build more than"),
    ("{% set s = 'x' * 5000 %}{{ s | list | join(s) }}", "a join would build more than"),
    ("{{ 7 ** 100000 }}", "to the power 100000"),
    ("{{ [0] * 10**8 }}", "repeats a value 100000000 times"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("{{ namespace(_x=1) }}", "the sandbox forbids"),
    ("{% for a in [1] %}" * 25 + "{% endfor %}" * 25, "found one that does not compile"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "found one that does not compile"),
])
def test_render_stops_what_would_grow_past_the_bound(template, fragment):
    """Each way a template can build a huge value in one step is stopped before it allocates it; a template nested
    too deep to compile is refused."""
    with pytest.raises(InputError, match=re.escape(fragment)):
        chat_template.render(chat_template.compile_template(template, "t"), "r", max_chars=10000)
    assert chat_template.render(chat_template.compile_template("{{ '%5d|{:>4}'.format(1) % 3 }}", "t"), "r",
                                max_chars=10000) == "    3|   1"  # ordinary widths are fine


def test_render_bounds_are_the_callers():
    """The size bound is the caller's (the runtime passes what the engine's max_input_len can hold)."""
    template = chat_template.compile_template("{{ 'ab' * n }}", "t")
    assert chat_template.render(template, "r", max_chars=10, n=5) == "ab" * 5
    with pytest.raises(InputError, match="r: the chat template was stopped"):
        chat_template.render(template, "r", max_chars=10, n=6)


# --- signals, concurrency, full and read-only disks ----------------------------------------------------------------

def writer_command(ws: Workspace, writer: str) -> tuple[list[str], Path]:
    """(subprocess argv, output dir) of one writer on the workspace."""
    python = [sys.executable, "-m"]
    if writer == "export":
        return [*python, "llm_loader.export_all_cli", *export_args(ws)[1]], ws.path / "out" / "llm"
    if writer == "build":
        return [*python, "builder.cli", *build_args(ws)[1]], ws.path / "eng"
    return [*python, "quantization", *quantize_args(ws)[1]], ws.path / "q"


def start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_from_a_terminal)


def partials(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.partial")) if target.parent.is_dir() else []


def stop_mid_write(proc: subprocess.Popen, target: Path) -> None:
    """Wait until `proc` is writing its own temp sibling of `target` (not one a killed run left), then freeze it
    there (SIGSTOP)."""
    deadline, stale = time.monotonic() + 300, partials(target)
    while not set(partials(target)) - set(stale):
        assert proc.poll() is None, f"the writer ended before writing (rc {proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    assert set(partials(target)) - set(stale), "the writer finished before it could be stopped mid-write"


@pytest.mark.parametrize("writer", ["export", "build", "quantize"])
def test_killed_and_interrupted_writers_leave_nothing_and_rerun_cleanly(ws, writer):
    argv, target = writer_command(ws, writer)
    before = {p.name for p in target.parent.iterdir()} if target.parent.is_dir() else set()

    killed = start(argv)  # SIGKILL mid-write: nothing can clean up, so its temp sibling stays behind
    stop_mid_write(killed, target)
    killed.kill()
    killed.wait()
    assert partials(target) and not target.exists()

    interrupted = start(argv)  # Ctrl-C mid-write: exit 130; its own temp sibling and the killed run's are gone
    stop_mid_write(interrupted, target)
    os.kill(interrupted.pid, signal.SIGINT)
    os.kill(interrupted.pid, signal.SIGCONT)
    assert interrupted.wait() == 130, interrupted.stderr.read()
    assert "Traceback" not in interrupted.stderr.read()
    assert not target.exists() and {p.name for p in target.parent.iterdir()} == before

    command, args = {"export": export_args, "build": build_args, "quantize": quantize_args}[writer](ws)
    code, err = run(command, args)  # a clean rerun writes the whole output
    assert code == 0, err
    assert (target / MARKER).is_file() and stale_siblings(target) == []
    assert {p.name for p in target.parent.iterdir()} == before | {target.name}


def test_two_writers_of_one_output(ws):
    """While one export writes OUT, a second one to the same OUT is refused and touches nothing; the first one then
    completes, and the output is the first one's, whole."""
    argv, target = writer_command(ws, "export")
    first = start(argv)
    stop_mid_write(first, target)
    try:
        code, err = run(*export_args(ws))
        assert code == 2
        assert_one_error_line(err, "another run is writing it now")
        assert len(partials(target)) == 1  # the first run's work in progress is untouched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()
    assert (target / "model.onnx").is_file() and (target / MARKER).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["llm"]  # no lock file, no temp sibling
    assert run(*export_args(ws))[0] == 0  # and a later export replaces it


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs: `tmpfs(size, readonly=False)` -> its path. Needs root (CI runs as root)."""
    mounts = []

    def mount(size: str, readonly: bool = False) -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("command", ["export", "build", "quantize", "infer"])
def test_full_disk_is_one_error_line_and_leaves_nothing(ws, tmpfs, command):
    disk = tmpfs("2m")
    out = disk / "out"
    if command == "infer":  # the responses are small: fill the disk first
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
        out = disk / "out.json"
    if command == "build":
        code, err = run(*build_args(ws, engine=out))
    else:
        code, err = run(*{"export": export_args, "quantize": quantize_args, "infer": infer_args}[command](ws, out=out))
    assert code == 2, err
    assert_one_error_line(err, "No space left on device", "free some space")
    assert sorted(p.name for p in disk.iterdir()) == (["filler"] if command == "infer" else [])


def test_read_only_location_is_one_error_line(ws, tmpfs):
    disk = tmpfs("1m", readonly=True)
    code, err = run(*export_args(ws, out=disk / "out"))
    assert code == 2
    assert_one_error_line(err, "Read-only file system", "choose a writable location")
    code, err = run(*build_args(ws, engine=disk / "eng"))
    assert code == 2
    assert_one_error_line(err, "Read-only file system")
