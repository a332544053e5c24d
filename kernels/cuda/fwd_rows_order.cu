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
// One thread per row block: the block's work is a walk over ~100 union
// positions with a little arithmetic each, so a warp per block (tried:
// 6 400 instructions per block, 0.23 ms at T = 64k h = 16 under Nsight
// Compute; the same walk inside the wide grouping made the grouping 0.16
// ms slower) wastes 31 lanes. Each thread:
//   1. loads its block's union words and their prefixes (sWd, sPr);
//   2. lists its rows' tiles from the plan's spans by the forward's rule
//      (span_tiles: spans in use inside [0, Skv), a tile shared with the
//      previous span once, the first kMaxT tiles) into the users mask of
//      each union position (sUm, bit r = the block's row r);
//   3. walks the union from the top: d = the largest 1 + depth of its
//      users' next tiles (dn[r], registers), k = the tiles of depth d seen
//      so far (sCd), sUm[u] = d << 4 | k (k < 16: a depth's tiles have
//      distinct users);
//   4. turns the counts per depth into each depth's last step (deepest
//      first) and writes out[end(d) - 1 - k] = tile for every position.
// Shared memory is [index][thread] (kOT threads): the threads of a warp
// read one 4-byte word apart whatever index each is at (no bank
// conflicts). Output: sord[(b * G + g) * NB + tb][v] = tile of step v
// (u16, kUT = R * 32 entries per block, U used).
#include "fwd_rows.cuh"

namespace {

using namespace nsa_rows;

constexpr int kOT = 64;             // threads (row blocks) per CTA
constexpr int kOrderDepths = 64;   // depths 0 .. 63 (a deeper block keeps ascending order)

template <int kRows>
struct OrderSmem {
  static constexpr int kUT = kRows * kMaxT;
  static constexpr size_t um = 0;                                         // [kUT][kOT] u16 users mask, then d << 4 | k
  static constexpr size_t wd = um + (size_t)kUT * kOT * 2;                // [32][kOT] u32 union words
  static constexpr size_t pr = wd + (size_t)32 * kOT * 4;                 // [32][kOT] u16 positions before each word
  static constexpr size_t cd = pr + (size_t)32 * kOT * 2;                 // [kOrderDepths][kOT] u16 tiles per depth
  static constexpr size_t bytes = cd + (size_t)kOrderDepths * kOT * 2;
};

template <int kRows>
__global__ void __launch_bounds__(kOT) step_order_kernel(const int2 *__restrict__ spans,
                                                         const int32_t *__restrict__ nspans, int n, int64_t S,
                                                         int64_t G, int64_t Skv, int64_t NB, int nw,
                                                         const int32_t *__restrict__ ord,
                                                         const unsigned *__restrict__ ubits, int64_t nitems,
                                                         unsigned short *__restrict__ sord) {
  using L = OrderSmem<kRows>;
  constexpr int kUT = L::kUT;
  static_assert(kRows <= 16, "users mask: u16");
  extern __shared__ __align__(16) unsigned char osm[];
  const int tid = threadIdx.x;
  unsigned short *sUm = reinterpret_cast<unsigned short *>(osm + L::um) + tid;  // [u * kOT]
  unsigned *sWd = reinterpret_cast<unsigned *>(osm + L::wd) + tid;             // [w * kOT]
  unsigned short *sPr = reinterpret_cast<unsigned short *>(osm + L::pr) + tid;  // [w * kOT]
  unsigned short *sCd = reinterpret_cast<unsigned short *>(osm + L::cd) + tid;  // [d * kOT]
  const int64_t item = (int64_t)blockIdx.x * kOT + tid;  // = (b * G + g) * NB + tb
  if (item >= nitems) return;
  const int64_t bg = item / NB, tb = item % NB, b = bg / G, g = bg % G;
  unsigned short *out = sord + item * kUT;

  // 1. The union.
  int U = 0;
  for (int w = 0; w < nw; w++) {
    const unsigned x = ubits[item * nw + w];
    sWd[w * kOT] = x, sPr[w * kOT] = (unsigned short)U;
    U += __popc(x);
  }
  U = min(U, kUT);
  for (int u = 0; u < U; u++) sUm[u * kOT] = 0;
  auto upos = [&](int kt) {
    return (int)sPr[(kt >> 5) * kOT] + __popc(sWd[(kt >> 5) * kOT] & ((1u << (kt & 31)) - 1u));
  };

  // 2. The rows' tiles (fwd_rows.cuh span_tiles, one span at a time). The
  // rows' t, span counts and a row's spans are each loaded together: one
  // latency per row, not one per span (~0.2 ms at T = 64k otherwise).
  int tr[kRows], nr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; r++) tr[r] = tb * kRows + r < S ? ord[bg * S + tb * kRows + r] : -1;
#pragma unroll
  for (int r = 0; r < kRows; r++) nr[r] = tr[r] >= 0 ? min((int)nspans[(b * S + tr[r]) * G + g], n) : 0;
  bool bad = false;
#pragma unroll
  for (int r = 0; r < kRows; r++) {
    if (tr[r] < 0) break;
    const int64_t row = (b * S + tr[r]) * G + g;
    const int nsp = nr[r];
    int2 xs[kMaxT];  // (n <= 32)
#pragma unroll
    for (int i = 0; i < kMaxT; i++) xs[i] = i < nsp ? spans[row * n + i] : make_int2(0, 0);
    int c = 0, plast = -3;
    for (int s = 0; s < nsp && c < kMaxT; s++) {
      const int2 x = xs[s];
      const bool ok = x.y > x.x && x.x >= 0 && x.y <= Skv;
      if (!ok) {
        plast = -2;
        continue;
      }
      const int first = x.x / kT, last = (x.y - 1) / kT;
      for (int kt = first == plast ? first + 1 : first; kt <= last && c < kMaxT; kt++, c++) {
        if (kt < nw * 32 && ((sWd[(kt >> 5) * kOT] >> (kt & 31)) & 1u))
          sUm[upos(kt) * kOT] |= (unsigned short)(1u << r);
        else
          bad = true;
      }
      plast = last;
    }
  }

