"""`python -m lingmao.tracking import SPOOL [--tracking-uri URI]`: replay a spool into a store."""

import sys

from lingmao.tracking.spool import main

sys.exit(main())
