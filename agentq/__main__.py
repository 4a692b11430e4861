"""``python -m agentq``: the same as the ``agentq`` command."""

from __future__ import annotations

import sys

from agentq.cli import main

sys.exit(main())
