/* kronop.h - linear algebra on given Kronecker factors (issue 22): one layer's
 * KFAC/EKFAC block and a block-diagonal operator over several of them.
 *
 * No network here: the factors A (dim_a x dim_a) and B (dim_b x dim_b) come
 * from the caller (engine/kron.c computes them).  Conventions (docs:
 * kfac_conventions): a layer's parameter vector is theta = [vec_r(W), b]
 * (W: out x in row-major, b: out, only with a bias); W~ = [W | b] is
 * out x dim_a with dim_a = in + has_bias, dim_b = out, dim = dim_b * dim_a.
 * In the row-major order of W~ the block is B (x) A (output index outer), so
 * on theta it is
 *     M = P (B (x) A) P^T,    M theta  <->  B W~ A   (matrix form),
 * P mapping row-major vec(W~) to theta's order (the identity without bias).
 * Nothing of size dim x dim is ever formed.
 *
 * Matrices and vector blocks are column-major; k vectors of length dim are
 * dim x k with column c at X + c*dim.  A and B must be symmetric with both
 * triangles stored.  The "matrix form" of a vector (cv_kron_theta_to_mat) is
 * W~ row-major, i.e. the column-major dim_a x dim_b matrix W~^T.
 *
 * Eigen-structure: A = Q_A diag(lam) Q_A^T, B = Q_B diag(mu) Q_B^T (dsyevd,
 * ascending, computed once per block and cached: cv_kron_block_eig).  The
 * Kronecker eigenbasis is Q = P (Q_B (x) Q_A); its column ("eigen
 * coordinate") c = i*dim_a + j is P (q_Bi (x) q_Aj) with eigenvalue
 * mu_i lam_j.  Vectors in eigen coordinates are vectors of length dim in
 * that order (the row-major vec of Q_B^T W~ Q_A).
 *
 * Rounding: a factor eigenvalue with |ev| <= sqrt(n) * FLT_EPSILON * max|ev|
 * (n the factor's size; the factors are sums of float32 activations and
 * cotangents, so float32's rounding, not double's) is set to exactly 0, so a PSD-singular factor has exact zeros and no tiny negative
 * products.  Larger negative eigenvalues are kept (an indefinite factor is
 * the caller's; every spectral function stays exact for it), and functions
 * that need M + lambda I positive definite refuse it (below).
 *
 * EKFAC: every spectral function takes an optional s (dim values in eigen
 * coordinates, borrowed): NULL means KFAC (s_c = mu_i lam_j, the operator
 * M); non-NULL means the EKFAC operator Q diag(s) Q^T.
 *
 * Errors: functions returning int give 0, or -1 with *e filled (CV_ENOMEM;
 * CV_EINVAL "not_positive_definite", field "options.damping", where an
 * eigenvalue of the damped operator is <= 0).  Thread safety: const
 * functions may run concurrently; the others may compute the cached
 * eigendecomposition (call cv_kron_block_eig first to share a block).
 */
#ifndef CV_KRONOP_H
#define CV_KRONOP_H

#include <stddef.h>

#include "curv.h"
#include "err.h"
#include "estimators.h"
#include "linop.h"

/* ------------------------------------------------------------ one layer block */

typedef struct cv_kron_block {
    int dim_a, dim_b;   /* A: dim_a x dim_a (in + has_bias), B: dim_b x dim_b (out) */
    int has_bias;
    int in;             /* dim_a - has_bias: W's columns */
    size_t dim;         /* dim_a * dim_b: the layer's parameters */
    const double *A, *B;
    int owns;           /* non-zero: cv_kron_block_free frees A and B */
    double tr_a, tr_b;  /* traces (from the diagonals, at init) */
    /* The cached eigendecomposition (eig_ready): ascending eigenvalues, the
     * eigenvectors as columns (dim_a x dim_a, dim_b x dim_b). */
    int eig_ready;
    double *q_a, *lam_a, *q_b, *mu_b;
} cv_kron_block;

/* Describes the block of a layer with `in` inputs, `out` outputs and an
 * optional bias (dim_a = in + has_bias, dim_b = out) with factors A and B.
 * take_ownership = 0: A and B are borrowed and must stay alive and unchanged
 * while kb is used; non-zero: they must come from malloc and
 * cv_kron_block_free frees them (also when init fails).  dim must fit an int
 * (BLAS).  Computes no eigendecomposition. */
int cv_kron_block_init(cv_kron_block *kb, int in, int out, int has_bias, const double *A,
                       const double *B, int take_ownership, cv_err *e);
void cv_kron_block_free(cv_kron_block *kb);

/* The eigenvalues w (n, ascending) of one symmetric n x n factor, without
 * its eigenvectors (dsyevd 'N': several times cheaper), rounded as above. */