  // 3. Depths from the top.
  int dn[kRows];
#pragma unroll
  for (int r = 0; r < kRows; r++) dn[r] = 0;
  for (int d = 0; d < kOrderDepths; d++) sCd[d * kOT] = 0;
  int maxd = 0;
  for (int u = U - 1; u >= 0 && !bad; u--) {
    const unsigned m = sUm[u * kOT];
    int d = 0;
#pragma unroll
    for (int r = 0; r < kRows; r++) d = (m >> r) & 1u ? max(d, dn[r]) : d;
    if (d >= kOrderDepths) {
      bad = true;
      break;
    }
#pragma unroll
    for (int r = 0; r < kRows; r++) dn[r] = (m >> r) & 1u ? d + 1 : dn[r];
    const int k = sCd[d * kOT];
    sCd[d * kOT] = (unsigned short)(k + 1);
    sUm[u * kOT] = (unsigned short)((d << 4) | k);
    maxd = max(maxd, d);
  }
  if (bad) {  // ascending
    int u = 0;
    for (int w = 0; w < nw; w++)
      for (unsigned m = sWd[w * kOT]; m != 0u && u < kUT; m &= m - 1, u++)
        out[u] = (unsigned short)(w * 32 + __ffs(m) - 1);
    return;
  }
  // 4. Depth d's steps end (one past) at the count of tiles of depth >= d.
  for (int d = maxd, acc = 0; d >= 0; d--) {
    acc += sCd[d * kOT];
    sCd[d * kOT] = (unsigned short)acc;
  }
  int u = 0;
  for (int w = 0; w < nw; w++)
    for (unsigned m = sWd[w * kOT]; m != 0u && u < U; m &= m - 1, u++) {
      const int e = sUm[u * kOT];
      out[sCd[(e >> 4) * kOT] - 1 - (e & 15)] = (unsigned short)(w * 32 + __ffs(m) - 1);
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
  static unsigned long long set_on = 0;  // bwd_common.cuh: set once per device
  int dev = 0;
  const cudaError_t e = set_smem_once(step_order_kernel<11>, (int)OrderSmem<11>::bytes, &set_on, &dev);
  if (e != cudaSuccess) return e;
  step_order_kernel<11><<<(unsigned)((nitems + kOT - 1) / kOT), kOT, OrderSmem<11>::bytes, st>>>(
      (const int2 *)plan->spans, plan->nspans, (int)plan->n, a->S, a->G, a->Skv, NB, (int)nw, ord, ubits, nitems,
      sord);
  return cudaGetLastError();
}
