// fwd_rows_order.cu — the order in which the persistent forward streams a
// row block's tiles (fwd_rows.cuh launch_step_order; nsa_cuda_fwd_rows_t::
// order, NSA_CUDA_FWD_ROWS_ORDER=0|1).
//
// Why: the persistent forward (fwd_rows_persist.cu) streams the union of a
// row block's tiles through a ring of 5 slots, and a slot is refilled only
// when every row that uses its tile has computed it. With random
// selections a tile has ~1.7 users among the 11 rows, so at any time only
// the rows with a tile among the 5 in the ring can work; in ascending tile
// order a row often has two or three of them in the ring while other rows
// have none, and waits serialize. Any order of the union in which each
// row's own tiles stay ascending gives every row the same arithmetic
// (bitwise the same outputs: each row still visits its tiles in ascending
// order), so the order is free to spread the rows over the ring.
//
// The rule (tests/cuda/test_cuda_plan.c order_ref is the host version
// the tests compare with step for step): the tiles are placed by their
// depth, as late as each can go. A tile's depth d is 0 when none of its
// users (the block's rows that list it) has a later tile; else 1 + the
// largest depth of its users' next tiles. Steps take the tiles by depth
// descending, ties by tile ascending. A row's next tile has a smaller
// depth, so each row's tiles stay ascending, and the tiles of one depth
// have distinct users: a ring window holds tiles of as many rows as it can.
// (A model of the ring, 11 rows, 5 slots, the bench's 64k selections: 4-5 %
// less time per block than ascending; scheduling the ready tile whose
// users waited longest gave 4 %, measured on the H200 as 3.6 % of the
// forward kernel.) A block whose rows list a tile outside its union
// (impossible with the grouping's unions) or whose depth passes 63 keeps
// ascending order, which is always valid.
//
// Eight lanes per row block (four blocks per warp). A warp per block
// wastes most lanes (the walk below is sequential: 6 400 instructions per
// block, 0.23 ms at T = 64k h = 16 under Nsight Compute, issue-bound; the
// same walk inside the wide grouping made the grouping 0.16 ms slower), a
// thread per block is one long dependent chain (35 000 instructions, 0.19
// ms, latency-bound). Per block, its 8 lanes:
//   1. load the union's words (lane s: words s, s + 8, s + 16, s + 24) and
//      their prefixes (a segmented scan) into shared memory;
//   2. list the rows' tiles (lane s: rows s and s + 8) from the plan's
//      spans by the forward's rule (span_tiles: spans in use inside [0,
//      Skv), a tile shared with the previous span once, the first kMaxT
//      tiles) into the users mask of each union position (bit r = row r);
//   3. walk the union from the top: d = the largest 1 + depth of the
//      users' next tiles (lane s holds rows s and s + 8; a 3-step xor
//      reduction), k = the tiles of depth d so far; um[u] = d << 4 | k
//      (k < 16: a depth's tiles have distinct users);
//   4. turn the counts per depth into each depth's last step (deepest
//      first; lane s: depths 8 s .. 8 s + 7) and write out[end(d) - 1 - k]
//      = tile for every position.
// Output: sord[(b * G + g) * NB + tb][v] = tile of step v (u16, kUT = R *
// 32 entries per block, U used).
#include "fwd_rows.cuh"

