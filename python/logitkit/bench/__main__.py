"""``python -m logitkit.bench``: the same as the ``logitkit-bench`` command."""

import sys

from .cli import main

sys.exit(main())
