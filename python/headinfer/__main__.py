"""``python -m headinfer``: the ``headinfer`` command (see ``headinfer.cli``)."""

import sys

from .cli import main

sys.exit(main())
