"""``python -m server1 --config server1.toml``: the compute server, party 1."""

import sys

from server.service import main

sys.exit(main("server1"))
