"""A newcomer's usual mistakes with the pipeline's directories get one error line that names the mistake and what to
do: a checkpoint handed to llm-build, the export root instead of its llm/ folder, llm-export's arguments swapped, an
export handed to the quantizer. Nothing is written in any of these cases."""

from __future__ import annotations

import pytest
from helpers import export_and_build, make_tiny_checkpoint, run_cli

from builder.cli import main as build_main
from contract.dir_kinds import (
    ENGINE_DIR,
    EXPORT_ROOT,
    HF_CHECKPOINT,
    ONNX_DIR,
    dir_kind,
)
from llm_loader.export_all_cli import main as export_main
from quantization.cli import main as quantize_main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smollm2_checkpoint):
    """(checkpoint, export root, engine dir) of a tiny llama."""
    root = tmp_path_factory.mktemp("mistakes")
    ckpt = make_tiny_checkpoint("llama", root / "ckpt", smollm2_checkpoint)
    onnx_dir, engine_dir = export_and_build(ckpt, root)
    return ckpt, onnx_dir.parent, engine_dir


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[llm-build]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(*paths):
    return {p: sorted(x.name for x in p.rglob("*")) for p in paths}


def test_the_kinds_are_told_apart(dirs, tmp_path):
    ckpt, export_root, engine_dir = dirs
    assert [dir_kind(p) for p in (ckpt, export_root, export_root / "llm", engine_dir, tmp_path, tmp_path / "no")] == [
        HF_CHECKPOINT, EXPORT_ROOT, ONNX_DIR, ENGINE_DIR, None, None]


def test_build_from_a_checkpoint_says_export_it_first(dirs, tmp_path):
    ckpt, _, _ = dirs
    line = one_error_line(run_cli(build_main, "--onnxDir", ckpt, "--engineDir", tmp_path / "eng"))
    assert f"--onnxDir {ckpt}: expected an ONNX dir" in line and "found a Hugging Face checkpoint" in line
    assert f"export it first with: llm-export {ckpt} OUT" in line and "llm-build --onnxDir OUT/llm" in line
    assert not (tmp_path / "eng").exists()


def test_build_from_the_export_root_names_its_llm_folder(dirs, tmp_path):
    _, export_root, _ = dirs
    line = one_error_line(run_cli(build_main, "--onnxDir", export_root, "--engineDir", tmp_path / "eng"))
    assert line.endswith(f"found the root folder of an export; use --onnxDir {export_root / 'llm'}")


def test_export_with_swapped_arguments_says_so_and_writes_nothing(dirs, tmp_path):
    ckpt, export_root, _ = dirs
    before = snapshot(ckpt, export_root)
    line = one_error_line(run_cli(export_main, tmp_path / "out", ckpt))
    assert line == (f"error: {tmp_path / 'out'}: expected a Hugging Face checkpoint directory, found nothing, but "
                    f"{ckpt} is one; arguments swapped? (llm-export CKPT OUT)")
    for export in (export_root, export_root / "llm"):
        line = one_error_line(run_cli(export_main, export, tmp_path / "out2"))
        assert "found the output folder of llm-export" in line or "found an ONNX dir written by llm-export" in line
        assert line.endswith("arguments swapped? (llm-export CKPT OUT)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and snapshot(ckpt, export_root) == before


def test_quantize_an_export_names_the_checkpoint_it_needs(dirs, tmp_path):
    _, export_root, _ = dirs
    line = one_error_line(run_cli(quantize_main, "llm", "--model_dir", export_root / "llm", "--output_dir",
                                  tmp_path / "q"))
    assert "found an ONNX dir written by llm-export" in line and "quantize before exporting" in line
    assert not (tmp_path / "q").exists()
