"""The one exception type every stage raises for bad input.

CLIs catch it and print `error: <message>` with exit code 2, so a user never sees a traceback for a file that is
missing, malformed or of the wrong dtype. The message names the file or field, what was expected and what was found.
"""


class InputError(ValueError):
    """Bad user input: a file, field, tensor or argument that does not fit the contract."""


def run_cli(command, argv: list[str] | None, prog_name: str) -> int:
    """Run a click command with that promise: bad input and usage errors print one `error: <message>` line on
    stderr and give exit code 2 (no traceback); Ctrl-C gives 130. Returns the exit code."""
    import click

    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (InputError, click.ClickException) as e:
        click.echo(f"error: {e.format_message() if isinstance(e, click.ClickException) else e}", err=True)
        return 2
    except click.Abort:
        return 130
    return 0

