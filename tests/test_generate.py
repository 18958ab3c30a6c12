"""runtime.generate on real engines (tiny checkpoint -> export -> ONNX Runtime build) against transformers."""

import numpy as np
import pytest
import torch
from helpers import (
    PROMPTS,
    export_and_build,
    jobs_for,
    make_tiny_checkpoint,
    transformers_greedy,
)

from contract.errors import InputError

LIMITS = dict(max_batch_size=4, max_input_len=64, max_kv_cache_capacity=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_checkpoint):
    """family -> (checkpoint, Engine, tokenizer), built once per module and family."""
    from runtime.chat import load_tokenizer
    from runtime.engine import Engine

    built = {}

    def get(family):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            ckpt = make_tiny_checkpoint(family, root / "ckpt", smollm2_checkpoint)
            _, eng = export_and_build(ckpt, root, **LIMITS)
            built[family] = ckpt, Engine.load(eng), load_tokenizer(eng)
        return built[family]

    return get


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_batch_matches_transformers(tiny, family):
    from transformers import AutoModelForCausalLM

    from runtime.generate import generate

    ckpt, engine, tokenizer = tiny(family)
    jobs = jobs_for(tokenizer, PROMPTS)
    generations, timing = generate(engine, tokenizer, jobs, 32)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for job, gen in zip(jobs, generations):
        ref = transformers_greedy(model, job.prompt_ids, 32, engine.eos_token_ids)
        assert gen.token_ids == ref.tolist()
        assert gen.text == tokenizer.decode(ref, skip_special_tokens=True)
        assert gen.finish_reason == ("end-of-sequence" if ref[-1].item() in engine.eos_token_ids else "max-length")
    assert timing.prefill_tokens == sum(len(j.prompt_ids) for j in jobs) and timing.decode_tokens > 0


def test_batch_equals_one_at_a_time_when_sampling(tiny):
    from runtime.generate import generate
    from runtime.sampling import SamplingParams

    _, engine, tokenizer = tiny("qwen2")
    jobs = jobs_for(tokenizer, PROMPTS, sampling=SamplingParams(temperature=1.0, top_k=0, top_p=0.95),
                    num_logprobs=2)
    for seed, job in enumerate(jobs):
        job.seed = seed
    batched, _ = generate(engine, tokenizer, jobs, 16)
    for job, gen in zip(jobs, batched):
        (alone,), _ = generate(engine, tokenizer, [job], 16)
        assert alone.token_ids == gen.token_ids
        np.testing.assert_allclose([lp for step in alone.logprobs for _, lp in step],
                                   [lp for step in gen.logprobs for _, lp in step], atol=2e-3)


def test_each_request_seed_drives_its_own_draws(tiny):
    """A row's draws come from its job's seed: the same prompt under different seeds samples different tokens (the
    test above pins equal seeds to equal tokens)."""
    from runtime.generate import generate
    from runtime.sampling import SamplingParams

    _, engine, tokenizer = tiny("qwen2")
    jobs = jobs_for(tokenizer, PROMPTS[:1] * 3, sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0))
    for seed, job in enumerate(jobs):
        job.seed = seed
    generations, _ = generate(engine, tokenizer, jobs, 8)
    assert len({tuple(g.token_ids) for g in generations}) == 3


def test_stop_string_cuts_the_text(tiny):
    from runtime.generate import generate

    _, engine, tokenizer = tiny("llama")
    (full,), _ = generate(engine, tokenizer, jobs_for(tokenizer, PROMPTS[:1]), 24)
    assert full.finish_reason == "max-length" and len(full.text) > 12
    stop = full.text[8:12]
    (cut,), _ = generate(engine, tokenizer, jobs_for(tokenizer, PROMPTS[:1], stop=["never-there", stop]), 24)
    assert cut.finish_reason == "stop-words"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_logit_bias_forces_tokens_and_eos(tiny):
    from runtime.generate import generate
    from runtime.sampling import SamplingParams

    _, engine, tokenizer = tiny("llama")
    forced = tokenizer.encode(" cat")[0]
    (gen,), _ = generate(engine, tokenizer, jobs_for(tokenizer, PROMPTS[:1], sampling=SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, logit_bias={forced: 100.0})), 5)
    assert gen.token_ids == [forced] * 5 and gen.text == " cat" * 5
    eos = engine.eos_token_ids[0]
    (gen,), _ = generate(engine, tokenizer, jobs_for(tokenizer, PROMPTS[:1], sampling=SamplingParams(
        top_k=1, logit_bias={eos: 100.0})), 5)
    assert gen.token_ids == [eos] and gen.finish_reason == "end-of-sequence" and gen.text == ""


