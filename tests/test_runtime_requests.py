"""runtime.requests: the input JSON (reference 5.2) is parsed with its defaults and rejected with a useful line."""

import json
from pathlib import Path

import pytest

from contract.atomic import write_json_atomic
from contract.errors import InputError
from runtime.requests import load_test_cases, parse_test_cases, response_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def one(**top):
    return {"requests": [{"messages": [{"role": "user", "content": "hi"}]}], **top}


def test_defaults_are_the_reference_defaults():
    c = parse_test_cases(one(), "c.json")
    assert (c.batch_size, c.temperature, c.top_p, c.top_k, c.max_generate_length) == (1, 1.0, 0.8, 50, 256)
    assert (c.apply_chat_template, c.add_generation_prompt, c.enable_thinking) == (True, True, False)
    r = c.requests[0]
    assert (r.stop, r.logit_bias, r.num_logprobs) == ([], {}, 0)
    assert r.messages[0].content == [{"type": "text", "text": "hi"}]


def test_request_overrides_and_normalisation():
    data = {
        "temperature": 0.5, "top_k": 1, "logit_bias": {"5": -100}, "num_logprobs": 2, "sampling_seed": 9,
        "requests": [
            {"messages": [{"role": "system", "content": "s"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
             "stop": "###", "reference": "ignored"},
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"7": 3.5}, "num_logprobs": 0,
             "stop": ["a", "b"], "sampling_seed": 4},
        ],
    }
    c = parse_test_cases(data, "c.json")
    a, b = c.requests
    assert a.messages[1].text == "ab" and a.stop == ["###"] and a.logit_bias == {5: -100.0} and a.num_logprobs == 2
    assert a.sampling_seed == 9 and b.sampling_seed == 4
    assert b.logit_bias == {7: 3.5} and b.num_logprobs == 0 and b.stop == ["a", "b"]


@pytest.mark.parametrize("data,message", [
    ([], "c.json: top level: expected a JSON object, found a list of 0"),
    ({}, "c.json: requests: expected a non-empty list, found null"),
    ({"requests": [{"messages": []}]}, "c.json: requests[0].messages: expected a non-empty list, found a list of 0"),
    ({"requests": [{"messages": [{"role": "user", "content": "a"}]}, {"messages": None}]},
     "c.json: requests[1].messages: expected a non-empty list, found null"),
    (one(top_p=1.5), "c.json: top_p: expected a number in [0.0, 1.0], found 1.5"),
    (one(top_k="5"), 'c.json: top_k: expected an integer in [0, 2147483647], found "5"'),
    (one(batch_size=True), "c.json: batch_size: expected an integer in [1, 4096], found true"),
    (one(num_logprobs=51), "c.json: num_logprobs: expected an integer in [0, 50], found 51"),
    (one(logit_bias={"3": 101}), "c.json: logit_bias.3: expected a number in [-100.0, 100.0], found 101"),
    (one(logit_bias={"x": 1}), 'c.json: logit_bias.x: expected a non-negative integer token id as key, found "x"'),
    (one(temprature=0.5), "c.json: top level: expected known keys only, found unknown key 'temprature'"),
    ({"requests": [{"messages": [{"role": "robot", "content": "a"}]}]},
     'c.json: requests[0].messages[0].role: expected system | user | assistant, found "robot"'),
    ({"requests": [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]}]},
     'c.json: requests[0].messages[0].content[0].type: expected "text" (this runtime is text-only), found "image"'),
    ({"requests": [{"messages": [{"role": "user", "content": "a"}], "stop": [""]}]},
     "c.json: requests[0].stop: expected a non-empty string or a list of non-empty strings"),
])
def test_bad_input_names_file_and_path(data, message):
    with pytest.raises(InputError) as e:
        parse_test_cases(data, "c.json")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"requests": [')
    with pytest.raises(InputError, match=r"bad.json: expected valid JSON \(an input JSON file\), found a syntax error at line 1"):
        load_test_cases(bad)
    with pytest.raises(InputError, match=r"missing.json: expected an input JSON file"):
        load_test_cases(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["llm_basic.json", "greedy_batch.json", "raw_prompt.json"])
def test_examples_parse(name):
    cases = load_test_cases(EXAMPLES / name)
    assert cases.requests and cases.source == name


def test_response_entry_and_atomic_write(tmp_path):
    c = parse_test_cases(one(num_logprobs=1), "c.json")
    entry = response_json(3, 1, c.requests[0], "", "<p>hi", "out", "max-length", [[{"token_id": 1}]])
    assert entry["request_idx"] == 3 and entry["batch_idx"] == 1 and entry["logprobs"] == [[{"token_id": 1}]]
    assert entry["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    out = tmp_path / "o.json"
    write_json_atomic(out, {"responses": [entry]})
    assert json.loads(out.read_text())["responses"][0]["output_text"] == "out"
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]
