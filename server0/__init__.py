"""Compute server 0: the shared server role (:mod:`server`) run as party 0."""