int cv_kron_factor_eigenvalues(const double *F, int n, double *w, cv_err *e);
/* The same given rank >= rank(F) in exact arithmetic (F a sum of `rank` outer
 * products, cv_kron_factor's rank_a / rank_b): when rank is well below n the
 * eigenvalues come from F on its range (Rayleigh-Ritz on orth(F Omega), a fixed
 * Gaussian Omega with rank + 8 columns; the other n - rank - 8 are 0), equal
 * to dsyevd's up to the factor's own float32 rounding; else as above. */
int cv_kron_factor_eigenvalues_rank(const double *F, int n, long rank, double *w, cv_err *e);

/* Computes and caches the factors' eigendecompositions (dsyevd; a no-op once
 * done).  Every function below that needs them calls it. */
int cv_kron_block_eig(cv_kron_block *kb, cv_err *e);

/* theta (dim x k) <-> matrix form (k matrices W~, each out x dim_a row-major,
 * dim doubles, contiguous).  Without a bias both are the identity. */
void cv_kron_theta_to_mat(const cv_kron_block *kb, int k, const double *theta, double *mat);
void cv_kron_mat_to_theta(const cv_kron_block *kb, int k, const double *mat, double *theta);

/* Y = M X + shift X for k vectors (M: KFAC when s is NULL, computed as
 * B W~ A from the factors, no eigendecomposition; else EKFAC Q diag(s) Q^T). */
int cv_kron_block_apply(cv_kron_block *kb, const double *s, double shift, int k,
                        const double *X, double *Y, cv_err *e);

/* Exact damped inverse Y = (M + lambda I)^-1 X through the eigenbasis:
 * coordinate c divided by s_c + lambda (KFAC: mu_i lam_j + lambda).
 * Refuses (not_positive_definite) when some s_c + lambda <= 0. */
int cv_kron_block_inverse(cv_kron_block *kb, const double *s, double lambda, int k,
                          const double *X, double *Y, cv_err *e);
/* The same, and quad[c] = Y_c^T M Y_c (k values; M the undamped operator, KFAC
 * or EKFAC as s says) from the eigen coordinates, with no product with M (a
 * Newton step's curvature term s^T M s at the cost of the step alone). */
int cv_kron_block_inverse_quad(cv_kron_block *kb, const double *s, double lambda, int k,
                               const double *X, double *Y, double *quad, cv_err *e);

/* The factored damping of Martens & Grosse / Botev (KFAC only): with
 * w = sqrt((tr(A)/dim_a) / (tr(B)/dim_b)),
 *   Y = [(B + sqrt(lambda)/w I)^-1 (x) (A + w sqrt(lambda) I)^-1] X  (on theta: P . P^T).
 * When tr(A) <= 0 or tr(B) <= 0 (a PSD factor that is zero: w is 0 or inf)
 * Y = X / lambda, the limit of the formula as w -> 0 / inf and the exact
 * damped inverse of M = 0 (lambda must then be > 0).  Refuses
 * (not_positive_definite) when a damped factor has an eigenvalue <= 0.
 * *w_out (may be NULL) gets w (0 in the zero-factor case). */
int cv_kron_block_factored_inverse(cv_kron_block *kb, double lambda, int k, const double *X,
                                   double *Y, double *w_out, cv_err *e);
/* The same, and quad[c] = Y_c^T M Y_c with M = P (B (x) A) P^T undamped (from the
 * eigen coordinates; by the product with M in the zero-factor case). */
int cv_kron_block_factored_inverse_quad(cv_kron_block *kb, double lambda, int k,
                                        const double *X, double *Y, double *w_out,
                                        double *quad, cv_err *e);

/* The factored damping weight w (0 when a trace is <= 0). */
double cv_kron_factored_weight(const cv_kron_block *kb);

/* trace(M): KFAC tr(A) tr(B) (no eigendecomposition); EKFAC sum(s). */
int cv_kron_block_trace(cv_kron_block *kb, const double *s, double *out, cv_err *e);

/* diag(M) in theta order (dim doubles): KFAC diag(B) (x) diag(A) mapped by P
 * (no eigendecomposition); EKFAC (Q_A.^2) S (Q_B.^2)^T in matrix form. */
int cv_kron_block_diag(cv_kron_block *kb, const double *s, double *d, cv_err *e);

/* logdet(M + lambda I) = sum_c log(s_c + lambda) (KFAC: mu_i lam_j + lambda).
 * Refuses (not_positive_definite) when a term is <= 0: with lambda = 0 and a
 * singular factor this is a refusal, never -inf. */
int cv_kron_block_logdet(cv_kron_block *kb, const double *s, double lambda, double *out,
                         cv_err *e);

/* The dim eigenvalues in eigen-coordinate order (KFAC: s_c = mu_i lam_j, the
 * EKFAC starting point). */
int cv_kron_block_products(cv_kron_block *kb, double *s, cv_err *e);

/* All dim eigenvalues of M (KFAC) or of Q diag(s) Q^T, ascending. */
int cv_kron_block_eigenvalues(cv_kron_block *kb, const double *s, double *vals, cv_err *e);

