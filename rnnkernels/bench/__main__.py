"""``python -m rnnkernels.bench``: the same as the ``rnnkernels-bench`` command."""

import sys

from .cli import main

sys.exit(main())
