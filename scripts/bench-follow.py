#!/usr/bin/env python3
"""A file read while it grows: one thread appends to it, another reads it.

    scripts/bench-follow.py DIR [MIB]

In DIR (a mount), one thread appends MIB MiB (default 1024) to a new file
in 1 MiB writes while another reads 4 KiB at random offsets below the
size written so far, both with O_DIRECT so that every request reaches the
file system (as a database's would, or a log shipper's that bypasses the
page cache). Prints the appends' MiB/s and the reads per second. A file
system that looks up a growing file's blocks afresh at the first read
after each append pays for the whole file each time, so both rates fall
as the file grows. The file is removed at the end, or on an error.
"""
import mmap
import os
import random
import sys
import threading
import time


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = os.path.join(sys.argv[1], f"bench-follow.{os.getpid()}")
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    chunk = mmap.mmap(-1, 1 << 20)
    chunk.write(os.urandom(1 << 20))
    size = [0]
    done = threading.Event()
    reads = [0]
    failed = []

    try:
        wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as e:
        sys.exit(f"bench-follow: cannot create {path} with O_DIRECT: {e.strerror}")
    try:
        rfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:

            def reader():
                buf = mmap.mmap(-1, 4096)
                rng = random.Random(1)
                try:
                    while not done.is_set():
                        blocks = size[0] // 4096
                        if blocks == 0:
                            time.sleep(0.001)
                            continue
                        os.preadv(rfd, [buf], rng.randrange(blocks) * 4096)
                        reads[0] += 1
                except OSError as e:
                    failed.append(e)

            t = threading.Thread(target=reader, daemon=True)
            start = time.monotonic()
            t.start()
            try:
                for i in range(mib):
                    os.pwritev(wfd, [chunk], i << 20)
                    size[0] = (i + 1) << 20
                os.fsync(wfd)
                elapsed = time.monotonic() - start
            finally:
                done.set()
                t.join()
        finally:
            os.close(rfd)
    finally:
        os.close(wfd)
        os.unlink(path)
    if failed:
        sys.exit(f"bench-follow: a read of {path} failed: {failed[0]}")
    print(f"appended {mib} MiB in {elapsed:.2f} s: {mib / elapsed:.0f} MiB/s; "
          f"{reads[0]} reads meanwhile: {reads[0] / elapsed:.0f} reads/s")


main()
