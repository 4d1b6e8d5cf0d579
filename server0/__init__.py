"""Compute server 0: the shared server code (``blindseg.service``) run as party 0."""
