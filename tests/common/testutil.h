/*
 * testutil.h — helpers for the kernel test suites (and anyone else's):
 * a seeded RNG, strided tensor buffers (any storage order, gaps, padding),
 * random fills whose values are exactly representable in the dtype (so the
 * float64 reference sees the very values the kernel reads), NaN poisoning,
 * conversion to contiguous float64, relative error, and random selection
 * generators (duplicates, overlaps, unsorted, unused slots, empty rows,
 * correlated rows, spans past p(t) and Skv).
 *
 * Conversions here are written independently of kernels/ (exact encodes of
 * representable values, bit decodes), so tests do not trust kernel code.
 */
#ifndef NSA_TESTUTIL_H
#define NSA_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "nsa/sel_attn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- RNG (splitmix64) ---- */
typedef struct {
  uint64_t s;
} nsa_tu_rng_t;
void nsa_tu_rng_seed(nsa_tu_rng_t *r, uint64_t seed);
uint64_t nsa_tu_rng_u64(nsa_tu_rng_t *r);
double nsa_tu_rng_uniform(nsa_tu_rng_t *r);                    /* [0, 1) */
int64_t nsa_tu_rng_int(nsa_tu_rng_t *r, int64_t lo, int64_t hi); /* [lo, hi] inclusive */

/* ---- tensor buffers ---- */
typedef struct {
  nsa_tensor_t t; /* the view handed to kernels */
  void *mem;      /* allocation (t.data == mem) */
  size_t bytes;   /* allocation size */
} nsa_tu_buf_t;

/* Allocates a view of `shape`. order: storage order of the dims, outermost
 * first (NULL = row-major 0..ndim-1; e.g. {0,2,1,3} stores K [B,Skv,G,D] as
 * [B,G,Skv,D]). gap >= 1: stride of the innermost stored dim. pad: extra
 * elements after each stored dim's extent. The memory is poisoned.
 * Returns 0, or -1 when out of memory. */
int nsa_tu_buf_alloc(nsa_tu_buf_t *b, nsa_dtype_t dt, int ndim, const int64_t *shape,
                     const int *order, int64_t gap, int64_t pad);
/* Contiguous shorthand. */
int nsa_tu_buf_contig(nsa_tu_buf_t *b, nsa_dtype_t dt, int ndim, const int64_t *shape);
void nsa_tu_buf_free(nsa_tu_buf_t *b);
int64_t nsa_tu_numel(const nsa_tensor_t *t);

/* Whole allocation := NaN (f32/bf16/f16) or 0x5a5a5a5a (i32). */
void nsa_tu_poison(nsa_tu_buf_t *b);
/* 1 when every element of the whole allocation still holds the poison. */
int nsa_tu_is_poisoned(const nsa_tu_buf_t *b);
/* Every logical element := uniform in [lo, hi), rounded DOWN in magnitude to a
 * value exactly representable in the dtype (nonzero with overwhelming odds). */
void nsa_tu_fill_random(nsa_tu_buf_t *b, nsa_tu_rng_t *r, double lo, double hi);
/* Logical elements → contiguous double array out[numel]. */
void nsa_tu_to_f64(const nsa_tensor_t *t, double *out);
/* Contiguous i32 array → logical elements of an i32 tensor. */
void nsa_tu_from_i32(nsa_tensor_t *t, const int32_t *src);

/* Exact decodes (independent of kernels/). */
double nsa_tu_bf16_value(uint16_t bits);
double nsa_tu_f16_value(uint16_t bits);

/* max_i |got_i - want_i| / max(max_i |want_i|, 1e-30). Infinite entries of
 * want must match exactly; NaN in got or a mismatched inf gives +INFINITY. */
double nsa_tu_rel_err(const double *got, const double *want, int64_t n);

/* ---- selection generators (contiguous i32 arrays) ---- */
enum {
  NSA_TU_SEL_DUP = 1 << 0,        /* repeat ids/spans inside a row */
  NSA_TU_SEL_UNUSED = 1 << 1,     /* sprinkle unused slots (-1 / [0,0]) */
  NSA_TU_SEL_EMPTY_ROWS = 1 << 2, /* some rows all unused */
  NSA_TU_SEL_CORRELATED = 1 << 3, /* rows near each other share blocks, plus the local block */
  NSA_TU_SEL_FUTURE = 1 << 4,     /* entries past p(t) (clipped away) */
  NSA_TU_SEL_ALL = 0x1f,
  /* (not in ALL) block indices: the queries of one query block (same own
   * block) copy one selection, as trained models and issue 7's `corr`
   * pattern do; with UNUSED some rows change one slot (mostly shared) */
  NSA_TU_SEL_BLOCKWISE = 1 << 5,
};
/* ids [B][S][G][n]: valid ids in [0, ceil(Skv/bs)) or -1; unsorted. */
void nsa_tu_sel_blocks(int32_t *ids, int64_t B, int64_t S, int64_t G, int64_t n, int64_t Skv,
                       int32_t block_size, unsigned flags, nsa_tu_rng_t *r);
/* spans [B][S][G][n][2]: valid 0 <= start <= end (end may pass Skv); overlapping,
 * touching, empty [x,x], unsorted. */
void nsa_tu_sel_ranges(int32_t *sp, int64_t B, int64_t S, int64_t G, int64_t n, int64_t Skv,
                       unsigned flags, nsa_tu_rng_t *r);

#ifdef __cplusplus
}
#endif
#endif
