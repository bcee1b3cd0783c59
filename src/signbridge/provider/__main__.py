"""``python -m signbridge.provider NAME``: the token process that ``signbridge start`` spawns."""

import sys

from .daemon import child_main

sys.exit(child_main(sys.argv[1:]))
