/*
 * ref.h — independent float64 reference of NSA selection attention.
 *
 * Written straight from DESIGN.md §2 and sharing no code with kernels/: the
 * key set of each row is built as a boolean mask over [0, Skv), then plain
 * softmax attention runs over the masked keys in double precision.
 *
 * All arrays are contiguous row-major:
 *   q [B][S][H][Dk], k [B][Skv][G][Dk], v [B][Skv][G][Dv], o/do [B][S][H][Dv],
 *   lse [B][S][H], sel [B][S][G][n] (block ids) or [B][S][G][n][2] (ranges).
 * H = G*h, head j of group g is g*h + j; query t sits at p(t) = t + Skv - S.
 */
#ifndef NSA_REF_H
#define NSA_REF_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { NSA_REF_BLOCKS = 0, NSA_REF_RANGES = 1 };

typedef struct {
  int64_t B, S, Skv, G, h, Dk, Dv, n;
  const double *q, *k, *v;
  int sel_kind;        /* NSA_REF_BLOCKS or NSA_REF_RANGES */
  const int32_t *sel;
  int32_t block_size;  /* NSA_REF_BLOCKS only */
  double scale;        /* <= 0: 1/sqrt(Dk) */
} nsa_ref_problem_t;

/* Number of invalid selection entries (id < -1, id >= ceil(Skv/bs),
 * start > end, start < 0). */
int64_t nsa_ref_count_invalid(const nsa_ref_problem_t *p);

/* Key-set mask of row (b, t, g): mask[s] = 1 iff key s is in the set.
 * Returns the number of keys. Invalid entries are ignored. */
int64_t nsa_ref_row_mask(const nsa_ref_problem_t *p, int64_t b, int64_t t, int64_t g,
                         unsigned char *mask);

/* o [B][S][H][Dv], lse [B][S][H] (may be NULL); empty rows: o = 0, lse = -inf. */
void nsa_ref_fwd(const nsa_ref_problem_t *p, double *o, double *lse);

/* Gradients of L = sum(dout * o): dq [B][S][H][Dk], dk [B][Skv][G][Dk],
 * dv [B][Skv][G][Dv] (all fully written). */
void nsa_ref_bwd(const nsa_ref_problem_t *p, const double *dout, double *dq, double *dk,
                 double *dv);

#ifdef __cplusplus
}
#endif
#endif
