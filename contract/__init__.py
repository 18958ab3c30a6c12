"""The ground every stage stands on: the version-1 stage contract (`stage`, `engine_dir`), number formats, errors and
the CLI entry, atomic output and JSON reading. It imports no stage package, and every stage may import it."""