def test_logprobs_are_log_softmax_of_engine_logits(tiny):
    from runtime.generate import generate

    _, engine, tokenizer = tiny("qwen3")
    (job,) = jobs_for(tokenizer, PROMPTS[1:2], num_logprobs=4)
    (gen,), _ = generate(engine, tokenizer, [job], 6)
    # Replay prompt + generated tokens in one prefill and read the logits at every generating position.
    seq = job.prompt_ids + gen.token_ids[:-1]
    positions = np.arange(len(job.prompt_ids) - 1, len(seq), dtype=np.int64)[None]
    logits = engine.forward(engine.new_cache(1), np.array([seq], np.int32), np.array([len(seq)], np.int32),
                            positions)[0]
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    for step, row in zip(gen.logprobs, ref):
        values, ids = row.topk(4)
        assert [t for t, _ in step] == ids.tolist()
        np.testing.assert_allclose([lp for _, lp in step], values.numpy(), atol=2e-3)


def test_prompt_limits(tiny):
    from runtime.generate import Job, generate
    from runtime.sampling import SamplingParams

    _, engine, tokenizer = tiny("llama")
    with pytest.raises(InputError, match=r"cases.json: requests\[0\]: expected a prompt of 1..64 tokens .* found 65"):
        generate(engine, tokenizer, [Job([5] * 65, name="cases.json: requests[0]")], 4)
    # A full KV cache ends the row: 60 prompt tokens + 69 new ones need 128 cache slots (the last is never cached).
    no_eos = SamplingParams(top_k=1, logit_bias={e: -100.0 for e in engine.eos_token_ids})
    (gen,), _ = generate(engine, tokenizer, [Job([5] * 60, no_eos)], 1000)
    assert len(gen.token_ids) == 128 - 60 + 1 and gen.finish_reason == "max-length"


def test_rows_end_at_any_eos_id_and_cut_at_the_earliest_stop_string(tiny):
    """Row bookkeeping with the real tokenizer: every eos id of the engine ends a row (not only the first), and when
    one token completes two stop strings the text is cut before the earlier of them, whatever their order."""
    from runtime.generate import END_OF_SEQUENCE, STOP_WORDS, Job, new_rows
    from runtime.sampling import SamplingParams

    _, _, tokenizer = tiny("llama")
    ids = tokenizer.encode(" the cat sat on the mat")
    text = tokenizer.decode(ids, skip_special_tokens=True)
    eos = [tokenizer.encode(" dog")[0], tokenizer.encode(" bird")[0]]  # two eos ids, as a config may list
    vocab = max(ids + eos) + 1

    def one_hot(token: int) -> np.ndarray:
        logits = np.zeros(vocab)
        logits[token] = 1.0
        return logits

    greedy = SamplingParams(top_k=1)
    jobs = [Job([1], greedy, stop=["e mat", "the mat"]), Job([1], greedy), Job([1], greedy)]
    rows, _, _ = new_rows(jobs, 32, 64, 128, tokenizer, eos)
    for token in ids:
        rows[0].step(one_hot(token))
        if rows[0].finish_reason:
            break
    assert rows[0].finish_reason == STOP_WORDS and rows[0].tokens == ids
    assert rows[0].result().text == text[: text.find("the mat")]  # both stops end at " mat"; "the mat" starts first
    for row, token in zip(rows[1:], reversed(eos)):
        assert row.step(one_hot(token)) == token and row.finish_reason == END_OF_SEQUENCE
        assert row.result().token_ids == [token]
