"""``python -m dispatcher``: the same as the ``sm-dispatcher`` command."""

from __future__ import annotations

import sys

from dispatcher.server import main

sys.exit(main())
