"""One module per `efm` command: option parsing and output only; the work is done by the library modules.

`efm_cli.cli` registers each command on the app. Modules here import typer and rich at top level but torch
only inside the command body, so `efm --help` and `efm translate --help` stay fast.
"""
