"""`python -m tokenguard` is the `tokenguard` command."""

import sys

from tokenguard.cli import main

sys.exit(main())
