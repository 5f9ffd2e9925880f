/* mpi_plugin.h - the table of functions of the MPI transport plugin
 * (build/curvd-mpi.so, built from server/mpi/curvd_mpi.c against OpenMPI).
 *
 * curvd itself never links MPI: under `mpirun -np R` (R > 1) server/cluster.c
 * dlopen()s the plugin and calls cv_mpi_plugin_v1() for this table, so the
 * plain binary pays no MPI start-up cost and builds without OpenMPI.
 *
 * Every wait is a non-blocking MPI request polled by the caller's thread: a
 * rank that dies (a local peer's pid is gone) or does not answer within the
 * rank timeout makes the wait fail with CV_EUNAVAILABLE "rank_lost", the
 * transport is broken from then on (every call fails at once) and the
 * other live ranks are told so (they fail their waits too).  The data
 * collectives (cv_comm's) and the commands (rank 0 to all, for `curvd
 * serve`) run on two separate communicators.  Calls are serialized by the
 * caller (MPI_THREAD_SERIALIZED).
 */
#ifndef CV_MPI_PLUGIN_H
#define CV_MPI_PLUGIN_H

#include <stddef.h>

#include "engine/comm.h"
#include "engine/err.h"

#define CV_MPI_PLUGIN_SYMBOL "cv_mpi_plugin_v1"

typedef struct {
    /* MPI_Init_thread; *rank, *size of MPI_COMM_WORLD.  rank_timeout_s: the
     * longest wait for the other ranks inside a job (0: none). */
    int (*init)(double rank_timeout_s, int *rank, int *size, cv_err *e);
    /* The cv_comm collectives (ctx unused). */
    int (*allreduce)(void *ctx, void *buf, size_t count, cv_comm_type t, cv_comm_op op,
                     cv_err *e);
    int (*allgather_rows)(void *ctx, void *buf, size_t row_len, const size_t *rows,
                          const size_t *first, cv_comm_type t, cv_err *e);
    int (*bcast)(void *ctx, void *buf, size_t count, cv_comm_type t, int root, cv_err *e);
    void (*stats)(void *ctx, cv_comm_stats *out);
    /* A command of `bytes` bytes from rank 0 to every rank (serve): rank 0
     * sends buf, the others receive into it, sleeping while they wait (no
     * timeout: a follower waits for the daemon's next command for as long as
     * it runs; rank 0 waits at most the rank timeout). */
    int (*command)(void *buf, size_t bytes, cv_err *e);
    /* Rank 0 to rank `to` (point to point on the command communicator);
     * recv on rank `to` takes exactly bytes. */
    int (*send)(int to, const void *buf, size_t bytes, cv_err *e);
    int (*recv)(void *buf, size_t bytes, cv_err *e);
    /* Non-zero once a rank was lost (the transport is broken). */
    int (*broken)(void);
    /* Ranks still alive as far as this rank knows. */
    int (*alive)(void);
    /* The normal end (collective): MPI_Finalize.  After a loss, the ranks
     * left are not waited for: the process leaves MPI without finalizing. */
    void (*finish)(void);
} cv_mpi_plugin;

typedef const cv_mpi_plugin *(*cv_mpi_plugin_fn)(void);

#endif
