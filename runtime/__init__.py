"""llm-inference: engine sessions, KV cache, sampling and the JSON test-case runner."""
