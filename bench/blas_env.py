"""blas_env.py - pins the BLAS threads of an in-process torch peer before torch loads.

Debian's torch does its GEMMs in the system BLAS (OpenBLAS through libblas.so.3), whose
thread pool is sized from OPENBLAS_NUM_THREADS when the library loads, i.e. at
`import torch`, and ignores torch.set_num_threads. A script that sets the variable after
importing torch leaves torch's GEMMs on every core. Import this module before torch:
it sets OPENBLAS_NUM_THREADS (and OMP_NUM_THREADS) from the script's --threads
(default 2) unless the environment already names them.
"""
import os
import sys


def threads_from_argv(argv, default=2):
    """The value of --threads N or --threads=N in argv, else default."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


THREADS = threads_from_argv(sys.argv[1:])
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
