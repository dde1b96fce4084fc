"""The `efm` command line: `app` (the Typer app and `main`, which owns exit codes and error lines), `console`
(stdout, stderr and the error line), shared `options`, and one module per command group. Command modules import
typer and rich at top level but torch only inside a command's body, so that `efm --help` stays fast. Nothing
outside this package imports it."""
