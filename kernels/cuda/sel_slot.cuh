// sel_slot.cuh — one selection slot as a token span, and a query's key
// limit: the v2 planner's rules (plan_v2.cu) in one place, so that the
// row grouping (fwd_rows.cu), which lists a row's tiles from the selection
// itself, takes exactly the keys the plan will hold.
#ifndef NSA_CUDA_SEL_SLOT_CUH
#define NSA_CUDA_SEL_SLOT_CUH

#include "cuda_internal.h"

namespace nsa_sel {

// Exclusive key limit of query t: min(p(t)+1, Skv), at least 0, with
// p(t) = t + (Skv - S) (the queries are the last S of Skv positions).
__device__ __forceinline__ int row_limit(int64_t t, int64_t S, int64_t Skv) {
  long long limit = (long long)t + (Skv - S) + 1;  // p(t) + 1
  if (limit > Skv) limit = Skv;
  if (limit < 0) limit = 0;
  return (int)limit;  // Skv < 2^27 (check_limits)
}

// Slot i of row (b,t,g) as a token span [lo, hi) in int64 (no overflow for
// any i32 input), before clipping. Returns 0 = unused, 1 = span, -1 =
// invalid. nblk = ceil(Skv / block_size) for block ids (ids -1: unused; <
// -1 or >= nblk: invalid); ranges {0, 0}: unused, start < 0 or start > end:
// invalid. Reads only the slot's own elements of the view.
__device__ __forceinline__ int load_slot(const nsa_cuda_selview_t &s, int64_t b, int64_t t, int64_t g, int64_t i,
                                         int64_t nblk, long long *lo, long long *hi) {
  const int32_t *p = s.data + b * s.st[0] + t * s.st[1] + g * s.st[2] + i * s.st[3];
  if (s.kind == NSA_SEL_BLOCK_INDICES) {
    int32_t id = __ldg(p);
    if (id == -1) return 0;
    if (id < -1 || (int64_t)id >= nblk) return -1;
    *lo = (long long)id * s.block_size;
    *hi = *lo + s.block_size;
    return 1;
  }
  int32_t a = __ldg(p), e = __ldg(p + s.st[4]);
  if (a == 0 && e == 0) return 0;
  if (a < 0 || a > e) return -1;
  *lo = a;
  *hi = e;
  return 1;
}

}  // namespace nsa_sel

#endif  // NSA_CUDA_SEL_SLOT_CUH
