/*
 * Prints, as one JSON object, the size of every libvhost-user struct the
 * ctypes binding declares and the offset of every field it declares, as the
 * compiler laid them out for the library built from the same headers.
 * balloond refuses to load the library when its own layouts differ.
 */
#include <stddef.h>
#include <stdio.h>
#include <sys/uio.h>
#include "libvhost-user.h"

static int first = 1;

static void item(const char *name, size_t value)
{
    printf("%s\n  \"%s\": %zu", first ? "{" : ",", name, value);
    first = 0;
}

#define SIZE(T) item(#T, sizeof(T))
#define FIELD(T, F) item(#T "." #F, offsetof(T, F))

int main(void)
{
    SIZE(VuDevRegion);
    FIELD(VuDevRegion, gpa);
    FIELD(VuDevRegion, size);
    FIELD(VuDevRegion, qva);
    FIELD(VuDevRegion, mmap_offset);
    FIELD(VuDevRegion, mmap_addr);

    SIZE(VuRing);
    FIELD(VuRing, num);
    FIELD(VuRing, desc);
    FIELD(VuRing, avail);
    FIELD(VuRing, used);
    FIELD(VuRing, log_guest_addr);
    FIELD(VuRing, flags);

    SIZE(VuVirtq);
    FIELD(VuVirtq, vring);
    FIELD(VuVirtq, inflight);
    FIELD(VuVirtq, resubmit_list);
    FIELD(VuVirtq, resubmit_num);
    FIELD(VuVirtq, counter);
    FIELD(VuVirtq, last_avail_idx);
    FIELD(VuVirtq, shadow_avail_idx);
    FIELD(VuVirtq, used_idx);
    FIELD(VuVirtq, signalled_used);
    FIELD(VuVirtq, signalled_used_valid);
    FIELD(VuVirtq, notification);
    FIELD(VuVirtq, inuse);
    FIELD(VuVirtq, handler);
    FIELD(VuVirtq, call_fd);
    FIELD(VuVirtq, kick_fd);
    FIELD(VuVirtq, err_fd);
    FIELD(VuVirtq, enable);
    FIELD(VuVirtq, started);
    FIELD(VuVirtq, vra);

    SIZE(VuDevInflightInfo);
    FIELD(VuDevInflightInfo, fd);
    FIELD(VuDevInflightInfo, addr);
    FIELD(VuDevInflightInfo, size);

    SIZE(VuDev);
    FIELD(VuDev, sock);
    FIELD(VuDev, nregions);
    FIELD(VuDev, regions);
    FIELD(VuDev, vq);
    FIELD(VuDev, inflight_info);
    FIELD(VuDev, log_call_fd);
    FIELD(VuDev, backend_mutex);
    FIELD(VuDev, backend_fd);
    FIELD(VuDev, log_size);
    FIELD(VuDev, log_table);
    FIELD(VuDev, features);
    FIELD(VuDev, protocol_features);
    FIELD(VuDev, broken);
    FIELD(VuDev, max_queues);
    FIELD(VuDev, read_msg);
    FIELD(VuDev, set_watch);
    FIELD(VuDev, remove_watch);
    FIELD(VuDev, panic);
    FIELD(VuDev, iface);
    FIELD(VuDev, postcopy_ufd);
    FIELD(VuDev, postcopy_listening);

    SIZE(VuDevIface);
    FIELD(VuDevIface, get_features);
    FIELD(VuDevIface, set_features);
    FIELD(VuDevIface, get_protocol_features);
    FIELD(VuDevIface, set_protocol_features);
    FIELD(VuDevIface, process_msg);
    FIELD(VuDevIface, queue_set_started);
    FIELD(VuDevIface, queue_is_processed_in_order);
    FIELD(VuDevIface, get_config);
    FIELD(VuDevIface, set_config);
    FIELD(VuDevIface, get_shared_object);

    SIZE(VuVirtqElement);
    FIELD(VuVirtqElement, index);
    FIELD(VuVirtqElement, out_num);
    FIELD(VuVirtqElement, in_num);
    FIELD(VuVirtqElement, in_sg);
    FIELD(VuVirtqElement, out_sg);

    SIZE(VhostUserMemoryRegion);
    FIELD(VhostUserMemoryRegion, guest_phys_addr);
    FIELD(VhostUserMemoryRegion, memory_size);
    FIELD(VhostUserMemoryRegion, userspace_addr);
    FIELD(VhostUserMemoryRegion, mmap_offset);

    SIZE(VhostUserMemory);
    FIELD(VhostUserMemory, nregions);
    FIELD(VhostUserMemory, padding);
    FIELD(VhostUserMemory, regions);

    SIZE(VhostUserMemRegMsg);
    FIELD(VhostUserMemRegMsg, padding);
    FIELD(VhostUserMemRegMsg, region);

    SIZE(VhostUserMsg);
    FIELD(VhostUserMsg, request);
    FIELD(VhostUserMsg, flags);
    FIELD(VhostUserMsg, size);
    FIELD(VhostUserMsg, payload);
    FIELD(VhostUserMsg, payload.u64);
    FIELD(VhostUserMsg, payload.state);
    FIELD(VhostUserMsg, payload.memory);
    FIELD(VhostUserMsg, payload.memreg);
    FIELD(VhostUserMsg, fds);
    FIELD(VhostUserMsg, fd_num);
    FIELD(VhostUserMsg, data);
    item("VhostUserMsg.payload.__size__", sizeof(((VhostUserMsg *)0)->payload));

    SIZE(struct iovec);
    FIELD(struct iovec, iov_base);
    FIELD(struct iovec, iov_len);
    printf("\n}\n");
    return 0;
}
