/* bigmem.h - large buffers (factors, pooled cotangents, workspaces, LAPACK
 * scratch): from a size of CV_BIG_MIN bytes on they are aligned to the
 * transparent huge page size (2 MiB) and the whole huge pages inside them are
 * advised MADV_HUGEPAGE (the tail keeps 4 KiB pages, so no buffer holds more
 * memory than it spans), so that the first touch of a fresh buffer costs one
 * page fault per 2 MiB instead of one per 4 KiB.  (On the 2-vCPU VMs this
 * project is measured on, a 4 KiB fault costs 10-20 us: writing 88 MB of
 * fresh Kronecker factors took ~0.4 s, with huge pages ~0.02 s.)  Where the
 * kernel has no transparent huge pages, or only "never", the advice is a
 * no-op and these are plain aligned buffers.  Smaller sizes are plain
 * malloc / calloc.  Free every buffer with free(). */
#ifndef CV_BIGMEM_H
#define CV_BIGMEM_H

#include <stddef.h>

#define CV_BIG_MIN ((size_t)2 << 20)

/* malloc(bytes) (uninitialised), or NULL. */
void *cv_big_malloc(size_t bytes);
/* calloc(count, size) (zeroed; NULL on overflow or failure). */
void *cv_big_calloc(size_t count, size_t size);
/* cv_big_malloc for a buffer the caller writes whole right away (a
 * product's workspace): its pages are populated in one call
 * (MADV_POPULATE_WRITE, Linux 5.14) instead of one page fault each, which
 * on virtual machines costs several microseconds a page; where the advice
 * is unknown the pages fault in on first touch as usual.  Contents
 * undefined (zero when freshly mapped). */
void *cv_big_malloc_populated(size_t bytes);

#endif
