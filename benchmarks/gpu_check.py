"""The one command for a lent GPU: the `gpu` tests of the Triton kernels, then the attention and FP8-gather
benchmarks, then the sm_90 compile report, each phase in its own process under its own time limit, everything
written under `--out` (default `$OUT`). A phase that fails or runs out of time is recorded and the next one runs;
rows a benchmark finished before its limit are kept. Results are rewritten after every phase, so whatever has
finished is on disk even if the whole command is stopped.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_check               # on the GPU machine, < 5 minutes
    PYTHONPATH=. python -m benchmarks.gpu_check --dry-run --out /tmp/gpu_check    # CPU: every phase at tiny sizes

Writes (at most 5 files, flat, so the device tool brings all of them back): `gpu_check.json` (environment, phases,
tests, every row, targets), `gpu_check.md` (the tables to paste into docs/gpu-kernels.md), `gpu_check.log` (every
phase's output), `pytest-gpu.xml` and `pytest-gpu.log` (the tests).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import click

from benchmarks.measure import markdown, nvidia_smi, read_rows, versions

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_fp8_gather.py"]
PHASES = ("env", "tests", "prefill", "decode", "gather", "compile")
MAIN_LOG = "gpu_check.log"


@dataclass
class Phase:
    name: str
    what: str
    limit_s: float  # seconds reserved for this phase; time left over by earlier phases is added to it
    argv: list[str]
    log: str = MAIN_LOG


def plan(out: Path, scratch: Path, dry_run: bool) -> list[Phase]:
    py, rows = sys.executable, str(scratch / "rows.jsonl")
    dry = ["--dry-run"] if dry_run else []
    bench = ["--rows", rows, *dry]
    # A dry run runs the interpreter tests of the gather kernel and the sm_90 compile check (the gpu ones skip).
    select = ["-k", "gather or hopper"] if dry_run else ["-m", "gpu"]
    pytest = [py, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *select, *TEST_FILES,
              f"--junitxml={out / 'pytest-gpu.xml'}"]
    return [
        Phase("env", "device, driver and versions as torch sees them", 20,
              [py, "-m", "benchmarks.measure", "--json", str(scratch / "env.json")]),
        Phase("tests", "gpu-marked kernel tests against the torch references, full sizes", 80, pytest, "pytest-gpu.log"),
        Phase("prefill", "FP8 vs FP16 vs SDPA prefill, 3 models x batch 1/4/8 x seq 4096/1024/512", 80,
              [py, "-m", "benchmarks.fmha", "--phase", "prefill", "--out", str(scratch / "fmha_prefill.json"), *bench]),
        Phase("decode", "FP8 vs FP16 cache decode, 32768..4096 tokens", 45,
              [py, "-m", "benchmarks.fmha", "--phase", "decode", "--out", str(scratch / "fmha_decode.json"), *bench]),
        Phase("gather", "FP8 gather bandwidth vs device copy, 1..8192 tokens of hidden 4096", 30,
              [py, "-m", "benchmarks.fp8_gather", "--out", str(scratch / "fp8_gather.json"), *bench]),
        Phase("compile", "sm_90 registers / spills / tensor-core instructions with this Triton", 20,
              [py, "-m", "benchmarks.kernel_resources", "--rows", rows]),
    ]


def say(text: str, log) -> None:
    click.echo(text)
    log.write(text + "\n")
    log.flush()


def run_phase(phase: Phase, limit: float, out: Path, env: dict, main_log) -> dict:
    """Run one phase in its own process group, its output streamed to the console and its log; kill the group at
    `limit` seconds."""
    say(f"\n=== {phase.name}: {phase.what} (limit {limit:.0f} s)\n$ {' '.join(phase.argv)}", main_log)
    started = time.monotonic()
    with open(out / phase.log, "a") as log:
        proc = subprocess.Popen(phase.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump():  # line by line, flushed: a stopped run still leaves its output on disk
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the phase's own process group, nothing else
            rc = proc.wait()
            status = "timed out"
        reader.join(timeout=10)
    seconds = time.monotonic() - started
    if phase.log != MAIN_LOG:
        main_log.write(f"(output in {phase.log})\n")
    say(f"=== {phase.name}: {status} (exit {rc}) after {seconds:.1f} s", main_log)
    return dict(name=phase.name, status=status, rc=rc, seconds=round(seconds, 1), limit_s=round(limit, 1))


def tests_summary(out: Path) -> dict | None:
    """Counts and failing tests from pytest's junit XML; if pytest was stopped before writing it, from the verbose
    log's PASSED / FAILED / SKIPPED lines (marked partial). None if pytest never ran."""
    try:
        cases = list(ET.parse(out / "pytest-gpu.xml").getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        return log_summary(out / "pytest-gpu.log")
    summary = dict(passed=0, failed=0, skipped=0, failures=[], partial=False)
    for case in cases:
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            summary["failed"] += 1
            summary["failures"].append(dict(test=name, message=(bad.get("message") or "")[:300]))
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
        else:
            summary["passed"] += 1
    return summary


def log_summary(log: Path) -> dict | None:
    if not log.exists():
        return None
    summary = dict(passed=0, failed=0, skipped=0, failures=[], partial=True)
    for line in log.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2 and "::" in words[0] and words[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            key = {"PASSED": "passed", "SKIPPED": "skipped"}.get(words[1], "failed")
            summary[key] += 1
            if key == "failed":
                summary["failures"].append(dict(test=words[0], message="see pytest-gpu.log"))
    return summary


FMHA, GATHER = "`benchmarks.fmha` (in `gpu_check`)", "`benchmarks.fp8_gather` (in `gpu_check`)"
TARGET_ROWS = {  # (the wording of docs/gpu-kernels.md's target table, measured by)
    "fp8_prefill_faster_than_fp16_everywhere": (
        "FP8 prefill faster than our FP16 kernel in every config (3 models × batch 1/4/8 × seq 512/1024/4096)", FMHA),
    "fp8_prefill_ge_1.3x_sdpa_flash": ("FP8 prefill ≥ 1.3× torch SDPA fp16 (flash) at seq 4096", FMHA),
    "fp8_prefill_ge_1.3x_sdpa_cudnn": ("(for reference, not a target) FP8 prefill ≥ 1.3× torch SDPA fp16 (cuDNN) at "
                                       "seq 4096", FMHA),
    "decode_fp8_ge_1.6x_fp16": ("decode over an FP8 cache ≥ 1.6× over an FP16 cache at 32768 tokens", FMHA),
    "fp8_gather_ge_70pct_copy": ("FP8 gather ≥ 70 % of device copy bandwidth at 4096 tokens of hidden 4096", GATHER),
    "wrong_results": ("configurations whose output disagreed with the reference (their speed does not count)", FMHA),
}


def collect(out: Path, scratch: Path, env: dict, phases: list[dict], dry_run: bool, started: str) -> dict:
    from benchmarks import fmha, fp8_gather

    rows = read_rows(scratch / "rows.jsonl")
    by_kind = {kind: [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == kind]
               for kind in ("prefill", "decode", "copy", "gather", "compile")}
    grid = fmha.DRY if dry_run else fmha.FULL
    gather_tokens = fp8_gather.DRY["tokens"][0] if dry_run else fp8_gather.TARGET_TOKENS
    targets = fmha.targets(by_kind["prefill"], by_kind["decode"], grid)
    if by_kind["gather"]:
        targets["fp8_gather_ge_70pct_copy"] = fp8_gather.target(by_kind["gather"], gather_tokens)
    else:
        targets["fp8_gather_ge_70pct_copy"] = dict(met=None, result="not measured")
    try:
        env = {**env, **json.loads((scratch / "env.json").read_text())}
    except (OSError, json.JSONDecodeError):
        pass
    tests = tests_summary(out)
    problems = [f"phase {p['name']} {p['status']} (exit {p['rc']})" for p in phases if p["status"] != "ok"]
    if tests and tests["failed"]:
        problems.append(f"{tests['failed']} test(s) failed")
    if not dry_run and tests is not None and tests["passed"] == 0:
        problems.append("no gpu test ran (all skipped: is a CUDA GPU visible to torch?)")
    if not dry_run and env.get("cuda_available") is False:
        problems.append("torch sees no CUDA GPU")
    if dry_run:
        targets = {k: {**v, "result": f"(dry run) {v['result']}"} for k, v in targets.items()}
    return dict(started=started, dry_run=dry_run, env=env, phases=phases, problems=problems, tests=tests,
                targets=targets, **by_kind)


def report(results: dict) -> str:
    """The Markdown section for docs/gpu-kernels.md."""
    from benchmarks import fmha, fp8_gather, kernel_resources

    env = results["env"]
    device = env.get("device") or env.get("name") or "no GPU"
    lines = [f"## Measured on {device} ({results['started'][:10]})", ""]
    if results["dry_run"]:
        lines += ["> **DRY RUN on the CPU (Triton interpreter, tiny sizes, host-clock times): these numbers prove the "
                  "plumbing only and must never be pasted as measurements.**", ""]
    lines += [f"Driver {env.get('driver_version', '?')}, CUDA {env.get('torch_cuda', '?')}, torch {env.get('torch')}, "
              f"Triton {env.get('triton')}, Python {env.get('python')}; {env.get('sms', '?')} SMs, "
              f"{env.get('l2_mib', '?')} MiB L2. Command: `PYTHONPATH=. python3 -m benchmarks.gpu_check`.", ""]
    lines += [markdown(results["phases"], ["name", "status", "rc", "seconds", "limit_s"]), ""]
    lines += [f"**Problem: {p}.**" for p in results["problems"]] + ([""] if results["problems"] else [])
    tests = results["tests"]
    if tests is None:
        lines += ["**`gpu` tests: not run, or no result (no junit file, no log).**", ""]
    else:
        partial = " (stopped before the end: counts from the log)" if tests["partial"] else ""
        lines += [f"**`gpu` tests** ({', '.join(TEST_FILES)}): {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['skipped']} skipped{partial}.", ""]
        lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in tests["failures"]]
        lines += [""] if tests["failures"] else []
    lines += ["### Targets of issue 5", "", "| target | measured by | result |", "|---|---|---|"]
    lines += [f"| {' | '.join(TARGET_ROWS.get(k, (k, '')))} | {v['result']} |" for k, v in results["targets"].items()]
    lines += ["", fmha.tables(results["prefill"], results["decode"])]
    if results["gather"]:
        copy = results["copy"][0]["gbps"] if results["copy"] else float("nan")
        lines += [f"### FP8 gather (device copy bandwidth {copy:.0f} GB/s, read + write)", "",
                  markdown(sorted(results["gather"], key=lambda r: r["tokens"]), fp8_gather.COLUMNS), ""]
    if results["compile"]:
        lines += [f"### Compiled for sm_90 with Triton {results['compile'][0].get('triton')}", "",
                  markdown(results["compile"], kernel_resources.COLUMNS), ""]
    return "\n".join(lines)


def summary(results: dict, out: Path) -> str:
    tests = results["tests"] or {}
    lines = ["=== summary: " + ", ".join(f"{p['name']} {p['status']} {p['seconds']:.0f}s" for p in results["phases"]),
             f"tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} skipped"]
    lines += [f"FAILED {f['test']}: {f['message'][:160]}" for f in tests.get("failures", [])]
    lines += [f"target {k}: {v['result']}" for k, v in results["targets"].items()]
    lines += [f"PROBLEM: {p}" for p in results["problems"]]
    lines += [f"files: {', '.join(sorted(p.name for p in out.iterdir()))} in {out}"]
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    from contract.atomic import write_json_atomic

    write_json_atomic(out / "gpu_check.json", results)
    tmp = out / "gpu_check.md.partial"
    tmp.write_text(report(results))
    tmp.replace(out / "gpu_check.md")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=lambda: os.environ.get("OUT", "benchmarks/results/gpu_check"),
              show_default="$OUT, else benchmarks/results/gpu_check", help="directory for the results (created)")
