"""How every command starts and ends (docs/contracts.md section 7).

Every entry point is `main(argv=None) -> int`, which calls `run_cli` on its click command: bad input
(`InputError`) and usage errors print one `error: <message>` line on stderr and exit 2, Ctrl-C exits 130, and neither
shows a traceback. A command module imports only click, the standard library and light project modules at import
time; torch, transformers, onnx and onnxruntime are imported inside the command, so a Ctrl-C during those imports is
caught too and `--help` answers at once.
"""

from __future__ import annotations

import click

from contract.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def run_cli(command: click.Command, argv: list[str] | None = None) -> int:
    """Run a click command under that promise; returns the exit code (`sys.exit(main())` in `__main__`). Usage
    lines name the program as it was started (`llm-quantize`, or `python -m quantization`)."""
    try:
        command.main(args=argv, standalone_mode=False)
    except InputError as e:
        message = str(e)
    except click.ClickException as e:  # usage errors: a missing option, a bad choice
        message = e.format_message()
    except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C inside the command into Abort
        return EXIT_INTERRUPTED
    else:
        return 0
    click.echo(f"error: {message}", err=True)
    return EXIT_BAD_INPUT


def example(*command_lines: str) -> str:
    """A command's `--help` epilog: worked example lines, printed as written."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in command_lines)
