#!/usr/bin/env python3
"""How busy the kernel keeps a FUSE daemon while a command runs.

    scripts/fuse-waiting.py MOUNTPOINT COMMAND [ARGS...]

Runs COMMAND and, until it exits, samples about every half millisecond
(the sampling takes some CPU itself) the number of requests the kernel
has sent to the daemon of MOUNTPOINT and not yet had answered
(/sys/fs/fuse/connections/N/waiting). Prints the
share of samples with none waiting (the daemon had nothing to do, however
fast it is) and how the counts spread. Run as root (fusectl is mounted
on /sys/fs/fuse/connections if it is not).

Example: a 1 GiB write through the writeback cache.
    scripts/fuse-waiting.py /mnt/v fio --name=w --directory=/mnt/v \\
        --rw=write --bs=1M --size=1G --ioengine=psync --end_fsync=1
"""
import os
import statistics
import subprocess
import sys
import time

CONNECTIONS = "/sys/fs/fuse/connections"
BUCKETS = [("0", 0, 0), ("1-4", 1, 4), ("5-16", 5, 16), ("17-64", 17, 64), ("65-256", 65, 256),
           ("257+", 257, 1 << 62)]


def connection(mountpoint):
    if os.geteuid() != 0:
        sys.exit("fuse-waiting: run as root (the FUSE connections' counts are root's to read)")
    try:
        dev = os.stat(mountpoint).st_dev
    except OSError as e:
        sys.exit(f"fuse-waiting: {mountpoint}: {e.strerror}")
    if not os.path.isdir(CONNECTIONS) or not os.listdir(CONNECTIONS):
        subprocess.run(["mount", "-t", "fusectl", "none", CONNECTIONS], check=False)
    # A FUSE mount's device number is (0, connection number).
    path = os.path.join(CONNECTIONS, str(os.minor(dev)), "waiting")
    if os.major(dev) != 0 or not os.path.exists(path):
        sys.exit(f"fuse-waiting: {mountpoint} is not a FUSE mount with a connection in {CONNECTIONS}")
    return path


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip())
    waiting = connection(sys.argv[1])
    samples = []
    started = time.monotonic()
    child = subprocess.Popen(sys.argv[2:])
    while child.poll() is None:
        try:
            with open(waiting) as f:
                samples.append(int(f.read()))
        except OSError:
            # The connection ended (an unmount, the daemon gone).
            print("fuse-waiting: the connection ended; sampling stops", file=sys.stderr)
            child.wait()
            break
        time.sleep(0.0005)
    took = time.monotonic() - started
    if not samples:
        sys.exit(f"fuse-waiting: the command ended before a sample (exit {child.returncode})")
    n = len(samples)
    idle = sum(1 for s in samples if s == 0)
    print(f"{n} samples over {took:.2f} s; none waiting in {100 * idle / n:.0f}%; "
          f"mean {statistics.mean(samples):.1f}, most {max(samples)}")
    print("  ".join(f"{name}: {100 * sum(1 for s in samples if lo <= s <= hi) / n:.0f}%"
                    for name, lo, hi in BUCKETS))
    # A command killed by signal N exits as a shell would report it.
    sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)


if __name__ == "__main__":
    main()
