"""`python -m supervisord_llm`: the daemon."""

from .entry import main

raise SystemExit(main())
