"""``python -m dfkd_fast``: the ``dfkd-fast`` command line."""
from dfkd_fast.cli import main

raise SystemExit(main())
