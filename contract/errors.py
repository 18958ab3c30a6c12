"""The one exception type every stage raises for bad input.

Commands turn it into `error: <message>` with exit code 2 (`contract.cli.run_cli`), so a user never sees a traceback
for a file that is missing, malformed or of the wrong dtype. The message names the file or field, what was expected
and what was found.
"""


class InputError(ValueError):
    """Bad user input: a file, field, tensor or argument that does not fit the contract."""
