/* datadir.h - datasets that already live on the server: safetensors files in
 * the directory of `curvd serve --data-dir DIR`, registered by name and
 * memory-mapped instead of copied.
 *
 * A file is named relative to DIR.  Absolute names, any ".." component,
 * and anything that resolves (symbolic links followed) outside DIR are
 * refused with 400 path_escape; a name that is not a regular file is 400
 * not_a_file, a missing one 404 not_found.  The file is mapped read-only
 * (MAP_PRIVATE) and parsed in place (api/datafile.c,
 * cv_datafile_load_borrowed): float32 x and int64 labels / float32 targets
 * are used where they lie; other dtypes are converted into heap copies,
 * which the mapping owns and the registry counts.  The mapping is released
 * when the last snapshot that uses it is freed (server/registry.c keeps a
 * deleted or replaced snapshot alive while jobs hold it).
 *
 * A mapped file must not be truncated or rewritten in place while it is
 * registered (replacing it with rename() is safe: the old inode stays
 * mapped).
 */
#ifndef CV_DATADIR_H
#define CV_DATADIR_H

#include <stddef.h>

#include "engine/dataset.h"
#include "engine/err.h"

/* A mapped file and the converted copies of the arrays that point into it. */
typedef struct cv_mapped cv_mapped;

/* The real path of file under dir into out (len bytes), or -1 with e
 * filled (400 path_escape / invalid_file, 404 not_found). */
int cv_datadir_resolve(const char *dir, const char *file, char *out, size_t len, cv_err *e);

/* Maps dir/file and loads it as a dataset into *d (borrowed).  *map owns
 * the mapping and the copies; *heap_bytes is what the copies (and the
 * dataset struct) take, *mapped_bytes the file's size.  Copies of more than
 * max_copy bytes are refused (413 registry_full) before they are made.  scan
 * 0 skips the pass over every value (cv_datafile_load_unscanned: a
 * data-parallel `curvd run` rank touches only its shard).  On error nothing
 * is left mapped. */
int cv_datadir_map(const char *dir, const char *file, size_t max_copy, int scan, cv_dataset *d,
                   cv_mapped **map, size_t *heap_bytes, size_t *mapped_bytes, cv_err *e);

/* Frees the copies and unmaps (for cv_snap.backing_free; NULL is fine). */
void cv_mapped_free(void *map);

#endif
