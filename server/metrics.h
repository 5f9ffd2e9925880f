/* metrics.h - GET /metrics in the Prometheus text exposition format 0.0.4.
 *
 *   curvd_up, curvd_info{version}                  gauges
 *   curvd_queue_depth, curvd_queue_capacity         gauges
 *   curvd_workers, curvd_workers_busy               gauges
 *   curvd_jobs{status="queued|running|..."}         gauge: jobs held now
 *   curvd_jobs_finished_total{status=...}           counter
 *   curvd_jobs_submitted_total, curvd_jobs_rejected_total (queue full)
 *   curvd_job_duration_seconds                      histogram of running time
 *   curvd_job_queue_seconds                         histogram of submit -> start
 *   curvd_jobs_kept_bytes, curvd_jobs_kept_budget_bytes, curvd_jobs_evicted_total
 *   curvd_matvecs_total                             counter (running jobs included)
 *   curvd_registry_bytes, curvd_registry_retired_bytes, curvd_registry_budget_bytes,
 *   curvd_models, curvd_datasets
 *   curvd_http_requests_total{code_class="2xx"...}  counter
 */
#ifndef CV_METRICS_H
#define CV_METRICS_H

#include <stddef.h>

#include "server/jobs.h"
#include "server/registry.h"

typedef struct {
    unsigned long requests[6];   /* by status class: [2] = 2xx ... [5] = 5xx */
} cv_http_counters;

/* The metrics text (malloc()ed, NUL-terminated), or NULL when out of memory. */
char *cv_metrics_render(cv_registry *reg, cv_jobs *jobs, const cv_http_counters *hc,
                        double uptime_s);

#endif
