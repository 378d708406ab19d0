"""``python -m lesft.sweep --one RUN_DIR``: one prepared run, in a child process of ``lesft sweep --jobs N``."""

import sys

from lesft.sweep import main

sys.exit(main())
