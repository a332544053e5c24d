// plan_group.cu — query packing for the tensor-core forward.
//
// When h < 16 the 16 rows of an m16n8k16 MMA would be mostly empty if a CTA
// served one query. Instead P = 16 / h consecutive queries t0..t0+P-1 of one
// (b, g) share the tile: MMA row m is (query m / h, head m % h). They walk the
// UNION of their key sets once, and each row masks the keys that are not its
// own. For correlated selections (neighbouring queries share blocks, as
// trained models mostly do) the union is barely larger than one row, so each
// K/V tile is loaded and multiplied once for P queries; for random selections
// the union is at most P rows long, i.e. never more MMA work than one query
// per tile.
//
// This kernel builds, per group, the "refined union": the union of the P rows'
// spans cut at every span boundary, so that each piece is either fully inside
// or fully outside each query's key set. One warp per group, lane q follows
// query q's sorted spans; each step the warp takes the smallest next boundary
// (warp min), the lanes at it toggle in/out, and a ballot gives the piece's
// query mask. Pieces with an unchanged mask are not split.
//
// Group index map: grp = ((b * ngt) + tg) * G + g, ngt = ceil(S / P),
// query q of the group is t = tg * P + q.
#include <climits>

#include "cuda_internal.h"

namespace {

__global__ void plan_group_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                                  int64_t B, int64_t S, int64_t G, int64_t n, int P, int64_t ngroups,
                                  int64_t maxp, nsa_cuda_piece_t *__restrict__ pieces,
                                  int2 *__restrict__ gcount) {
  const int lane = threadIdx.x & 31;
  const int64_t grp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (grp >= ngroups) return;  // warp-uniform
  const int64_t ngt = (S + P - 1) / P;
  const int64_t g = grp % G, tg = (grp / G) % ngt, b = grp / (G * ngt);
  const int64_t t = tg * P + lane;
  const bool live = lane < P && t < S;
  const int64_t r = ((b * S) + t) * G + g;
  const int2 *row = live ? spans + r * n : nullptr;
  const int nsp = live ? nspans[r] : 0;

  int i = 0;
  bool inside = false;
  int2 cur = nsp > 0 ? row[0] : make_int2(INT_MAX, INT_MAX);
  unsigned cur_mask = 0;
  int pstart = 0, off = 0;
  int np = 0;
  nsa_cuda_piece_t *out = pieces + grp * maxp;
  for (;;) {
    int next = i < nsp ? (inside ? cur.y : cur.x) : INT_MAX;
    int x = next;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
    if (x == INT_MAX) break;
    if (next == x) {
      if (inside) {
        inside = false;
        i++;
        if (i < nsp) cur = row[i];
      } else {
        inside = true;
      }
    }
    unsigned m = __ballot_sync(0xffffffffu, inside);
    if (m != cur_mask) {
      if (cur_mask != 0) {
        if (lane == 0) {
          nsa_cuda_piece_t p;
          p.start = pstart;
          p.end = x;
          p.off = off;
          p.mask = (int)cur_mask;
          out[np] = p;
        }
        off += x - pstart;
        np++;
      }
      pstart = x;
      cur_mask = m;
    }
  }
  if (lane == 0) gcount[grp] = make_int2(np, off);
}

}  // namespace

extern "C" int nsa_cuda_pack_queries(int64_t h) { return h >= 16 ? 1 : (int)(16 / h); }

extern "C" int64_t nsa_cuda_num_groups(int64_t B, int64_t S, int64_t G, int P) {
  return B * ((S + P - 1) / P) * G;
}

extern "C" int64_t nsa_cuda_max_pieces(int64_t n, int P) {
  int64_t m = 2 * (int64_t)P * n;
  return m > 0 ? m : 1;
}

extern "C" cudaError_t nsa_cuda_launch_plan_group(const nsa_plan_t *plan, int64_t B, int64_t S,
                                                  int64_t G, int P, nsa_cuda_piece_t *pieces,
                                                  int2 *gcount, cudaStream_t st) {
  const int64_t ngroups = nsa_cuda_num_groups(B, S, G, P);
  if (ngroups == 0) return cudaSuccess;
  const int threads = 128;  // 4 groups per block
  const int64_t blocks = (ngroups * 32 + threads - 1) / threads;
  plan_group_kernel<<<(unsigned)blocks, threads, 0, st>>>(
      (const int2 *)plan->spans, plan->nspans, B, S, G, plan->n, P, ngroups,
      nsa_cuda_max_pieces(plan->n, P), pieces, gcount);
  return cudaGetLastError();
}
