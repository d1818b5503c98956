"""``python -m serving`` is ``python -m serving.server``."""

import sys

from serving.server import main

sys.exit(main())
