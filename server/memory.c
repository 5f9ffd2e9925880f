/* memory.c - the daemon's memory account (see memory.h). */
#include "server/memory.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

/* The memory limit of the daemon's control group in bytes (cgroup v2
 * memory.max, else v1 memory.limit_in_bytes), or 0 when there is none or it
 * cannot be read ("max", or v1's huge "unlimited" value: not a limit). */
size_t cv_memory_cgroup_limit(const char *v2_file, const char *v1_file)
{
    const char *files[2] = {v2_file, v1_file};
    for (int i = 0; i < 2; i++) {
        FILE *f = files[i] ? fopen(files[i], "r") : NULL;
        if (!f)
            continue;
        char buf[64] = "";
        int got = fgets(buf, sizeof buf, f) != NULL;
        fclose(f);
        char *end = NULL;
        unsigned long long v = got ? strtoull(buf, &end, 10) : 0;
        if (got && end != buf && v > 0 && v < (1ULL << 60))
            return v >= SIZE_MAX ? SIZE_MAX : (size_t)v;
    }
    return 0;
}

size_t cv_memory_default_limit(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0)
        return 0;
    double phys = (double)pages * (double)page;
    /* in a container the group's limit, not the host's memory, is what the
     * kernel enforces (an OOM kill past it) */
    size_t cg = cv_memory_cgroup_limit("/sys/fs/cgroup/memory.max",
                                       "/sys/fs/cgroup/memory/memory.limit_in_bytes");
    if (cg && (double)cg < phys)
        phys = (double)cg;
    double b = 0.75 * phys;
    return b >= (double)SIZE_MAX ? SIZE_MAX : (size_t)b;
}

void cv_memory_init(cv_memory *m, size_t limit)
{
    m->limit = limit;
    for (int k = 0; k < CV_MEM_KINDS; k++)
        atomic_init(&m->used[k], 0);
}

void cv_memory_add(cv_memory *m, cv_mem_kind k, size_t bytes)
{
    if (m)
        atomic_fetch_add(&m->used[k], bytes);
}

void cv_memory_sub(cv_memory *m, cv_mem_kind k, size_t bytes)
{
    if (m)
        atomic_fetch_sub(&m->used[k], bytes);
}

size_t cv_memory_get(const cv_memory *m, cv_mem_kind k)
{
    return m ? atomic_load(&((cv_memory *)m)->used[k]) : 0;
}

const char *cv_memory_kind_name(cv_mem_kind k)
{
    static const char *const names[CV_MEM_KINDS] = {"registry", "job_documents", "running_jobs",
                                                    "kept_results", "request_bodies",
                                                    "baseline"};
    return k >= 0 && k < CV_MEM_KINDS ? names[k] : "?";
}

void cv_memory_trim(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

size_t cv_memory_numbers(double n, size_t b)
{
    double t = n * (double)b;
    return t >= (double)SIZE_MAX ? SIZE_MAX : t > 0 ? (size_t)t : 0;
}

size_t cv_memory_in_flight(const cv_memory *m)
{
    return cv_memory_get(m, CV_MEM_BASELINE) + cv_memory_get(m, CV_MEM_DOCUMENTS) +
           cv_memory_get(m, CV_MEM_RUNNING) + cv_memory_get(m, CV_MEM_REQUESTS);
}

size_t cv_memory_self_resident(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long size = 0, resident = 0;
    int ok = f && fscanf(f, "%llu %llu", &size, &resident) == 2;
    if (f)
        fclose(f);
    long page = sysconf(_SC_PAGESIZE);
    return ok && page > 0 ? (size_t)resident * (size_t)page : 0;
}