/* The k (1 <= k <= dim) eigenvalues `which` asks for (cv_which of
 * estimators.h, as op eigen: largest descending, smallest ascending,
 * magnitude by descending |.|; ties in a fixed order, EKFAC by coordinate), into
 * vals; their eigen coordinates into coords (may be NULL); their unit
 * eigenvectors P (q_Bi (x) q_Aj) in theta order into vecs (dim x k, may be
 * NULL).  KFAC: a heap over the sorted factor spectra, O(dim_b + k log dim_b)
 * after the eigendecomposition (each row i of products is monotone in j);
 * EKFAC: a sort of s. */
int cv_kron_block_eigen(cv_kron_block *kb, const double *s, cv_which which, int k,
                        double *vals, int *coords, double *vecs, cv_err *e);

/* The unit eigenvector of eigen coordinate c (theta order, dim doubles). */
int cv_kron_block_eigvec(cv_kron_block *kb, int c, double *v, cv_err *e);

/* EKFAC rotations for k vectors: Z = Q^T X (theta -> eigen coordinates) and
 * X = Q Z (back).  Q is orthogonal, so one undoes the other. */
int cv_kron_block_rotate(cv_kron_block *kb, int k, const double *X, double *Z, cv_err *e);
int cv_kron_block_unrotate(cv_kron_block *kb, int k, const double *Z, double *X, cv_err *e);

/* ------------------------------------------------ block-diagonal over layers */

/* What the linop of a cv_kron_diag applies. */
typedef enum {
    CV_KRON_FORWARD = 0,  /* M + lambda I (lambda is a shift; 0: the curvature) */
    CV_KRON_INVERSE,      /* (M + lambda I)^-1, exact per block */
    CV_KRON_FACTORED      /* factored damping per Kronecker block (KFAC slots only) */
} cv_kron_mode;

/* One diagonal block: a Kronecker block (kron, with EKFAC values s or NULL),
 * or a non-Kronecker block applied by a callback operator (op; for the
 * layers that get their exact block: forward mode only, no exact spectra).
 * All borrowed. */
typedef struct {
    size_t offset, dim;      /* rows [offset, offset + dim) of the cv_block's vector */
    cv_kron_block *kron;     /* NULL for a callback slot */
    const double *s;         /* EKFAC values (kron->dim) or NULL */
    const cv_linop *op;      /* callback slot's operator (op->n = dim) */
} cv_kron_slot;

/* Slots tile the operator's vector in the order they were added (the order
 * of the layers' tensors in the cv_block: state_dict order). */
typedef struct cv_kron_diag {
    size_t n;                /* sum of the slots' dims */
    int count, cap;
    cv_kron_slot *slots;
    cv_kron_mode mode;       /* set by cv_kron_diag_linop */
    double lambda;
} cv_kron_diag;

void cv_kron_diag_init(cv_kron_diag *d);
void cv_kron_diag_free(cv_kron_diag *d);   /* frees the slot table, nothing borrowed */
/* Appends a Kronecker slot (s: EKFAC values or NULL) / a callback slot. */
int cv_kron_diag_add(cv_kron_diag *d, cv_kron_block *kb, const double *s, cv_err *e);
int cv_kron_diag_add_op(cv_kron_diag *d, const cv_linop *op, cv_err *e);
/* d covers block b: n == b->dim (CV_EINVAL "invalid_block" otherwise). */
int cv_kron_diag_check(const cv_kron_diag *d, const cv_block *b, cv_err *e);

/* Makes op (n = d->n, progress NULL: set it) apply `mode` with lambda;
 * computes every needed eigendecomposition now (so applies only read) and
 * refuses a callback slot in the inverse modes and a factored EKFAC slot.
 * op->ctx is d, which must outlive op. */
int cv_kron_diag_linop(cv_kron_diag *d, cv_kron_mode mode, double lambda, cv_linop *op,
                       cv_err *e);

/* Exact quantities of the block-diagonal M (forward, no shift) from the
 * slots' exact ones; refused (CV_EINVAL "not_exact") with a callback slot. */
int cv_kron_diag_trace(cv_kron_diag *d, double *out, cv_err *e);
int cv_kron_diag_diagonal(cv_kron_diag *d, double *diag, cv_err *e);          /* n */
int cv_kron_diag_logdet(cv_kron_diag *d, double lambda, double *out, cv_err *e);
int cv_kron_diag_eigenvalues(cv_kron_diag *d, double *vals, cv_err *e);        /* n, ascending */
/* The k (1 <= k <= n) eigenpairs `which` asks for, merged over the slots'
 * own top-k (ties: lower slot, then the slot's order); vecs: n x k or NULL
 * (zero outside the eigenvector's slot); slots: k slot indices or NULL. */
int cv_kron_diag_eigen(cv_kron_diag *d, cv_which which, int k, double *vals, double *vecs,
                       int *slots, cv_err *e);

#endif