@click.option("--budget-s", default=285.0, show_default=True,
              help="seconds for all phases together; each phase's reserve is scaled to fit")
@click.option("--dry-run", is_flag=True, help="no GPU: every phase at tiny sizes on the Triton CPU interpreter")
@click.option("--only", multiple=True, type=click.Choice(PHASES), help="run only this phase (repeatable)")
def main(out: Path, budget_s: float, dry_run: bool, only: tuple[str, ...]) -> None:
    """Run the GPU tests and benchmarks of the Triton kernels in time-limited phases; write JSON, Markdown, logs."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    deadline = time.monotonic() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    for name in (MAIN_LOG, "pytest-gpu.log", "pytest-gpu.xml"):
        (out / name).unlink(missing_ok=True)  # our own outputs of an earlier run
    env_info = {**nvidia_smi(), **versions()}
    with open(out / MAIN_LOG, "a") as log:
        say(f"gpu_check {'DRY RUN ' if dry_run else ''}{started}: GPU {env_info.get('name', '-')}, "
            f"driver {env_info.get('driver_version', '-')}, torch {env_info['torch']}, triton {env_info['triton']}, "
            f"python {env_info['python']}; results in {out.resolve()}", log)
        with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
            scratch = Path(tmp)
            phases = [p for p in plan(out.resolve(), scratch, dry_run) if not only or p.name in only]
            scale = min(1.0, budget_s / sum(p.limit_s for p in phases))
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
            env["PYTHONUNBUFFERED"] = "1"
            records = []
            for i, phase in enumerate(phases):
                reserved_later = scale * sum(p.limit_s for p in phases[i + 1:])
                limit = max(1.0, deadline - time.monotonic() - reserved_later)
                records.append(run_phase(phase, limit, out, env, log))
                results = collect(out, scratch, env_info, records, dry_run, started)
                write_results(out, results)
        say("\n" + report(results), log)
        say("\n" + summary(results, out), log)  # last, so the device tool's output tail always holds it
    sys.exit(1 if results["problems"] else 0)


if __name__ == "__main__":
    main()
