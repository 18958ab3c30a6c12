"""A normal run prints no third-party warning: quantize -> export -> build -> inference on a tiny checkpoint, in one
fresh interpreter (so each warning that fires once per process fires here), with Python's warnings shown and ONNX
Runtime's own log on the process's stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import CALIBRATION_TEXT, REPO

RUN = """
import sys
from builder.cli import main as build
from llm_loader.export_all_cli import main as export
from quantization.cli import main as quantize
from runtime.cli import main as inference

ckpt, work, cases, text = sys.argv[1:]
steps = [
    (quantize, ["llm", "--model_dir", ckpt, "--output_dir", f"{work}/q", "--quantization", "fp8", "--text_dataset",
                text, "--num_samples", "4", "--max_seq_len", "32"]),
    (export, [f"{work}/q", f"{work}/out", "--fp8-embedding"]),
    (build, ["--onnxDir", f"{work}/out/llm", "--engineDir", f"{work}/engine", "--maxBatchSize", "2",
             "--maxInputLen", "64", "--maxKVCacheCapacity", "128"]),
    (inference, ["--engineDir", f"{work}/engine", "--inputFile", cases, "--outputFile", f"{work}/out.json"]),
]
for main, argv in steps:
    assert main(argv) == 0, argv
"""

WARNING_MARKS = ("Warning", "warning:", "warnings.warn", "[W:onnxruntime")


def test_quantize_export_build_inference_print_no_warnings(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"batch_size": 2, "top_k": 1, "max_generate_length": 4, "requests": [
        {"messages": [{"role": "user", "content": "Name a color."}]},
        {"messages": [{"role": "user", "content": "Say hi."}]}]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-c", RUN, str(ckpt), str(tmp_path), str(cases), str(CALIBRATION_TEXT)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    noisy = [line for line in result.stderr.replace("\r", "\n").splitlines()
             if any(mark in line for mark in WARNING_MARKS)]
    assert not noisy, "\n".join(noisy)
    assert len(json.loads((tmp_path / "out.json").read_text())["responses"]) == 2
