"""The test-case JSON that `llm-inference` reads, and the responses JSON it writes (reference 5.2 / 5.3).

Parsing checks every field it uses and reports the first problem as an `InputError` naming the file and the JSON
path (`cases.json: requests[1].messages: expected a non-empty list, found null`), so a typo never surfaces as a
`KeyError` deep inside generation. Keys the reference defines but this runtime has no use for (LoRA, context cache,
streaming, speculative-decoding switches) are accepted and ignored when they ask for nothing; anything else unknown
is an error, because a misspelt sampling key would otherwise silently fall back to its default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import InputError
from contract.jsonfile import read_json_value

MAX_NUM_LOGPROBS = 50
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_ABS_LOGIT_BIAS = 100.0
ROLES = ("system", "user", "assistant")

# Reference keys that change nothing here when left at their "off" value.
IGNORED_TOP = {"context_cache_lookup_policy", "context_cache_commit_policy", "streaming", "diffusion_config",
               "spec_proposal_sampling", "available_lora_weights"}
IGNORED_REQUEST = {"reference", "save_system_prompt_kv_cache", "lora_name"}


@dataclass
class Message:
    role: str
    content: list[dict]  # normalised to typed items: [{"type": "text", "text": ...}]

    @property
    def text(self) -> str:
        return "".join(item["text"] for item in self.content)


@dataclass
class Request:
    messages: list[Message]
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    num_logprobs: int = 0
    sampling_seed: int = 0
    disable_spec_decode: bool = False  # with --specDecode: decode this request's batch without speculation


@dataclass
class TestCases:
    """One input file: shared sampling settings plus the requests, in file order."""

    source: str
    requests: list[Request]
    batch_size: int = 1
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 50
    max_generate_length: int = 256
    apply_chat_template: bool = True
    add_generation_prompt: bool = True
    enable_thinking: bool = False


def _show(value) -> str:
    """A short rendering of a JSON value for an error message."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 40):
        shown = json.dumps(value)
        return shown if len(shown) <= 40 else f"a number of {len(shown)} digits"
    if isinstance(value, str):
        return "a long string"
    return f"a list of {len(value)}" if isinstance(value, list) else "an object"


class _Reader:
    """Typed access to one JSON object that knows its own path for error messages."""

    def __init__(self, source: str, path: str, obj):
        self.source, self.path, self.obj = source, path, obj

    def fail(self, key: str | None, expected: str, found) -> InputError:
        where = ".".join(p for p in (self.path, key) if p) or "top level"
        return InputError(f"{self.source}: {where}: expected {expected}, found {_show(found)}")

    def check_keys(self, known: set[str]):
        for key in self.obj:
            if key not in known:
                where = self.path or "top level"
                raise InputError(f"{self.source}: {where}: expected known keys only, found unknown key {key!r} "
                                 f"(known: {', '.join(sorted(known))})")

    def number(self, key, default, lo, hi, integer=False):
        value = self.obj.get(key, default)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        # the range first: a JSON integer of hundreds of digits is an int that math.isfinite cannot take
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi or not math.isfinite(value):
            what = "an integer" if integer else "a number"
            raise self.fail(key, f"{what} in [{lo}, {hi}]", value)
        return value if integer else float(value)

    def boolean(self, key, default):
        value = self.obj.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def child(self, key, value, index=None) -> "_Reader":
        path = f"{self.path}.{key}" if self.path else key
        return _Reader(self.source, path if index is None else f"{path}[{index}]", value)


