"""balloond: a userspace virtio-balloon device backend for QEMU over vhost-user.

Layers, each depending only on the ones before it:
  protocol (top-level package) -- wire formats, pure data
  balloond.engine              -- vhost-user I/O: sockets, guest memory, rings
  balloond.device              -- the balloon itself: tracker, releaser, queues
  balloond.services            -- control API, CLI, metrics, configuration
"""

__version__ = "0.1.0"
