"""Lets `python -m efm_cli` (and `torchrun ... -m efm_cli`) run the same CLI as the `efm` script."""

from efm_cli.cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())
