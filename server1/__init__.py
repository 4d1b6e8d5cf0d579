"""Compute server 1: the shared server code (``blindseg.service``) run as party 1."""
