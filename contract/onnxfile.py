"""Opening an ONNX file a stage was handed: `model.onnx` of an export, `llm.onnx` / `embedding.onnx` of an engine dir.

A truncated or foreign file makes `onnx.load` raise protobuf's DecodeError. Each external-data entry names a file,
an offset and a length; a hostile or damaged one can name an absolute path, `../x`, a symlink, a range past the end
of the data file, or a length that disagrees with the tensor's dtype and shape (a dtype that lies about its bytes),
and onnx or ONNX Runtime would then read outside the directory or fail deep inside. `load_model` checks all of that
before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo

from contract.errors import InputError
from contract.paths import checked_file

_PACKED_4BIT = {onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of `graph` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and shape take when stored raw (4-bit types two per byte); None for strings."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    numel = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (numel + 1) // 2
    try:
        return numel * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _check_tensor_bytes(path: Path, tensor: onnx.TensorProto, sizes: dict[str, int]) -> None:
    expected = tensor_nbytes(tensor)
    where = f"{path} initializer {tensor.name!r}"
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        if tensor.HasField("raw_data") and expected is not None and len(tensor.raw_data) != expected:
            raise InputError(f"{where}: expected {expected} bytes for its dtype and shape {list(tensor.dims)}, found "
                             f"{len(tensor.raw_data)}")
        return
    info = ExternalDataInfo(tensor)
    location = str(info.location)
    if location not in sizes:
        file = checked_file(path.parent, location, "an ONNX external data file")
        if file.is_symlink():
            raise InputError(f"{file}: expected an ONNX external data file, found a symbolic link")
        sizes[location] = file.stat().st_size
    size, offset = sizes[location], int(info.offset or 0)
    length = int(info.length) if info.length else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"{where}: expected bytes {offset}..{offset + length} of {location}, found a file of "
                         f"{size} bytes (truncated?)")
    if expected is not None and length != expected:
        raise InputError(f"{where}: expected {expected} bytes for its dtype and shape {list(tensor.dims)}, found "
                         f"{length} in {location}")


def load_model(path: str | Path, what: str, *, weights: bool = False) -> onnx.ModelProto:
    """The ONNX model at `path` (`what` names it in messages) after the checks of the module docstring; with
    `weights`, its external data loaded too."""
    path = Path(path)
    checked_file(path.parent, path.name, what)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, or onnx's own errors for a foreign file
        raise InputError(f"{path}: expected {what} (an ONNX model), found a file onnx cannot parse "
                         f"({type(e).__name__}: {e})") from None
    if not model.graph.node or not model.graph.input:
        raise InputError(f"{path}: expected {what} (an ONNX model), found an empty graph")
    sizes: dict[str, int] = {}
    for tensor in _tensors(model.graph):
        _check_tensor_bytes(path, tensor, sizes)
    if weights:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # the checks above leave only I/O failures
            raise InputError(f"{path}: could not read its external data ({type(e).__name__}: {e})") from None
    return model
