"""`python -m sample`: text to image from the command line."""

from pathlib import Path

# The small digits model trained with `python -m train --config digits` (see README).
DEFAULT_MODEL = Path(__file__).resolve().parent / "lumina-next-digits"
