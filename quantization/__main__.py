"""`python -m quantization llm|draft ...`, the same command as `llm-quantize` (see quantization/cli.py)."""

import sys

from quantization.cli import main

sys.exit(main())
