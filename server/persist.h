/* persist.h - the registry's side of --state-dir: models and datasets as
 * records of server/state.h, written through the registry's hooks
 * (cv_registry_set_persist) and read back at start-up.
 *
 * A model record: meta {"name", "version", "created_at", "updated_at",
 * "source", "architecture"} (JSON, times in epoch seconds) and the
 * parameters as the blob (safetensors, cv_params_export).  A dataset record:
 * the same meta without "architecture" and the data as the blob
 * (safetensors, cv_datafile_export), or, for a dataset mapped from
 * --data-dir, "data_file" (the file's name in DIR) and no blob: it is mapped
 * again at start-up (the file itself is not copied).
 *
 * Only the current version of each name is kept: older versions pinned by
 * jobs live only as long as those jobs, and queued or running jobs do not
 * survive a restart (server/jobs.c records them as failed "interrupted").
 * Monitors and their histories are records of their own kind, written and
 * read back by server/monitors.c.
 */
#ifndef CV_PERSIST_H
#define CV_PERSIST_H

#include "server/registry.h"
#include "server/state.h"

/* Reads every model and dataset record of st into reg (a damaged record is
 * reported and set aside; one that cannot be registered, e.g. over the
 * budget, is reported and kept), then sets reg's hooks so that every later
 * change is written to st.  data_dir: --data-dir (NULL: none; mapped
 * datasets are then skipped with a log line).  Returns the records loaded. */
int cv_persist_attach(cv_state *st, cv_registry *reg, const char *data_dir);

#endif
