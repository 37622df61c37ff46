"""``python -m brainmt.predict ...``: the same command as ``brainmt predict ...``."""

import sys

from brainmt.predict.cli import main

sys.exit(main())
