"""The backend registries: one list of names (`contract.backends`) keys the engine dir's file names, `llm-build
--backend`, the builder's backends and the runtime's; every registered backend implements every member of its side's
Protocol; and an ONNX Runtime engine whose graphs disagree with its config is refused by its backend's check, which
`load_engine_config` runs for the runtime (and for the builder: tests/test_eagle_build.py)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from helpers import export_and_build, make_tiny_checkpoint

from builder.backends import BUILD_BACKENDS, BuildBackend, build_backend
from builder.cli import BACKEND_CHOICES, cli
from contract.backends import AUTO, BACKENDS, ENGINE_SUFFIX, ONNXRUNTIME, TENSORRT
from contract.eagle3 import ROLE_BASE, ROLE_DRAFT, ROLE_LLM
from contract.engine_dir import engine_files, load_engine_config, role_files
from contract.errors import InputError
from runtime.engine import (
    RUNTIME_BACKENDS,
    Backend,
    Engine,
    backend_class,
    check_engine_files,
)
from runtime.onnxruntime_backend import OnnxRuntimeBackend


def protocol_members(protocol: type) -> dict[str, list[str] | None]:
    """Every member a Protocol declares: a method's parameter names without `self`, None for a data member."""
    members: dict[str, list[str] | None] = {name: None for name in protocol.__annotations__}
    for name, value in vars(protocol).items():
        if isinstance(value, staticmethod):
            members[name] = list(inspect.signature(value.__func__).parameters)
        elif inspect.isfunction(value) and not name.startswith("_"):
            members[name] = list(inspect.signature(value).parameters)[1:]
    return members


def test_the_protocols_are_read_as_declared():
    build = protocol_members(BuildBackend)
    assert build["requires"] is None and build["build_llm"] == ["job"]
    assert build["check_engines"] == ["engine_dir", "config"] and len(build) == 9
    run = protocol_members(Backend)
    assert run["hidden_dtype"] is None and run["run"] == ["kv", "inputs", "outputs"]
    assert run["check_engines"] == ["engine_dir", "config"] and len(run) == 10


def test_one_list_of_backend_names_keys_every_registry():
    assert BACKENDS == tuple(ENGINE_SUFFIX) == (ONNXRUNTIME, TENSORRT)
    assert set(BUILD_BACKENDS) == set(RUNTIME_BACKENDS) == set(BACKENDS)
    (option,) = [p for p in cli.params if p.name == "backend"]
    assert tuple(option.type.choices) == BACKEND_CHOICES == (AUTO, *BACKENDS)


@pytest.mark.parametrize("name", BACKENDS)
def test_every_build_backend_implements_the_protocol(name):
    backend = build_backend(name)
    for member, params in protocol_members(BuildBackend).items():
        assert hasattr(backend, member), f"{backend.__name__} has no {member}"
        if params is None:
            assert not callable(getattr(backend, member)), member
        else:
            assert list(inspect.signature(getattr(backend, member)).parameters) == params, member


@pytest.mark.parametrize("name", BACKENDS)
def test_every_runtime_backend_implements_the_protocol(name):
    cls = backend_class(name)
    init = inspect.getsource(cls.__init__)
    assert list(inspect.signature(cls).parameters) == ["engine_dir", "config", "kv", "constants"]
    for member, params in protocol_members(Backend).items():
        if params is None:  # a class attribute, or set when the engine opens
            assert hasattr(cls, member) or f"self.{member} =" in init, f"{cls.__name__} has no {member}"
        else:
            method = inspect.getattr_static(cls, member)
            func = method.__func__ if isinstance(method, staticmethod) else method
            names = list(inspect.signature(func).parameters)
            assert (names if isinstance(method, staticmethod) else names[1:]) == params, member


def test_engine_file_names_come_from_the_registry():
    """The reference's names (3.1) with each backend's suffix; a build of a role may replace either backend's."""
    assert engine_files(ROLE_LLM, ONNXRUNTIME) == ("llm.onnx", "embedding.onnx")
    assert engine_files(ROLE_BASE, TENSORRT) == ("spec_base.engine", "embedding.engine")
    assert engine_files(ROLE_DRAFT, ONNXRUNTIME) == ("spec_draft.onnx",)
    for backend, suffix in ENGINE_SUFFIX.items():
        for role in (ROLE_LLM, ROLE_BASE, ROLE_DRAFT):
            assert all(name.endswith(suffix) for name in engine_files(role, backend))
            assert {n for name in engine_files(role, backend) for n in (name, name + ".data")} <= role_files(role)


def test_auto_picks_onnxruntime_exactly_when_tensorrt_is_missing():
    from builder.cli import resolve_backend

    missing = build_backend(TENSORRT).missing()
    backend, why = resolve_backend(AUTO)
    assert (backend, why) == ((ONNXRUNTIME, f"auto: {missing}") if missing else
                              (TENSORRT, "auto: TensorRT and a CUDA GPU found"))
    assert build_backend(ONNXRUNTIME).missing() is None


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("backends")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    return export_and_build(ckpt, root / "out")[1]


def edited(engine: Path, tmp_path: Path, **changes) -> Path:
    eng = Path(shutil.copytree(engine, tmp_path / "eng"))
    config = json.loads((eng / "config.json").read_text())
    (eng / "config.json").write_text(json.dumps({**config, **changes}))
    return eng


def test_a_tampered_ort_engine_is_refused_by_its_backend(engine, tmp_path):
    """The contract checks the config's fields and names the files; the ONNX Runtime backend reads its graphs."""
    eng = edited(engine, tmp_path, num_key_value_heads=1)
    config = load_engine_config(eng)  # no backend check asked for: the config alone is well formed
    with pytest.raises(InputError) as direct:
        OnnxRuntimeBackend.check_engines(eng, config)
    assert str(direct.value) == (f"{eng / 'config.json'}: num_key_value_heads 1 disagrees with {eng / 'llm.onnx'} "
                                 "past_key_values_0.key shape ['batch', 2, 'kv_capacity', 16]; rebuild the engine")
    for refuse in (lambda: load_engine_config(eng, check_engines=check_engine_files), lambda: Engine.load(eng)):
        with pytest.raises(InputError) as err:
            refuse()
        assert str(err.value) == str(direct.value)


def test_an_engine_dir_of_an_unknown_backend_is_refused(engine, tmp_path):
    eng = edited(engine, tmp_path)
    config = json.loads((eng / "config.json").read_text())
    (eng / "config.json").write_text(json.dumps({**config, "builder_config": {**config["builder_config"],
                                                                              "backend": "openvino"}}))
    with pytest.raises(InputError, match=r"builder_config.backend: expected one of \['onnxruntime', 'tensorrt'\], "
                                         "found 'openvino'"):
        Engine.load(eng)
