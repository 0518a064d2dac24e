"""`python -m tokenguard` is the `tokenguard` command."""

import sys

from tokenguard.cli.main import main

sys.exit(main())
