"""llm-inference end to end on a tiny engine: output JSON fields, chat templates, the examples, and bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import export_and_build, make_tiny_checkpoint, run_cli

from runtime.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_checkpoint):
    """(checkpoint, engine dir) of a tiny llama."""
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    return ckpt, export_and_build(ckpt, root, max_batch_size=4, max_input_len=64, max_kv_cache_capacity=128)[1]


def run(engine_dir, cases, out: Path, *flags):
    """Invoke the CLI in-process on `cases` (a dict, or a path to a JSON file)."""
    if isinstance(cases, dict):
        path = out.with_suffix(".in.json")
        path.write_text(json.dumps(cases))
    else:
        path = cases
    return run_cli(main, "--engineDir", engine_dir, "--inputFile", path, "--outputFile", out, *flags)


@pytest.mark.parametrize("apply_chat_template", [True, False])
def test_prompt_text_and_output_text(built, tmp_path, apply_chat_template):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, engine_dir = built
    cases = {"apply_chat_template": apply_chat_template, "top_k": 1, "max_generate_length": 8,
             "requests": [{"messages": MESSAGES}]}
    result = run(engine_dir, cases, tmp_path / "out.json")
    assert result.exit_code == 0, result.stderr
    (resp,) = json.loads((tmp_path / "out.json").read_text())["responses"]

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if apply_chat_template:
        prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert resp["formatted_system_prompt"] == tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False)
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        prompt = "Be brief.Name a color."
        assert resp["formatted_system_prompt"] == "Be brief."
        ids = tokenizer(prompt)["input_ids"]
    assert resp["formatted_complete_request"] == prompt
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, top_k=None, top_p=None,
                         pad_token_id=0)[0, len(ids):]
    assert resp["output_text"] == tokenizer.decode(ref, skip_special_tokens=True)
    assert resp["messages"] == [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                                for m in MESSAGES]
    assert "logprobs" not in resp


def test_examples_run(built, tmp_path):
    _, engine_dir = built
    for name in ("llm_basic.json", "raw_prompt.json"):
        result = run(engine_dir, EXAMPLES / name, tmp_path / name, "--maxGenerateLength", "4")
        assert result.exit_code == 0, result.stderr
    out = tmp_path / "greedy.json"
    result = run(engine_dir, EXAMPLES / "greedy_batch.json", out, "--maxGenerateLength", "5", "--dumpProfile",
                 "--warmup", "1")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["input_file"].endswith("greedy_batch.json")
    responses = data["responses"]
    assert [r["request_idx"] for r in responses] == [0, 1, 2] and [r["batch_idx"] for r in responses] == [0, 1, 0]
    assert all(r["finish_reason"] in ("end-of-sequence", "max-length", "stop-words") for r in responses)
    steps = responses[2]["logprobs"]
    assert 1 <= len(steps) <= 5 and all(len(step) == 3 for step in steps)
    for step in steps:
        assert [e["logprob"] for e in step] == sorted((e["logprob"] for e in step), reverse=True)
        assert all(bytes(e["bytes"]).decode("utf-8", errors="replace") == e["token"] for e in step)
    assert data["profile"]["decode_tokens"] > 0 and data["profile"]["prefill_tokens_per_second"] > 0
    assert "decode_tokens_per_second:" in result.stderr


def test_no_profile_without_flag(built, tmp_path):
    _, engine_dir = built
    result = run(engine_dir, EXAMPLES / "raw_prompt.json", tmp_path / "o.json", "--maxGenerateLength", "2")
    assert result.exit_code == 0, result.stderr
    assert "profile" not in json.loads((tmp_path / "o.json").read_text())


@pytest.mark.parametrize("cases,flags,message", [
    ('{"requests": [', [], "expected valid JSON (an input JSON file), found a syntax error"),
    ({"top_k": 1}, [], "requests: expected a non-empty list, found null"),
    ({"requests": [{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"49152": 5}}]}, [],
     r"requests[0].logit_bias: expected token ids in [0, 49152), found 49152"),
    ({"requests": [{"messages": [{"role": "user", "content": "a"}]}]}, ["--batchSize", "5"],
     "batch_size (or --batchSize): expected at most 4 (the engine's max_batch_size), found 5"),
    ({"requests": [{"messages": [{"role": "user", "content": "a " * 80}]}]}, [],
     "requests[0]: expected a prompt of 1..64 tokens"),
])
def test_bad_input_exits_2_without_output(built, tmp_path, cases, flags, message):
    _, engine_dir = built
    out = tmp_path / "out.json"
    if isinstance(cases, str):
        (tmp_path / "bad.json").write_text(cases)
        cases = tmp_path / "bad.json"
    result = run(engine_dir, cases, out, *flags)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not out.exists() and not any(p.name.startswith(".out.json") for p in tmp_path.iterdir())


def test_bad_engine_dir_exits_2(built, tmp_path):
    _, engine_dir = built
    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    (broken / "config.json").unlink()
    result = run(broken, EXAMPLES / "raw_prompt.json", tmp_path / "o.json")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert not (tmp_path / "o.json").exists()


def test_tensorrt_engine_dir_without_tensorrt_exits_2(built, tmp_path):
    """An engine dir built for TensorRT is opened by the TensorRT runtime, which is missing here: one line naming
    the dir and what is missing."""
    _, engine_dir = built
    trt_dir = tmp_path / "engine"
    shutil.copytree(engine_dir, trt_dir)
    config = json.loads((trt_dir / "config.json").read_text())
    config["builder_config"]["backend"] = "tensorrt"
    (trt_dir / "config.json").write_text(json.dumps(config))
    for name in ("llm.engine", "embedding.engine"):
        (trt_dir / name).write_bytes(b"")
    result = run(trt_dir, EXAMPLES / "raw_prompt.json", tmp_path / "o.json")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {trt_dir} (built for TensorRT): expected the tensorrt Python package")
    assert not (tmp_path / "o.json").exists()


def test_template_options_reach_the_template(tmp_path, smollm2_checkpoint):
    """add_generation_prompt and enable_thinking reach the template as apply_chat_template passes them."""
    from transformers import AutoTokenizer

    from runtime.chat import format_prompt, load_tokenizer
    from runtime.requests import parse_test_cases

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% if enable_thinking %}<think>{% endif %}{% endif %}")
    tokenizer = load_tokenizer(tmp_path)
    messages = parse_test_cases({"requests": [{"messages": MESSAGES}]}, "c.json").requests[0].messages
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for gen_prompt in (True, False):
        for thinking in (True, False):
            prompt = format_prompt(tokenizer, messages, True, gen_prompt, thinking)
            expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt,
                                                     enable_thinking=thinking)
            assert prompt.text == expected
            assert prompt.token_ids == reference.encode(expected, add_special_tokens=False)
    assert format_prompt(tokenizer, messages, True, True, True).text.endswith("<assistant><think>")
