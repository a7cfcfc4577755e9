"""``python -m headinfer.eval.ruler``: the RULER runner (see ``headinfer.eval.ruler``)."""

import sys

from . import main

sys.exit(main())
