"""`python -m llm_audit`: the same command line as `llm-audit`."""

import sys

from .cli import main

sys.exit(main())
