"""`python -m islands ...` is `diloco-island ...`."""

import sys

from islands.cli import main

sys.exit(main())
