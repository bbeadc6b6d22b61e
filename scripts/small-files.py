#!/usr/bin/env python3
"""The benchmarks' small-file workload: 10,000 files of 4 KiB (one random
block, the same in each) in 100 directories under ROOT, each written
through open/write/close as a program would.

Usage: scripts/small-files.py ROOT
"""
import os
import sys

root = sys.argv[1]
data = os.urandom(4096)
for d in range(100):
    p = os.path.join(root, f"d{d:03}")
    os.makedirs(p)
    for f in range(100):
        with open(os.path.join(p, f"f{f:03}"), "wb") as fh:
            fh.write(data)
