/* memory.c - the daemon's memory account (see memory.h). */
#include "server/memory.h"

#include <stdint.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

size_t cv_memory_default_limit(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0)
        return 0;
    double b = 0.75 * (double)pages * (double)page;
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
                                                    "kept_results"};
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
