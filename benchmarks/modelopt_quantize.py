"""Quantize a checkpoint with NVIDIA ModelOpt on the same calibration batches as `python -m quantization llm`, for the
side-by-side rows of `benchmarks/accuracy.py` (`--modelopt_python`).

ModelOpt is an optional dependency (`pip install .[modelopt]`, best in its own virtual environment: it pins its own
torch stack). Only the recipes ModelOpt can calibrate without a GPU are offered: its FP8 fake-quant runs on the CPU,
its NVFP4 fake-quant (and so NVFP4 AWQ and `auto_quantize` over NVFP4) is CUDA-only.

    python -m benchmarks.modelopt_quantize --model_dir M --output_dir Q --recipe fp8 [--kv_cache_fp8]

Like the reference's quantizer (spec: edge-llm-reference.md 1.2): ModelOpt's stock config, a q bmm quantizer next to
k/v when the KV cache is FP8, `export_hf_checkpoint`, then `q_proj.q_scale = amax / 448` added to the checkpoint.
The calibration loop feeds the attention mask (the reference does not; the batches here are the ones our quantizer
sees, so the comparison isolates the algorithms).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import torch

from quantization.datasets import CHARS_PER_TOKEN, load_texts, make_batches

RECIPES = ("fp8",)


@click.command()
@click.option("--model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--output_dir", required=True, type=click.Path(path_type=Path))
@click.option("--recipe", default="fp8", show_default=True, type=click.Choice(RECIPES))
@click.option("--kv_cache_fp8", is_flag=True, help="Also an FP8 KV cache (ModelOpt's FP8_KV_CFG plus q).")
@click.option("--text_dataset", required=True)
@click.option("--num_samples", default=32, show_default=True)
@click.option("--max_seq_len", default=512, show_default=True)
@click.option("--batch_size", default=4, show_default=True)
def main(model_dir: Path, output_dir: Path, recipe: str, kv_cache_fp8: bool, text_dataset: str, num_samples: int,
         max_seq_len: int, batch_size: int) -> None:
    """Calibrate and export MODEL_DIR with ModelOpt into OUTPUT_DIR (ModelOpt's unified HF checkpoint)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = load_texts(text_dataset, num_samples, max_seq_len * CHARS_PER_TOKEN, 0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = list(make_batches(tokenizer, texts, max_seq_len, batch_size))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if kv_cache_fp8:
        config = mtq.update_quant_cfg_with_kv_cache_quant(config, mtq.FP8_KV_CFG["quant_cfg"])
        config["quant_cfg"].append({"quantizer_name": "*q_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}})

    def forward_loop(m) -> None:
        with torch.no_grad():
            for b in batches:
                m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    mtq.quantize(model, config, forward_loop)
    q_scales = {}
    if kv_cache_fp8:
        for name, module in model.named_modules():
            quantizer = getattr(module, "q_bmm_quantizer", None)
            if quantizer is not None and quantizer.is_enabled and quantizer.amax is not None:
                q_scales[f"{name}.q_proj.q_scale"] = (quantizer.amax.float().reshape(1) / 448.0).clone()
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(output_dir))
    if q_scales:
        files = sorted(output_dir.glob("*.safetensors"))
        tensors = load_file(str(files[0]))
        tensors.update(q_scales)
        save_file(tensors, str(files[0]), metadata={"format": "pt"})
        index = output_dir / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"].update(dict.fromkeys(q_scales, files[0].name))
            index.write_text(json.dumps(data, indent=2))
    tokenizer.save_pretrained(output_dir)
    print(f"wrote {output_dir} (ModelOpt {recipe}{' + FP8 KV' if kv_cache_fp8 else ''})")


if __name__ == "__main__":
    main()
