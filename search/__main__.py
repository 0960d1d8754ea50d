"""``python -m search --config search.yaml`` (what ``ray job submit ... -- python -m search`` runs)."""

import sys

from search.cli import main

sys.exit(main())
