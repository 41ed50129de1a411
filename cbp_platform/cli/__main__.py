"""``python -m cbp_platform.cli``: the ``cbp`` command."""

from cbp_platform.cli import main

raise SystemExit(main())
