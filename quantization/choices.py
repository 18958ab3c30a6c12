"""The names of the quantizer's choices, in a module light enough for `llm-quantize --help` (no torch).

The modules that implement each choice (`smoothing`, `scale_search`, `auto`, `checkpoint_writer`) import their
names from here, so the CLI's option lists and the implementations cannot drift apart.
"""

SMOOTHING_METHODS = ("awq", "smoothquant", "none")  # quantization/smoothing.py
SCALE_SEARCHES = ("mse", "amax")  # quantization/scale_search.py
AUTO_CANDIDATES = ("nvfp4", "fp8", "fp16")  # quantization/auto.py: formats --quantization auto picks among
