"""`python -m smsbus` is the `smsbus` command."""

import sys

from smsbus.cli import main

sys.exit(main())
