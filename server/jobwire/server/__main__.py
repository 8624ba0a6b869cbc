"""``python -m jobwire.server [flags]`` runs the server, like ``jobwire serve``."""

import sys

from jobwire.server.cli import main

sys.exit(main())
