"""vhost-user I/O: listening sockets, the per-connection state machine, guest
memory mappings and the rings' eventfds. It knows nothing of balloons: it
drives any object with the `VirtioDevice` interface (engine/device_api.py)."""
