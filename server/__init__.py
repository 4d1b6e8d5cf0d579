"""The compute server role (run as ``server0`` or ``server1``: the same code, another party index).

============  ==============================================================================
module        what it owns
============  ==============================================================================
core          :class:`ServerCore` (sans-IO: deploy, offline ingest, the plan walk over the layer
              registry) and :func:`drive`, where a server's rounds meet an endpoint
bundles       receiving a bundle from a material source (the dealer service, or in-process)
store         the durable single-use bundle store
pool          which bundle a job uses: agreement between the servers, warm cache, refill
models        deployed models on disk (E, B_i + i*E, bias shares, plan)
service       the long-running service: routing of control messages, the job lifecycle
============  ==============================================================================
"""
