"""`python -m service` is `convirt serve`."""

import sys

from .cli import main

sys.exit(main())
