"""The command-line tools. Each runs as `python -m bin.<name>` (or the `bin/<name>` launcher beside it)."""
