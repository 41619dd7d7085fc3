"""Files shipped inside lumina-jax: the small digits model that `lumina-sample` draws with by default."""

import importlib.resources
from pathlib import Path

# The small digits model trained with `lumina-train --config digits` (see README), a pipeline folder.
DIGITS_MODEL = Path(str(importlib.resources.files(__name__) / "lumina-next-digits"))
