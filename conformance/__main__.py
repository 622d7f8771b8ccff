"""`python -m conformance ...` is `llama-conformance ...` (conformance/cli.py)."""
import sys

from conformance.cli import main

sys.exit(main())