namespace {

using namespace nsa_rows;

constexpr int kOL = 8;              // lanes per row block
constexpr int kOT = 128;            // threads per CTA
constexpr int kOI = kOT / kOL;      // row blocks per CTA
constexpr int kOrderDepths = 64;   // depths 0 .. 63 (a deeper block keeps ascending order)

template <int kRows>
__global__ void __launch_bounds__(kOT) step_order_kernel(const int2 *__restrict__ spans,
                                                         const int32_t *__restrict__ nspans, int n, int64_t S,
                                                         int64_t G, int64_t Skv, int64_t NB, int nw,
                                                         const int32_t *__restrict__ ord,
                                                         const unsigned *__restrict__ ubits, int64_t nitems,
                                                         unsigned short *__restrict__ sord) {
  constexpr int kUT = kRows * kMaxT;
  constexpr unsigned kFull = 0xffffffffu;
  static_assert(kRows <= 2 * kOL && kRows <= 16, "rows: two per lane, users mask u16");
  __shared__ __align__(4) unsigned short sUm[kOI][kUT];  // users mask of union position u, then d << 4 | k
  __shared__ unsigned sWd[kOI][32];                       // union words
  __shared__ unsigned short sPr[kOI][32];                 // union positions before each word
  __shared__ unsigned short sCd[kOI][kOrderDepths];       // tiles per depth, then each depth's end
  const int tid = threadIdx.x, lane = tid & 31, sub = lane & (kOL - 1), blk = tid / kOL;
  const int64_t item = (int64_t)blockIdx.x * kOI + blk;  // = (b * G + g) * NB + tb
  const bool live = item < nitems;  // (every lane takes part in the shuffles)
  const int64_t bg = live ? item / NB : 0, tb = live ? item % NB : 0, b = bg / G, g = bg % G;
  unsigned short *um = sUm[blk], *pr = sPr[blk], *cd = sCd[blk];
  unsigned *wd = sWd[blk];
  auto seg_incl = [&](int x) {  // inclusive sum over the block's lanes 0 .. sub
#pragma unroll
    for (int o = 1; o < kOL; o <<= 1) {
      const int v = __shfl_up_sync(kFull, x, o, kOL);
      if (sub >= o) x += v;
    }
    return x;
  };

  // 1. The union: word 8 i + s in lane s.
  int base = 0;
#pragma unroll
  for (int i = 0; i < 32 / kOL; i++) {
    const int w = kOL * i + sub;
    const unsigned x = live && w < nw ? ubits[item * nw + w] : 0u;
    const int inc = seg_incl(__popc(x));
    wd[w] = x, pr[w] = (unsigned short)(base + inc - __popc(x));
    base += __shfl_sync(kFull, inc, kOL - 1, kOL);
  }
  const int U = min(base, kUT);
  for (int i = sub; 2 * i < U; i += kOL) reinterpret_cast<unsigned *>(um)[i] = 0u;
  for (int d = sub; d < kOrderDepths; d += kOL) cd[d] = 0;
  __syncwarp();
  auto upos = [&](int kt) { return (int)pr[kt >> 5] + __popc(wd[kt >> 5] & ((1u << (kt & 31)) - 1u)); };

  // 2. The rows' tiles (fwd_rows.cuh span_tiles, one span at a time); a
  // row's spans are loaded together (one latency per row).
  bool bad = false;
  for (int h = 0; h < 2; h++) {
    const int r = sub + kOL * h;
    if (!live || r >= kRows || tb * kRows + r >= S) continue;
    const int64_t row = (b * S + ord[bg * S + tb * kRows + r]) * G + g;
    const int nsp = min((int)nspans[row], n);
    // Loads without branches (index clamped to the row's last span), 16 at
    // a time, so they are in flight together: a predicated load followed by
    // its store to the local array waits for each load in turn (0.14 ms at
    // T = 64k under Nsight Compute, most of it that wait).
    int2 xs[kMaxT];  // (n <= 32)
#pragma unroll
    for (int c0 = 0; c0 < kMaxT; c0 += 16) {
      if (c0 >= nsp) break;
      int2 v[16];
#pragma unroll
      for (int i = 0; i < 16; i++) v[i] = spans[row * n + min(c0 + i, nsp - 1)];
#pragma unroll
      for (int i = 0; i < 16; i++) xs[c0 + i] = v[i];
    }
    int c = 0, plast = -3;
    for (int sp = 0; sp < nsp && c < kMaxT; sp++) {
      const int2 x = xs[sp];
      if (!(x.y > x.x && x.x >= 0 && x.y <= Skv)) {
        plast = -2;
        continue;
      }
      const int first = x.x / kT, last = (x.y - 1) / kT;
      for (int kt = first == plast ? first + 1 : first; kt <= last && c < kMaxT; kt++, c++) {
        if (kt < nw * 32 && ((wd[kt >> 5] >> (kt & 31)) & 1u)) {
          const int up = upos(kt);
          atomicOr(reinterpret_cast<unsigned *>(um) + (up >> 1), 1u << (r + 16 * (up & 1)));
        } else {
          bad = true;
        }
      }
      plast = last;
    }
  }
  bad = ((__ballot_sync(kFull, bad) >> (lane & ~(kOL - 1))) & ((1u << kOL) - 1u)) != 0u;  // the block's
  __syncwarp();

  // 3. Depths from the top (lane s: rows s and s + 8).
  const int r0 = sub, r1 = sub + kOL;
  int dn0 = 0, dn1 = 0;
  const int steps = (int)__reduce_max_sync(kFull, (unsigned)U);
  for (int i = 0; i < steps; i++) {
    const int u = U - 1 - i;
    const bool act = u >= 0 && !bad;  // (uniform in the block's lanes)
    const unsigned m = act ? um[u] : 0u;
    const bool us0 = (m >> r0) & 1u, us1 = r1 < kRows && ((m >> r1) & 1u);
    int d = max(us0 ? dn0 : 0, us1 ? dn1 : 0);
#pragma unroll
    for (int o = 1; o < kOL; o <<= 1) d = max(d, __shfl_xor_sync(kFull, d, o, kOL));
    if (us0) dn0 = d + 1;
    if (us1) dn1 = d + 1;
    if (act && d >= kOrderDepths) bad = true;
    if (act && !bad && sub == 0) {
      const int k = cd[d];
      cd[d] = (unsigned short)(k + 1);
      um[u] = (unsigned short)((d << 4) | k);
    }
  }
  __syncwarp();

  // 4. Depth d's steps end (one past) at the count of tiles of depth >= d
  // (lane s: depths 8 s .. 8 s + 7).
  {
    int c[kOrderDepths / kOL], sum = 0;
#pragma unroll
    for (int j = 0; j < kOrderDepths / kOL; j++) c[j] = cd[(kOrderDepths / kOL) * sub + j], sum += c[j];
    int above = sum;
#pragma unroll
    for (int o = 1; o < kOL; o <<= 1) {
      const int v = __shfl_down_sync(kFull, above, o, kOL);
      if (sub + o < kOL) above += v;
    }
    int acc = above - sum;  // tiles deeper than this lane's depths
#pragma unroll
    for (int j = kOrderDepths / kOL - 1; j >= 0; j--) {
      acc += c[j];
      cd[(kOrderDepths / kOL) * sub + j] = (unsigned short)acc;
    }
  }
  __syncwarp();
  if (!live) return;
  unsigned short *out = sord + item * kUT;
  for (int i = 0; i < 32 / kOL; i++) {
    const int w = kOL * i + sub;
    int u = pr[w];
    for (unsigned m = wd[w]; m != 0u && u < U; m &= m - 1, u++) {
      const unsigned short tile = (unsigned short)(w * 32 + __ffs(m) - 1);
      if (bad) {  // ascending
        out[u] = tile;
      } else {
        const int e = um[u];
        out[cd[e >> 4] - 1 - (e & 15)] = tile;
      }
    }
  }
}

}  // namespace

cudaError_t nsa_rows::launch_step_order(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, int R, const int32_t *ord,
                                        const unsigned *ubits, unsigned short *sord, cudaStream_t st) {
  const int64_t NT = (a->Skv + kT - 1) / kT, nw = (NT + 31) / 32;
  if (R != 11 || nw > 32 || plan == nullptr || plan->n < 1 || plan->n > 32 || ord == nullptr || ubits == nullptr ||
      sord == nullptr)
    return cudaErrorInvalidValue;
  const int64_t NB = (a->S + R - 1) / R, nitems = a->B * a->G * NB;
  if (nitems <= 0) return cudaSuccess;
  step_order_kernel<11><<<(unsigned)((nitems + kOI - 1) / kOI), kOT, 0, st>>>(
      (const int2 *)plan->spans, plan->nspans, (int)plan->n, a->S, a->G, a->Skv, NB, (int)nw, ord, ubits, nitems,
      sord);
  return cudaGetLastError();
}
