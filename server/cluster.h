/* cluster.h - the ranks of `mpirun -np R curvd ...`: whether mpirun started
 * this process, the MPI transport plugin (server/mpi_plugin.h) loaded and
 * joined, a cv_comm over it for the engine, and the commands `curvd serve`'s
 * rank 0 sends the others (server/ranks.c).
 *
 * Without mpirun (or with -np 1) nothing here loads MPI: the plugin is
 * dlopen()ed only when OMPI_COMM_WORLD_SIZE (or PMIX_SIZE / PMI_SIZE) says
 * there is more than one rank.  It is found at $CURVD_MPI_PLUGIN, else as
 * curvd-mpi.so beside the curvd binary.
 */
#ifndef CV_CLUSTER_H
#define CV_CLUSTER_H

#include <stddef.h>

#include "engine/comm.h"
#include "engine/err.h"

typedef struct cv_cluster cv_cluster;

/* The number of ranks mpirun started (1 when not started by mpirun). */
int cv_cluster_launched_size(void);

/* Loads the plugin and joins the other ranks (collective: every rank calls
 * it at start-up).  rank_timeout_s bounds a rank's wait for the others in a
 * job (0: none).  NULL with e filled when the plugin is missing or MPI
 * cannot start. */
cv_cluster *cv_cluster_join(double rank_timeout_s, cv_err *e);

/* The engine's collectives over the ranks (valid while cl is). */
const cv_comm *cv_cluster_comm(const cv_cluster *cl);
int cv_cluster_rank(const cv_cluster *cl);
int cv_cluster_size(const cv_cluster *cl);
/* Ranks alive as far as this one knows (size until a loss). */
int cv_cluster_alive(const cv_cluster *cl);
/* Non-zero once a rank was lost: no collective can run any more. */
int cv_cluster_broken(const cv_cluster *cl);

/* bytes from rank 0 to every rank on the command channel (rank 0 sends,
 * the others wait, asleep, for as long as it takes). */
int cv_cluster_command(cv_cluster *cl, void *buf, size_t bytes, cv_err *e);
/* Rank 0 sends bytes to rank `to`; rank `to` receives exactly bytes. */
int cv_cluster_send(cv_cluster *cl, int to, const void *buf, size_t bytes, cv_err *e);
int cv_cluster_recv(cv_cluster *cl, void *buf, size_t bytes, cv_err *e);

/* Leaves: MPI_Finalize (collective) when no rank was lost, else just
 * exits MPI; frees cl.  NULL is fine. */
void cv_cluster_leave(cv_cluster *cl);

#endif
