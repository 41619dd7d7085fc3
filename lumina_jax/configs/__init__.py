"""The shipped training configs: `python -m train --config NAME` runs NAME.py's get_config()."""
