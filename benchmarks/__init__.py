"""Measured comparisons (run as `python -m benchmarks.NAME`). A regular package, not a namespace one, so that a
`benchmarks` package some other distribution installs cannot shadow this one on a machine used through PYTHONPATH."""
