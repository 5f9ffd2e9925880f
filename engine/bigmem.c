/* bigmem.c - large buffers advised for transparent huge pages (bigmem.h). */
#include "bigmem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)

void *cv_big_malloc(size_t bytes)
{
    if (bytes < CV_BIG_MIN)
        return malloc(bytes ? bytes : 1);
    void *p = NULL;
    if (posix_memalign(&p, HUGE_PAGE, bytes))
        return NULL;
#ifdef MADV_HUGEPAGE
    /* the whole huge pages inside the buffer only: its tail stays in 4 KiB pages,
     * so a buffer never holds more memory than it spans (advice: ignored where
     * unsupported) */
    (void)madvise(p, bytes / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE);
#endif
    return p;
}

void *cv_big_calloc(size_t count, size_t size)
{
    if (size && count > SIZE_MAX / size)
        return NULL;
    size_t bytes = count * size;
    if (bytes < CV_BIG_MIN)
        return calloc(count ? count : 1, size ? size : 1);
    void *p = cv_big_malloc_populated(bytes); /* written whole right away */
    if (p)
        memset(p, 0, bytes);
    return p;
}

void *cv_big_malloc_populated(size_t bytes)
{
    void *p = cv_big_malloc(bytes);
#ifdef MADV_POPULATE_WRITE
    /* whole pages inside the buffer (madvise takes a page-aligned start) */
    uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, end = ((uintptr_t)p + bytes) & ~(uintptr_t)4095;
    if (p && end > a)
        (void)madvise((void *)a, end - a, MADV_POPULATE_WRITE);
#endif
    return p;
}
