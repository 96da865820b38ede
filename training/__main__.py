"""``python -m training`` is ``python -m training.fit``."""

import sys

from training.fit import main

sys.exit(main())
