"""``python -m access_audit``: see :func:`access_audit.outbox._cli.main`."""

from .outbox._cli import main

raise SystemExit(main())
