"""Every wire format balloond speaks, as pure data.

Nothing in this package opens a socket, touches an event loop or maps memory:
callers hand in bytes, file descriptors and memory views, and get typed values
back (or hand in typed values and get bytes). That keeps each format testable
on its own and lets the daemon and the fuzzers share one definition of every
byte. The test frontend deliberately does not: it packs with tests/wire.py,
written from the specs apart from this package, and tests/unit/
test_wire_golden.py holds both to the same literal bytes.

Modules:
  errors      -- the error hierarchy (who broke the protocol)
  vhost_user  -- vhost-user framing, requests and payloads
  virtqueue   -- the split virtqueue layout and the rules for walking it
  balloon     -- the virtio-balloon device: features, config, stats, queues
  extension   -- balloond's own migrate-queue extension (see balloond_ext.h)
"""
