"""`python -m train` in the repository: lumina-train (lumina_jax/cli/train.py)."""

import sys

from lumina_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train"))
