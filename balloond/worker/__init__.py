"""One process per VM: the supervisor (the daemon operators see) and the
worker processes that serve each VM's vhost-user socket.

    channel.py      typed messages between them, framed as length-prefixed JSON
    process.py      the worker's main: one VM's listener, device and journal
    supervisor.py   WorkerVm: a VM whose socket a worker serves, and its restarts
"""
