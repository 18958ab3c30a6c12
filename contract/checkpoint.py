"""Lazy access to a Hugging Face checkpoint directory: `config.json` plus safetensors weights (one file or shards).

Tensors are read one at a time, each through its own short-lived `safe_open`, so the exporter's memory holds roughly
the tensor in hand and never the whole model (an open handle keeps the pages it touched mapped). Pickled weights
(`*.bin`, `*.pt`) can run code when loaded and are refused unless the caller opts in; so are models whose code lives
in the checkpoint (`auto_map`, i.e. `trust_remote_code`). Every file read must be a regular file inside the directory
(`contract.paths`: a symlink out of it or a shard index naming `../x.safetensors` is refused; the Hugging Face cache
layout is fine). The checkpoint remembers which tensors were read, so the exporter can refuse tensors the config does
not account for. The quantizer (before `transformers` loads anything) and the exporter both open checkpoints here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from contract.errors import InputError
from contract.jsonfile import read_json
from contract.paths import checked_file

INDEX = "model.safetensors.index.json"
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")  # a decoder layer's tensors: model.layers.N.*
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


@dataclass
class Checkpoint:
    """A checkpoint directory: its parsed `config.json` and where each tensor lives."""

    path: Path
    config: dict
    files: dict[str, Path]  # tensor name -> file holding it
    _pickled: dict[Path, dict] = field(default_factory=dict, repr=False)
    read: set[str] = field(default_factory=set, repr=False)  # names `tensor` has returned

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a fresh CPU tensor in the checkpoint's dtype)."""
        file = self.files.get(name)
        if file is None:
            raise InputError(f"{self.path}: expected tensor '{name}' in the checkpoint weights, found none")
        self.read.add(name)
        if file in self._pickled:
            return self._pickled[file][name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{file}: expected readable tensor '{name}', could not read it ({e})") from None

    def header(self, name: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype name such as 'F16') of one tensor, from its file's header: no data is read."""
        file = self.files[name]
        if file in self._pickled:
            t = self._pickled[file][name]
            return list(t.shape), str(t.dtype)
        with safe_open(str(file), framework="pt") as f:
            view = f.get_slice(name)
            return list(view.get_shape()), view.get_dtype()

    def tensor_fp16(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A floating-point tensor of the expected shape, cast to fp16 (the export dtype)."""
        t = self.tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise InputError(f"{self.path}: tensor '{name}' expected shape {list(shape)}, found {list(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"{self.path}: tensor '{name}' expected fp16, bf16 or fp32, found {t.dtype}")
        t = t.to(torch.float16)
        if not all(torch.isfinite(chunk).all() for chunk in t.view(-1).split(1 << 20)):  # chunks: no big temporaries
            raise InputError(f"{self.path}: tensor '{name}' expected finite values in fp16 range, found inf/nan")
        return t


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (`model.layers.N.`), None for the others."""
    m = LAYER_TENSOR.match(name)
    return int(m[1]) if m else None


def _safetensors_names(root: Path, name: str) -> tuple[Path, list[str]]:
    file = checked_file(root, name, "a safetensors shard")
    try:
        with safe_open(str(file), framework="pt") as f:
            return file, list(f.keys())
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: expected a safetensors file, found a corrupt one ({e})") from None


def _load_pickles(path: Path, files: list[Path]) -> tuple[dict[str, Path], dict[Path, dict]]:
    """Opt-in: tensors of `torch.save`d state dicts, memory-mapped and loaded with `weights_only`."""
    where, loaded = {}, {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise InputError(f"{file}: expected a torch state dict, could not load it ({e})") from None
        if not isinstance(state, dict):
            raise InputError(f"{file}: expected a torch state dict, found {type(state).__name__}")
        loaded[file] = state
        where.update({name: file for name in state})
    return where, loaded


def open_checkpoint(path: Path, allow_pickle: bool = False) -> Checkpoint:
    """Index a checkpoint directory without reading any weights."""
    path = Path(path)
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise InputError(f"{path}: expected a Hugging Face checkpoint directory, found {found}")
    config = read_json(checked_file(path, "config.json", "the model config"), "the model config")
    if config.get("auto_map"):
        raise InputError(
            f"{path / 'config.json'}: expected a built-in transformers architecture, found auto_map "
            "(custom modeling code needs trust_remote_code, which this toolchain refuses)"
        )

    index = checked_file(path, INDEX, "the safetensors shard index", required=False)
    if index is not None:
        weight_map = read_json(index, "the safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(s, str)
                                                                         for s in weight_map.values()):
            raise InputError(f"{index}: expected a non-empty 'weight_map' of tensor -> file name, found "
                             f"{weight_map!r:.60}")
        files = {}
        for shard in sorted(set(weight_map.values())):
            file, names = _safetensors_names(path, shard)
            names = set(names)
            files.update({n: file for n, s in weight_map.items() if s == shard and n in names})
        return Checkpoint(path, config, files)

    shards = [_safetensors_names(path, f.name) for f in sorted(path.glob("*.safetensors"))]
    if shards:
        return Checkpoint(path, config, {n: file for file, names in shards for n in names})

    pickles = sorted(checked_file(path, p.name, "pickled weights") for pattern in PICKLE_PATTERNS
                     for p in path.glob(pattern))
    if not pickles:
        raise InputError(f"{path}: expected *.safetensors weights, found none")
    if not allow_pickle:
        raise InputError(
            f"{path}: expected *.safetensors weights, found only pickled weights ({pickles[0].name}); pickles can run "
            "code when loaded, so they are refused: convert the checkpoint to safetensors"
        )
    where, loaded = _load_pickles(path, pickles)
    return Checkpoint(path, config, where, loaded)
