/* connguard.h - the request-header deadline of the HTTP server
 * (--header-timeout).  libmicrohttpd's connection timeout closes a
 * connection only after a stretch of silence, so a client that sends its
 * headers a byte at a time (slowloris) keeps its connection, and its thread,
 * for as long as it likes.  The guard tracks every connection's socket and
 * whether the request it is reading has its headers in; a sweeper thread
 * shuts down (shutdown(2), both directions) a socket that has waited longer
 * than the deadline for a request's headers, counted from the accept or from
 * the end of the previous request.  libmicrohttpd then sees the end of the
 * stream and closes the connection as usual.  A request whose headers are in
 * (a ?wait= long poll, a slow upload's body) is never touched.
 *
 * Thread-safety: every function may be called from any thread; a slot is
 * used by its connection's thread and the sweeper, under the guard's mutex.
 * cv_connguard_remove must be called before the socket is closed (MHD's
 * NOTIFY_CONNECTION "closed" comes before its close(2)).
 */
#ifndef CV_CONNGUARD_H
#define CV_CONNGUARD_H

typedef struct cv_connguard cv_connguard;
typedef struct cv_conn_slot cv_conn_slot;

/* header_timeout <= 0: no deadline (no thread; the other calls still work).
 * NULL when the sweeper thread cannot start or memory is short. */
cv_connguard *cv_connguard_new(double header_timeout);
/* Stops and joins the sweeper; slots still registered are freed. */
void cv_connguard_free(cv_connguard *g);

/* Registers a connection's socket, waiting for headers from now; NULL when
 * out of memory (the connection is then not guarded). */
cv_conn_slot *cv_connguard_add(cv_connguard *g, int fd);
/* The request's headers are in: no deadline until cv_connguard_request_done. */
void cv_connguard_headers_in(cv_connguard *g, cv_conn_slot *s);
/* The request ended: the next one's headers are due within the deadline. */
void cv_connguard_request_done(cv_connguard *g, cv_conn_slot *s);
/* Unregisters and frees s (NULL: no-op). */
void cv_connguard_remove(cv_connguard *g, cv_conn_slot *s);

#endif
