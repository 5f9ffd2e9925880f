/* connguard.c - the request-header deadline (see connguard.h): a list of
 * connection slots under one mutex and a sweeper thread that wakes a few
 * times per deadline and shuts down the sockets that are late. */
#include "server/connguard.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

struct cv_conn_slot {
    int fd;
    int waiting;              /* for a request's headers */
    int cut;                  /* shut down already */
    double since;             /* monotonic seconds: waiting since */
    cv_conn_slot *prev, *next;
};

struct cv_connguard {
    double timeout;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    cv_conn_slot *head;
    int stop;
    int have_thread;
    pthread_t thread;
};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Under g->mu: shuts down the late sockets. */
static void sweep_locked(cv_connguard *g, double now)
{
    for (cv_conn_slot *s = g->head; s; s = s->next)
        if (s->waiting && !s->cut && now - s->since > g->timeout) {
            shutdown(s->fd, SHUT_RDWR);
            s->cut = 1;
        }
}

static void *sweeper(void *arg)
{
    cv_connguard *g = arg;
    double period = g->timeout / 4 < 0.05 ? 0.05 : g->timeout / 4 > 1 ? 1 : g->timeout / 4;
    pthread_mutex_lock(&g->mu);
    while (!g->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double t = (double)ts.tv_nsec * 1e-9 + period;
        ts.tv_sec += (time_t)t;
        ts.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
        if (!g->stop)
            sweep_locked(g, mono_s());
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

cv_connguard *cv_connguard_new(double header_timeout)
{
    cv_connguard *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->timeout = header_timeout;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    if (header_timeout > 0) {
        if (pthread_create(&g->thread, NULL, sweeper, g) != 0) {
            pthread_cond_destroy(&g->cv);
            pthread_mutex_destroy(&g->mu);
            free(g);
            return NULL;
        }
        g->have_thread = 1;
    }
    return g;
}

void cv_connguard_free(cv_connguard *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->mu);
    g->stop = 1;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
    if (g->have_thread)
        pthread_join(g->thread, NULL);
    while (g->head) {
        cv_conn_slot *s = g->head;
        g->head = s->next;
        free(s);
    }
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

cv_conn_slot *cv_connguard_add(cv_connguard *g, int fd)
{
    cv_conn_slot *s = g ? calloc(1, sizeof *s) : NULL;
    if (!s)
        return NULL;
    s->fd = fd;
    s->waiting = 1;
    s->since = mono_s();
    pthread_mutex_lock(&g->mu);
    s->next = g->head;
    if (g->head)
        g->head->prev = s;
    g->head = s;
    pthread_mutex_unlock(&g->mu);
    return s;
}

void cv_connguard_headers_in(cv_connguard *g, cv_conn_slot *s)
{
    if (!g || !s)
        return;
    pthread_mutex_lock(&g->mu);
    s->waiting = 0;
    pthread_mutex_unlock(&g->mu);
}

void cv_connguard_request_done(cv_connguard *g, cv_conn_slot *s)
{
    if (!g || !s)
        return;
    double now = mono_s();
    pthread_mutex_lock(&g->mu);
    s->waiting = 1;
    s->since = now;
    pthread_mutex_unlock(&g->mu);
}

void cv_connguard_remove(cv_connguard *g, cv_conn_slot *s)
{
    if (!g || !s)
        return;
    pthread_mutex_lock(&g->mu);
    if (s->prev)
        s->prev->next = s->next;
    else
        g->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    pthread_mutex_unlock(&g->mu);
    free(s);
}
