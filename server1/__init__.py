"""Compute server 1: the shared server role (:mod:`server`) run as party 1."""
