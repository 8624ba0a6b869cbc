"""The ``jobwire`` command-line tool (entry point: ``jobwire.cli.main:main``)."""
