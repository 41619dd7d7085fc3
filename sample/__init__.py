"""`python -m sample`: text to image from the command line (lumina_jax/cli/sample.py)."""
