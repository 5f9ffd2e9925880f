"""curvd_client - Python client for curvd, the curvature-analysis service.

Standard library only.  The PyTorch helpers live in
:mod:`curvd_client.torch_export` (imported only when you import it; needs torch).

    from curvd_client import Client, CurvdError

    c = Client("http://127.0.0.1:8080")
    job = c.submit(op="trace", model="demo-mlp", dataset="digits",
                   options={"max_probes": 30})
    print(job.wait(timeout=60)["trace"])

See the "Clients" section of the top-level README for the full tour.
"""
from .client import (TERMINAL_STATUSES, Client, CurvdError, Job, JobFailed, JobTimeout,
                     Progress, progress_bar)

__version__ = "0.1.0"
__all__ = ["Client", "Job", "Progress", "CurvdError", "JobFailed", "JobTimeout",
           "TERMINAL_STATUSES", "progress_bar", "__version__"]
