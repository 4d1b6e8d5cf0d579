"""``python -m server0 --config server0.toml``: the compute server, party 0."""

import sys

from server.service import main

sys.exit(main("server0"))
