/* metrics.c - Prometheus text rendering of registry, job and HTTP metrics. */
#include "server/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/ops_table.h"
#include "server/util.h"

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *s, const char *fmt, ...)
{
    if (s->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            s->oom = 1;
            return;
        }
        if ((size_t)n < s->cap - s->len) {
            s->len += (size_t)n;
            return;
        }
        size_t ncap = 2 * s->cap + (size_t)n + 1;
        char *nb = realloc(s->buf, ncap);
        if (!nb) {
            s->oom = 1;
            return;
        }
        s->buf = nb;
        s->cap = ncap;
    }
}

/* The HELP and TYPE lines that announce a family's samples. */
static void family(sbuf *s, const char *name, const char *help, const char *type)
{
    sb_printf(s, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge(sbuf *s, const char *name, const char *help, double v)
{
    family(s, name, help, "gauge");
    sb_printf(s, "%s %.17g\n", name, v);
}

static void counter(sbuf *s, const char *name, const char *help, double v)
{
    family(s, name, help, "counter");
    sb_printf(s, "%s %.17g\n", name, v);
}

/* hist: cumulative bucket counts for cv_job_hist_bounds, then +Inf. */
static void histogram(sbuf *s, const char *name, const char *help, const unsigned long *hist,
                      double sum, unsigned long count)
{
    family(s, name, help, "histogram");
    for (int b = 0; b < CV_HIST_BUCKETS; b++)
        sb_printf(s, "%s_bucket{le=\"%g\"} %lu\n", name, cv_job_hist_bounds[b], hist[b]);
    sb_printf(s, "%s_bucket{le=\"+Inf\"} %lu\n", name, hist[CV_HIST_BUCKETS]);
    sb_printf(s, "%s_sum %.17g\n", name, sum);
    sb_printf(s, "%s_count %lu\n", name, count);
}

char *cv_metrics_render(cv_registry *reg, cv_jobs *jobs, const cv_http_counters *hc,
                        double uptime_s)
{
    cv_registry_stats rs;
    cv_jobs_stats js;
    cv_registry_stats_get(reg, &rs);
    cv_jobs_stats_get(jobs, &js);
    sbuf s = {malloc(4096), 0, 4096, 0};
    if (!s.buf)
        return NULL;
    s.buf[0] = 0;
    gauge(&s, "curvd_up", "1 while the service runs.", 1);
    family(&s, "curvd_info", "Build information.", "gauge");
    sb_printf(&s, "curvd_info{version=\"%s\"} 1\n", CV_SERVER_VERSION);
    gauge(&s, "curvd_uptime_seconds", "Seconds since the service started.", uptime_s);
    gauge(&s, "curvd_queue_depth", "Jobs waiting in the queue.", (double)js.queue_depth);
    gauge(&s, "curvd_queue_capacity", "Maximum queued jobs (--max-queue).",
          (double)js.max_queue);
    gauge(&s, "curvd_workers", "Worker threads (--workers).", js.workers);
    gauge(&s, "curvd_workers_busy", "Workers running a job now.", js.busy_workers);
    family(&s, "curvd_jobs", "Jobs held by the service, by status.", "gauge");
    for (int i = 0; i < CV_JOB_NSTATUS; i++)
        sb_printf(&s, "curvd_jobs{status=\"%s\"} %ld\n", cv_job_status_name(i),
                  js.by_status[i]);
    family(&s, "curvd_jobs_finished_total", "Jobs that ended, by final status.", "counter");
    for (int i = CV_JOB_SUCCEEDED; i < CV_JOB_NSTATUS; i++)
        sb_printf(&s, "curvd_jobs_finished_total{status=\"%s\"} %ld\n",
                  cv_job_status_name(i), js.finished_total[i]);
    counter(&s, "curvd_jobs_submitted_total", "Jobs accepted into the queue.",
            (double)js.submitted_total);
    counter(&s, "curvd_jobs_rejected_total", "Jobs refused because the queue was full.",
            (double)js.rejected_total);
    histogram(&s, "curvd_job_duration_seconds", "Running time of jobs that ran.", js.hist,
              js.hist_sum, js.hist_count);
    histogram(&s, "curvd_job_queue_seconds",
              "Time jobs waited in the queue: submission to start (or to cancellation while "
              "queued).", js.qhist, js.qhist_sum, js.qhist_count);
    gauge(&s, "curvd_jobs_kept_bytes", "Bytes held by finished jobs (results) kept readable.",
          (double)js.kept_bytes);
    gauge(&s, "curvd_jobs_kept_budget_bytes", "Cap on curvd_jobs_kept_bytes (--max-kept-bytes; "
          "0 = none).", (double)js.max_kept_bytes);
    counter(&s, "curvd_jobs_evicted_total", "Finished jobs dropped early to stay within "
            "--max-kept-bytes.", (double)js.evicted_total);
    gauge(&s, "curvd_memory_limit_bytes", "The daemon's memory limit (--max-memory; 0 = none).",
          (double)js.memory_limit);
    family(&s, "curvd_memory_used_bytes", "Memory the daemon accounts against --max-memory, "
           "by kind.", "gauge");
    for (int k = 0; k < CV_MEM_KINDS; k++)
        sb_printf(&s, "curvd_memory_used_bytes{kind=\"%s\"} %zu\n",
                  cv_memory_kind_name((cv_mem_kind)k), js.memory_used[k]);
    counter(&s, "curvd_memory_waits_total", "Jobs that waited in the queue for memory "
            "(--max-memory) before they started.", (double)js.memory_waits_total);
    counter(&s, "curvd_matvecs_total", "Curvature-vector products computed by jobs.",
            (double)js.matvecs_total);
    gauge(&s, "curvd_registry_bytes", "Bytes held by registered models and datasets.",
          (double)rs.bytes);
    gauge(&s, "curvd_registry_retired_bytes", "Bytes of replaced or deleted versions still "
          "pinned by queued or running jobs (counted against the budget).",
          (double)rs.retired_bytes);
    gauge(&s, "curvd_registry_staged_bytes", "Bytes reserved by uploads in parts not yet "
          "committed (counted against the budget).", (double)rs.staged_bytes);
    gauge(&s, "curvd_registry_budget_bytes", "Registry memory budget (--max-registry-bytes).",
          (double)rs.max_bytes);
    gauge(&s, "curvd_models", "Registered models.", rs.models);
    gauge(&s, "curvd_datasets", "Registered datasets.", rs.datasets);
    family(&s, "curvd_http_requests_total", "HTTP requests answered, by status class.",
           "counter");
    for (int c = 1; c <= 5; c++)
        sb_printf(&s, "curvd_http_requests_total{code_class=\"%dxx\"} %lu\n", c,
                  hc ? hc->requests[c] : 0ul);
    if (s.oom) {
        free(s.buf);
        return NULL;
    }
    return s.buf;
}
