"""The mp-pool contender: ``multiprocessing.Pool(2)`` mapping the no-op over N items.

Usage: ``python mp_pool.py N CHUNKSIZE``. There is no queue to fill: the items are generated in
the parent, which is the practical floor for "two processes run N Python calls".
"""

import sys
from multiprocessing import Pool

import benchtask


def main() -> None:
    count, chunksize = int(sys.argv[1]), int(sys.argv[2])
    with Pool(2) as pool:
        for _ in pool.imap_unordered(benchtask.noop, range(count), chunksize=chunksize):
            pass


if __name__ == "__main__":
    main()
