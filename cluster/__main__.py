"""``python -m cluster`` is ``python -m cluster.local``."""

import sys

from cluster.local import main

sys.exit(main())
