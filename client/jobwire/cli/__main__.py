"""``python -m jobwire.cli``: the same as the ``jobwire`` console script."""

from jobwire.cli.main import main

raise SystemExit(main())
