"""`python -m sample` in the repository: lumina-sample (lumina_jax/cli/sample.py)."""

import sys

from lumina_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sample"))