def _unicode(r: _Reader, key: str | None, text: str) -> str:
    """`text` after checking it is valid Unicode: a JSON escape can spell a lone surrogate, which no tokenizer or
    UTF-8 output file takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = ".".join(p for p in (r.path, key) if p)
        raise InputError(f"{r.source}: {where}: expected valid Unicode text, found a lone surrogate "
                         f"U+{ord(text[e.start]):04X} at character {e.start}") from None
    return text


def _logit_bias(r: _Reader, key: str, default: dict[int, float]) -> dict[int, float]:
    if key not in r.obj:
        return default
    raw = r.obj[key]
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS_ENTRIES:
        raise r.fail(key, f"an object of at most {MAX_LOGIT_BIAS_ENTRIES} token id -> bias entries", raw)
    bias = {}
    for token, value in raw.items():
        if not (token.isascii() and token.isdigit() and len(token) <= 12):  # (a vocabulary is far below 10^12)
            raise r.fail(f"{key}.{token}" if len(token) <= 40 else key, "a non-negative integer token id as key",
                         token)
        bias[int(token)] = r.child(key, raw).number(token, None, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
    return bias


def _stop(r: _Reader) -> list[str]:
    raw = r.obj.get("stop", [])
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise r.fail("stop", "a non-empty string or a list of non-empty strings", raw)
    return [_unicode(r, "stop", s) for s in stops]


def _message(r: _Reader) -> Message:
    if not isinstance(r.obj, dict):
        raise r.fail(None, "an object with role and content", r.obj)
    r.check_keys({"role", "content"})
    role = r.obj.get("role")
    if role not in ROLES:
        raise r.fail("role", " | ".join(ROLES), role)
    content = r.obj.get("content")
    if isinstance(content, str):
        return Message(role, [{"type": "text", "text": _unicode(r, "content", content)}])
    if not isinstance(content, list) or not content:
        raise r.fail("content", "a string or a non-empty list of {type: text, text} items", content)
    items = []
    for i, item in enumerate(content):
        ri = r.child("content", item, i)
        if not isinstance(item, dict) or item.get("type") != "text":
            found = item.get("type") if isinstance(item, dict) else item
            raise ri.fail("type" if isinstance(item, dict) else None, '"text" (this runtime is text-only)', found)
        if not isinstance(item.get("text"), str):
            raise ri.fail("text", "a string", item.get("text"))
        items.append({"type": "text", "text": _unicode(ri, "text", item["text"])})
    return Message(role, items)


def parse_test_cases(data, source: str) -> TestCases:
    """Validate already-decoded JSON `data` (from a file named `source`) into `TestCases`."""
    top = _Reader(source, "", data)
    if not isinstance(data, dict):
        raise top.fail(None, "a JSON object", data)
    top.check_keys({"batch_size", "temperature", "top_p", "top_k", "max_generate_length", "sampling_seed",
                    "apply_chat_template", "add_generation_prompt", "enable_thinking", "logit_bias", "num_logprobs",
                    "requests"} | IGNORED_TOP)
    if top.obj.get("available_lora_weights"):
        raise top.fail("available_lora_weights", "{} (LoRA is not supported)", data["available_lora_weights"])
    bias = _logit_bias(top, "logit_bias", {})
    num_logprobs = top.number("num_logprobs", 0, 0, MAX_NUM_LOGPROBS, integer=True)
    seed = top.number("sampling_seed", 0, 0, 2**64 - 1, integer=True)
    raw_requests = data.get("requests")
    if not isinstance(raw_requests, list) or not raw_requests:
        raise top.fail("requests", "a non-empty list", raw_requests)
    requests = []
    for i, raw in enumerate(raw_requests):
        r = top.child("requests", raw, i)
        if not isinstance(raw, dict):
            raise r.fail(None, "an object with messages", raw)
        r.check_keys({"messages", "stop", "logit_bias", "num_logprobs", "sampling_seed", "disable_spec_decode"}
                     | IGNORED_REQUEST)
        if raw.get("lora_name"):
            raise r.fail("lora_name", "no adapter (LoRA is not supported)", raw["lora_name"])
        messages = raw.get("messages")
        if not isinstance(messages, list) or not messages:
            raise r.fail("messages", "a non-empty list", messages)
        requests.append(Request(
            messages=[_message(r.child("messages", m, j)) for j, m in enumerate(messages)],
            stop=_stop(r),
            logit_bias=_logit_bias(r, "logit_bias", bias),
            num_logprobs=r.number("num_logprobs", num_logprobs, 0, MAX_NUM_LOGPROBS, integer=True),
            sampling_seed=r.number("sampling_seed", seed, 0, 2**64 - 1, integer=True),
            disable_spec_decode=r.boolean("disable_spec_decode", False),
        ))
    return TestCases(
        source=source,
        requests=requests,
        batch_size=top.number("batch_size", 1, 1, 4096, integer=True),
        temperature=top.number("temperature", 1.0, 0.0, 100.0),
        top_p=top.number("top_p", 0.8, 0.0, 1.0),
        top_k=top.number("top_k", 50, 0, 2**31 - 1, integer=True),
        max_generate_length=top.number("max_generate_length", 256, 1, 2**31 - 1, integer=True),
        apply_chat_template=top.boolean("apply_chat_template", True),
        add_generation_prompt=top.boolean("add_generation_prompt", True),
        enable_thinking=top.boolean("enable_thinking", False),
    )


def load_test_cases(path: str | Path) -> TestCases:
    """Read and validate the input JSON at `path`."""
    path = Path(path)
    return parse_test_cases(read_json_value(path, "an input JSON file"), path.name)


def response_json(request_idx: int, batch_idx: int, request: Request, formatted_system_prompt: str,
                  formatted_complete_request: str, output_text: str, finish_reason: str,
                  logprobs: list[list[dict]] | None) -> dict:
    """One entry of the output's `responses` (reference 5.3); `logprobs` only when the request asked for them."""
    entry = {
        "output_text": output_text,
        "request_idx": request_idx,
        "batch_idx": batch_idx,
        "finish_reason": finish_reason,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "formatted_system_prompt": formatted_system_prompt,
        "formatted_complete_request": formatted_complete_request,
    }
    if request.num_logprobs:
        entry["logprobs"] = logprobs
    return entry
