"""What every command promises (contract.cli, docs/contracts.md "Commands"): `--help` with a worked example that needs
none of the heavy libraries; bad usage is one `error:` line and exit 2; Ctrl-C is exit 130 without a traceback, also
while the command imports torch / transformers / onnx / onnxruntime. Each check runs the real entry point in a fresh
interpreter, as a user's shell would."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, run_cli, sigint_as_from_a_terminal

HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "safetensors", "tokenizers")
# module -> arguments that parse, so the command goes on into its heavy imports ({tmp}: a fresh directory)
COMMANDS = {
    "quantization.cli": ["llm", "--model_dir", "{tmp}/model", "--output_dir", "{tmp}/quantized"],
    "llm_loader.export_all_cli": ["{tmp}/model", "{tmp}/out"],
    "llm_loader.gguf_convert": ["{tmp}/model.gguf", "{tmp}/out"],
    "builder.cli": ["--onnxDir", "{tmp}/out/llm", "--engineDir", "{tmp}/engine"],
    "runtime.cli": ["--engineDir", "{tmp}/engine", "--inputFile", "{tmp}/in.json", "--outputFile", "{tmp}/out.json"],
}
# files a command's inputs need before it imports anything heavy (it checks its flags and input files first)
SETUP = {"quantization.cli": {"model/config.json": "{}"}}
HELP_ARGS = [(module, []) for module in COMMANDS] + [("quantization.cli", ["llm"]), ("quantization.cli", ["draft"])]

HELP_SCRIPT = """
import importlib, json, sys
module, args = sys.argv[1], sys.argv[2:]
code = importlib.import_module(module).main([*args, "--help"])
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)

# A Ctrl-C that arrives just as the command starts importing a heavy library: SIGINT sent to the process itself
# from inside the import system, the way the terminal would deliver it.
CTRL_C_SCRIPT = """
import importlib, os, signal, sys

class CtrlCDuringHeavyImport:
    def find_spec(self, name, path=None, target=None):
        if name in %r:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCDuringHeavyImport())
sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
""" % (HEAVY,)


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          preexec_fn=sigint_as_from_a_terminal)


@pytest.mark.parametrize("module,args", HELP_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_help_shows_an_example_without_heavy_imports(module, args):
    result = python("-c", HELP_SCRIPT, module, *args)
    assert result.returncode == 0, result.stderr
    *help_lines, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["code"] == 0 and report["heavy"] == []
    help_text = "\n".join(help_lines)
    assert "Usage:" in help_text and "Example:" in help_text


@pytest.mark.parametrize("module", COMMANDS)
def test_ctrl_c_during_heavy_imports_exits_130_without_traceback(module, tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[module]]
    for name, text in SETUP.get(module, {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = python("-c", CTRL_C_SCRIPT, module, *args)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(SETUP.get(module, {}))  # nothing written


@pytest.mark.parametrize("module", COMMANDS)
def test_usage_error_is_one_error_line_and_exit_2(module):
    result = run_cli(importlib.import_module(module).main, "--no-such-flag")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "--no-such-flag" in result.stderr


def test_gguf_convert_bad_input_is_one_error_line_and_exit_2(tmp_path):
    from llm_loader.gguf_convert import main

    result = run_cli(main, tmp_path / "missing.gguf", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'missing.gguf'}: expected a GGUF file")
    assert not (tmp_path / "out").exists()


def test_console_scripts_are_the_entry_points():
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.M))  # tomllib needs Python 3.11
    assert scripts == {"llm-quantize": "quantization.cli:main", "llm-export": "llm_loader.export_all_cli:main",
                       "llm-build": "builder.cli:main", "llm-inference": "runtime.cli:main"}
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
