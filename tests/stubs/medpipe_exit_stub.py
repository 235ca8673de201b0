"""A stand-in stage for tests/test_dags.py: exits with the status given, or sleeps with a grandchild.

    python -m medpipe_exit_stub 2            # exit status 2
    python -m medpipe_exit_stub sleep FILE   # start a grandchild, write both pids to FILE, sleep
"""

import subprocess
import sys
import time

if sys.argv[1] == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(sys.argv[2], "w") as handle:
        handle.write(f"{__import__('os').getpid()} {child.pid}")
    time.sleep(300)
else:
    print(f"exiting with {sys.argv[1]}", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
