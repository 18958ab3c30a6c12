"""`llm-inference`: run the requests of a test-case JSON on an engine directory and write the responses JSON.

Requests are formatted (chat template or raw text), tokenized, cut into batches of `batch_size` in file order and
generated batch by batch. The output file is written only when every batch has finished; any bad input ends the
run with `error: <message>` on stderr and exit code 2, and no output file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from contract.atomic import write_json_atomic
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.errors import InputError
from runtime.chat import Prompt, format_prompt, load_tokenizer, token_bytes
from runtime.generate import Generation, Job, Timing, generate
from runtime.requests import TestCases, load_test_cases, response_json
from runtime.sampling import SamplingParams


def prepare(cases: TestCases, tokenizer, vocab_size: int, max_input_len: int | None = None) -> list[tuple[Prompt, Job]]:
    """Prompt text and a generation job per request, with token ids checked against the engine's vocabulary (and,
    with `max_input_len`, prompts that cannot fit refused before they are tokenized)."""
    out = []
    for i, req in enumerate(cases.requests):
        name = f"{cases.source}: requests[{i}]"
        bad = [t for t in req.logit_bias if t >= vocab_size]
        if bad:
            raise InputError(f"{name}.logit_bias: expected token ids in [0, {vocab_size}), found {bad[0]}")
        prompt = format_prompt(tokenizer, req.messages, cases.apply_chat_template, cases.add_generation_prompt,
                               cases.enable_thinking, where=name, max_input_len=max_input_len)
        sampling = SamplingParams(cases.temperature, cases.top_k, cases.top_p, req.logit_bias)
        out.append((prompt, Job(prompt.token_ids, sampling, req.stop, req.num_logprobs, req.sampling_seed, name)))
    return out


def logprobs_json(tokenizer, generation: Generation) -> list[list[dict]]:
    entries = []
    for step in generation.logprobs:
        row = []
        for token_id, logprob in step:
            raw = token_bytes(tokenizer, token_id)
            row.append({"token_id": token_id, "token": raw.decode("utf-8", errors="replace"), "bytes": list(raw),
                        "logprob": logprob})
        entries.append(row)
    return entries


def run_test_cases(engine, tokenizer, cases: TestCases, batch_size: int | None = None,
                   max_generate_length: int | None = None, warmup: int = 0) -> tuple[list[dict], Timing]:
    """All responses of `cases` (reference 5.3 entries, in request order) and the timing of the real batches.

    `batch_size` / `max_generate_length` override the file's values, as the CLI flags do.
    """
    batch_size = batch_size or cases.batch_size
    max_len = max_generate_length or cases.max_generate_length
    if batch_size > engine.max_batch_size:
        raise InputError(f"batch_size (or --batchSize): expected at most {engine.max_batch_size} (the engine's "
                         f"max_batch_size), found {batch_size}")
    prepared = prepare(cases, tokenizer, engine.vocab_size, engine.max_input_len)
    batches = [prepared[i: i + batch_size] for i in range(0, len(prepared), batch_size)]
    for _ in range(warmup):
        generate(engine, tokenizer, [job for _, job in batches[0]], max_len)
    responses, timing = [], Timing()
    for batch in tqdm(batches, desc="batches", unit="batch", disable=None, file=sys.stderr):
        generations, batch_timing = generate(engine, tokenizer, [job for _, job in batch], max_len)
        timing.add(batch_timing)
        for batch_idx, ((prompt, _), gen) in enumerate(zip(batch, generations)):
            request_idx = len(responses)
            responses.append(response_json(
                request_idx, batch_idx, cases.requests[request_idx], prompt.system_text, prompt.text, gen.text,
                gen.finish_reason, logprobs_json(tokenizer, gen)))
    return responses, timing


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-inference --engineDir engines/smollm2 --inputFile examples/llm_basic.json --outputFile out.json"))
@click.option("--engineDir", "engine_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Engine directory written by llm-build (engines, config.json, tokenizer, chat template); it runs on "
                   "the backend it was built for (ONNX Runtime on the CPU, or TensorRT on a GPU).")
@click.option("--inputFile", "input_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Test-case JSON: sampling settings and requests (see examples/*.json).")
@click.option("--outputFile", "output_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the responses JSON (written only when every request has finished).")
@click.option("--batchSize", "batch_size", type=click.IntRange(min=1), default=None,
              help="Requests per batch; overrides batch_size of the input file.")
@click.option("--maxGenerateLength", "max_generate_length", type=click.IntRange(min=1), default=None,
              help="Most new tokens per request; overrides max_generate_length of the input file.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Untimed generations of the first batch before the real run.")
@click.option("--dumpProfile", "dump_profile", is_flag=True,
              help="Print prefill / decode throughput and time to first token, and add them to the output as "
                   "'profile'.")
def cli(engine_dir: Path, input_file: Path, output_file: Path, batch_size: int | None,
        max_generate_length: int | None, warmup: int, dump_profile: bool) -> None:
    """Generate answers for the requests of INPUTFILE with the engine in ENGINEDIR.

    Sampling (temperature, top_k, top_p, logit_bias, sampling_seed), chat-template options and stop strings are read
    from the input file only; greedy decoding is top_k 1 or temperature 0.
    """
    # onnxruntime (or TensorRT) is imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from runtime.engine import Engine

    if not output_file.resolve().parent.is_dir():
        raise InputError(f"--outputFile: expected a path in an existing directory, found {output_file}")
    cases = load_test_cases(input_file)
    engine = Engine.load(engine_dir)
    tokenizer = load_tokenizer(engine_dir)
    responses, timing = run_test_cases(engine, tokenizer, cases, batch_size, max_generate_length, warmup)
    output = {"input_file": str(input_file), "responses": responses}
    if dump_profile:
        output["profile"] = timing.profile()
        for key, value in output["profile"].items():
            click.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}", err=True)
    write_json_atomic(output_file, output, flag="--outputFile", inputs=[input_file, engine_dir])


def main(argv: list[str] | None = None) -> int:
    """`llm-inference`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
