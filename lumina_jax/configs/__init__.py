"""The shipped training configs: `lumina-train --config NAME` (`python -m train` in the repository) runs NAME.py's
get_config()."""
