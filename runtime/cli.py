"""`llm-inference`: run the requests of a test-case JSON on an engine directory and write the responses JSON.

Requests are formatted (chat template or raw text), tokenized, cut into batches of `batch_size` in file order and
generated batch by batch. The output file is written only when every batch has finished; any bad input ends the
run with `error: <message>` on stderr and exit code 2, and no output file.

With `--specDecode` the engine dir holds an EAGLE3 base and draft (`llm-build --specBase` / `--specDraft`) and greedy
batches decode speculatively (runtime/spec_decode.py); a batch with `disable_spec_decode`, a `logit_bias` or
sampling decodes plainly on the base engine, like the reference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from contract.atomic import write_json_atomic
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.errors import InputError
from runtime.chat import Prompt, format_prompt, load_tokenizer, token_bytes
from runtime.eagle_tree import CPU_TREE, TreeShape
from runtime.generate import Generation, Job, Timing, check_prompts, generate
from runtime.progress import Progress, summary_line
from runtime.requests import Request, TestCases, load_test_cases, response_json
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


def speculates(requests: list[Request], jobs: list[Job]) -> bool:
    """Whether a batch decodes speculatively under --specDecode: greedy, no logit bias, no disable_spec_decode
    (which, as in the reference, applies to its whole batch)."""
    return all(job.sampling.greedy and not job.sampling.logit_bias for job in jobs) and not any(
        req.disable_spec_decode for req in requests)


def run_test_cases(engine, tokenizer, cases: TestCases, batch_size: int | None = None,
                   max_generate_length: int | None = None, warmup: int = 0, spec=None,
                   shape: TreeShape | None = None, progress: Progress | None = None) -> tuple[list[dict], Timing]:
    """All responses of `cases` (reference 5.3 entries, in request order) and the timing of the real batches.

    `batch_size` / `max_generate_length` override the file's values, as the CLI flags do; a batch size larger than
    the engine's max_batch_size runs as batches of that size, in order, with a note on `progress`. With `spec` (the
    engine dir's `SpecEngines`; `engine` is then its base) greedy batches decode speculatively with tree `shape`.
    """
    progress = progress or Progress(len(cases.requests), enabled=False)
    source = "--batchSize" if batch_size else f"{cases.source}: batch_size"
    asked = batch_size or cases.batch_size
    most = spec.max_batch_size if spec is not None else engine.max_batch_size
    batch_size = min(asked, most)
    max_len = max_generate_length or cases.max_generate_length
    if asked > batch_size:
        progress.note(f"{source} {asked} is more than the engine's max_batch_size {batch_size}: running the "
                      f"{len(cases.requests)} requests in batches of {batch_size}, in order")
    max_input_len = min(spec.base.max_input_len, spec.draft.max_input_len) if spec is not None else engine.max_input_len
    prepared = prepare(cases, tokenizer, engine.vocab_size, max_input_len)
    check_prompts([job for _, job in prepared], max_input_len)  # all of them before the first batch runs
    starts = range(0, len(prepared), batch_size)
    batches = [(prepared[i: i + batch_size], cases.requests[i: i + batch_size]) for i in starts]

    def run(batch, requests, on_tokens=None):
        jobs = [job for _, job in batch]
        if spec is not None and speculates(requests, jobs):
            from runtime.spec_decode import generate_spec

            generations, batch_timing = generate_spec(spec, tokenizer, jobs, max_len, shape)
            if on_tokens:  # the speculative path reports its tokens per batch
                on_tokens(sum(len(g.token_ids) for g in generations))
            return generations, batch_timing
        return generate(engine, tokenizer, jobs, max_len, on_tokens)

    for _ in range(warmup):
        run(*batches[0])
    responses, timing = [], Timing()
    for batch, requests in batches:
        generations, batch_timing = run(batch, requests, progress.tokens_generated)
        timing.add(batch_timing)
        for batch_idx, ((prompt, _), gen) in enumerate(zip(batch, generations)):
            request_idx = len(responses)
            responses.append(response_json(
                request_idx, batch_idx, cases.requests[request_idx], prompt.system_text, prompt.text, gen.text,
                gen.finish_reason, logprobs_json(tokenizer, gen)))
        progress.requests_done(len(batch))
    return responses, timing


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "llm-inference --engineDir engines/smollm2 --inputFile examples/llm_basic.json --outputFile out.json",
    "llm-inference --engineDir engines/eagle --inputFile examples/greedy_batch.json --outputFile out.json "
    "--specDecode --specDraftTopK 2 --specDraftStep 4 --specVerifySize 9 --dumpProfile"))
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, notes or summary line on stderr (errors only).")
@click.option("--dumpProfile", "dump_profile", is_flag=True,
              help="Print prefill / decode throughput and time to first token (with --specDecode also the mean "
                   "tokens emitted per verification step), and add them to the output as 'profile'.")
@click.option("--specDecode", "--eagle", "spec_decode", is_flag=True,
              help="EAGLE3 speculative decoding with the base and draft engines of ENGINEDIR (greedy batches; others "
                   "decode plainly on the base).")
@click.option("--specDraftTopK", "spec_top_k", type=int, default=None,
              help=f"Draft candidates kept per expanded node [default: {TreeShape().top_k} on TensorRT, as the "
                   f"reference; {CPU_TREE.top_k} on the CPU engine, see docs/eagle.md].")
@click.option("--specDraftStep", "spec_steps", type=int, default=None,
              help=f"Tree depth: draft proposal steps per verification [default: {TreeShape().steps} on TensorRT; "
                   f"{CPU_TREE.steps} on the CPU engine].")
@click.option("--specVerifySize", "--specVerifyTreeSize", "spec_verify_size", type=int, default=None,
              help="Tree nodes (the root included) verified per base call, at most the base's --maxVerifyTreeSize "
                   f"[default: {TreeShape().verify_size} on TensorRT; {CPU_TREE.verify_size} on the CPU engine].")
def cli(engine_dir: Path, input_file: Path, output_file: Path, batch_size: int | None,
        max_generate_length: int | None, warmup: int, quiet: bool, dump_profile: bool, spec_decode: bool,
        spec_top_k: int | None, spec_steps: int | None, spec_verify_size: int | None) -> None:
    """Generate answers for the requests of INPUTFILE with the engine in ENGINEDIR.

    Sampling (temperature, top_k, top_p, logit_bias, sampling_seed), chat-template options and stop strings are read
    from the input file only; greedy decoding is top_k 1 or temperature 0.
    """
    # onnxruntime (or TensorRT) is imported here, under contract.cli's Ctrl-C guard, not when --help is asked for
    from runtime.engine import Engine

    if not output_file.resolve().parent.is_dir():
        raise InputError(f"--outputFile: expected a path in an existing directory, found {output_file}")
    cases = load_test_cases(input_file)
    spec, shape = None, None
    if spec_decode:
        from runtime.spec_decode import SpecEngines

        spec = SpecEngines.load(engine_dir)
        backend = spec.base.config["builder_config"]["backend"]
        shape = TreeShape.default(backend).with_flags(spec_top_k, spec_steps, spec_verify_size)
        spec.check_shape(shape)
        engine = spec.base
    else:
        engine = Engine.load(engine_dir)
    tokenizer = load_tokenizer(engine_dir)
    start = time.perf_counter()
    progress = Progress(len(cases.requests), enabled=not quiet)
    try:
        responses, timing = run_test_cases(engine, tokenizer, cases, batch_size, max_generate_length, warmup, spec,
                                           shape, progress)
    finally:
        progress.close()
    output = {"input_file": str(input_file), "responses": responses}
    if dump_profile:
        output["profile"] = timing.profile()
        for key, value in output["profile"].items():
            click.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}", err=True)
    write_json_atomic(output_file, output, flag="--outputFile", inputs=[input_file, engine_dir])
    progress.summary(summary_line(len(responses), timing, time.perf_counter() - start) + f"; wrote {output_file}")


def main(argv: list[str] | None = None) -> int:
    """`llm-inference`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
