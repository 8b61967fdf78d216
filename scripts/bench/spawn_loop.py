"""The bare command contender: 2 processes, each ``subprocess.run([COMMAND])`` N/2 times.

Usage: ``python spawn_loop.py N COMMAND``. The floor for "run a command per task" from Python.
"""

import os
import subprocess
import sys


def main() -> None:
    count, command = int(sys.argv[1]), sys.argv[2]
    shares = [count // 2, count - count // 2]
    pids = []
    for share in shares:
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(share):
                    subprocess.run([command], check=True)
            except BaseException:
                os._exit(1)
            os._exit(0)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
