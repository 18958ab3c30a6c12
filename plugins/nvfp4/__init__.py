"""NVFP4 activations and weights: the `trt::TRT_FP4DynamicQuantize` op TensorRT expects and its CPU lowering."""
