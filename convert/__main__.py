"""`python -m convert` in the repository: lumina-convert (lumina_jax/cli/convert.py)."""

import sys

from lumina_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m convert"))
