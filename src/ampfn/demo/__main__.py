"""Layer 7, the demo: ``python -m ampfn.demo``."""

from ampfn.demo._cli import main

raise SystemExit(main())
