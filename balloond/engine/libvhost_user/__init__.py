"""The libvhost-user engine: QEMU's own C library for vhost-user backends,
bound through ctypes, driving the same `BalloonDevice` as the pure engine
through the device seam (`balloond.engine.device_api`).

  abi.py         the library's structs as ctypes declares them, checked
                 field by field against the layout probe built with it
  memory.py      LibraryMemory: the regions the library mapped, as GuestRam
  ring.py        LibRing: one of the library's queues, as the device's Ring
  connection.py  LibvhostUserConnection: one frontend, vu_dispatch on the
                 event loop, the library's callbacks and watches
"""
