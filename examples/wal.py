#!/usr/bin/env python3
"""A tiny write-ahead log: append five order records, fsync after each.

A durable store must not acknowledge a record whose fsync failed: the data
may never reach the disk. This one stops and exits 1, as PostgreSQL does
(it PANICs), instead of retrying the fsync and pretending all is well.

    python3 examples/wal.py /tmp/orders.wal
"""
import os
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "orders.wal"
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for n in range(1, 6):
    os.write(fd, f"order-{n}\n".encode())
    try:
        os.fsync(fd)
    except OSError as e:
        print(f"order-{n}: fsync failed: {e.strerror} (errno {e.errno}); refusing to acknowledge, exiting")
        sys.exit(1)
    print(f"order-{n}: durable")
print("all orders durable")
