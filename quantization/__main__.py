"""`python -m quantization llm|draft ...` (see quantization/cli.py)."""

from quantization.cli import main

main()
