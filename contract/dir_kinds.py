"""Which of the pipeline's directories a path is, so that a command handed the wrong one can name the likely mistake
("export it first", "arguments swapped?", "use OUT/llm") instead of only the first check that failed.

Recognized from file names and config.json keys alone, never from weights; a path that matches none of the kinds is
None and the caller's own message stands. The kinds (contracts.md 1, 5, 6):
- a Hugging Face checkpoint: config.json with `model_type` or `architectures`, weights beside it, no model.onnx;
- an ONNX dir (`OUT/llm`): model.onnx and a config.json of ours (`contract_version`, no `builder_config`);
- an export root (`OUT`): no config.json of its own, an ONNX dir in `llm/`;
- an engine dir: a config.json with `builder_config`.
"""

from __future__ import annotations

from pathlib import Path

from contract.errors import InputError
from contract.jsonfile import read_json
from contract.paths import checked_file

HF_CHECKPOINT, ONNX_DIR, EXPORT_ROOT, ENGINE_DIR = "checkpoint", "onnx dir", "export root", "engine dir"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def _config(path: Path) -> dict | None:
    """config.json of `path` when it is a readable JSON object inside it (contract.paths), else None."""
    try:
        file = checked_file(path, "config.json", "a config", required=False)
        return read_json(file, "a config") if file is not None else None
    except InputError:
        return None


def dir_kind(path: str | Path) -> str | None:
    """HF_CHECKPOINT, ONNX_DIR, EXPORT_ROOT, ENGINE_DIR, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    config = _config(path)
    if config is None:
        return EXPORT_ROOT if dir_kind(path / "llm") == ONNX_DIR else None
    if "builder_config" in config:
        return ENGINE_DIR
    if (path / "model.onnx").is_file() and "contract_version" in config:
        return ONNX_DIR
    if ({"model_type", "architectures"} & config.keys() and not (path / "model.onnx").exists()
            and any(next(path.glob(pattern), None) for pattern in WEIGHT_GLOBS)):
        return HF_CHECKPOINT
    return None


def onnx_dir_mistake(onnx_dir: str | Path) -> str | None:
    """The likely mistake when `llm-build --onnxDir` is handed something that is not an ONNX dir."""
    onnx_dir = Path(onnx_dir)
    kind = dir_kind(onnx_dir)
    if kind == HF_CHECKPOINT:
        return (f"--onnxDir {onnx_dir}: expected an ONNX dir (OUT/llm, written by llm-export), found a Hugging Face "
                f"checkpoint; export it first with: llm-export {onnx_dir} OUT (add --fp8-embedding for an FP8 "
                "embedding table), then llm-build --onnxDir OUT/llm")
    if kind == EXPORT_ROOT:
        return (f"--onnxDir {onnx_dir}: expected an ONNX dir, found the root folder of an export; use --onnxDir "
                f"{onnx_dir / 'llm'}")
    if kind == ENGINE_DIR:
        return (f"--onnxDir {onnx_dir}: expected an ONNX dir, found an engine dir built by llm-build; run it with "
                f"llm-inference --engineDir {onnx_dir}, or build from the ONNX dir it came from")
    return None


def checkpoint_mistake(checkpoint: str | Path, other: str | Path | None, hint: str) -> str | None:
    """The likely mistake when a command that takes a Hugging Face checkpoint (`llm-export CKPT OUT`, `llm-quantize
    --model_dir`) is handed something else, ending with `hint` ("arguments swapped? ..."); `other` is the command's
    other directory argument, which is the checkpoint when the two were swapped."""
    checkpoint = Path(checkpoint)
    kind = dir_kind(checkpoint)
    found = {ONNX_DIR: "an ONNX dir written by llm-export", EXPORT_ROOT: "the output folder of llm-export",
             ENGINE_DIR: "an engine dir written by llm-build"}.get(kind)
    if found:
        return f"{checkpoint}: expected a Hugging Face checkpoint directory, found {found}; {hint}"
    if kind is None and other is not None and dir_kind(other) == HF_CHECKPOINT:
        what = "nothing" if not checkpoint.exists() else "no Hugging Face checkpoint"
        return f"{checkpoint}: expected a Hugging Face checkpoint directory, found {what}, but {other} is one; {hint}"
    return None
