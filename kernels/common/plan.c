/* plan.c — plan buffer layout/binding and the row-length histogram.
 *
 * One contiguous buffer holds a whole plan (so the CUDA backend can allocate
 * it in one arena slice and copy it in one memcpy):
 *
 *   [spans: rows*n*2 i32][nspans: rows i32][row_len: rows i32][row_off: rows+1 i64]
 *
 * each sub-array starting on a 16-byte boundary.
 */
#include "nsa_internal.h"

const int64_t nsa_len_hist_le[NSA_LEN_HIST_BUCKETS - 1] = {0,   16,   32,   64,   128, 256,
                                                             512, 1024, 2048, 4096, 8192};

int nsa_len_hist_bucket(int64_t len) {
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS - 1; i++)
    if (len <= nsa_len_hist_le[i]) return i;
  return NSA_LEN_HIST_BUCKETS - 1;
}

static size_t align16(size_t x) { return (x + 15u) & ~(size_t)15u; }

size_t nsa_plan_layout(int64_t rows, int64_t n, nsa_plan_layout_t *lay) {
  if (rows < 0) rows = 0;
  if (n < 0) n = 0;
  size_t r = (size_t)rows, nn = (size_t)n;
  lay->spans = 0;
  lay->nspans = align16(lay->spans + r * nn * 2u * sizeof(int32_t));
  lay->row_len = align16(lay->nspans + r * sizeof(int32_t));
  lay->row_off = align16(lay->row_len + r * sizeof(int32_t));
  lay->total = align16(lay->row_off + (r + 1u) * sizeof(int64_t));
  return lay->total;
}

void nsa_plan_bind(nsa_plan_t *p, void *buf, int64_t rows, int64_t n) {
  nsa_plan_layout_t lay;
  nsa_plan_layout(rows, n, &lay);
  memset(p, 0, sizeof(*p));
  p->rows = rows;
  p->n = n;
  char *b = (char *)buf;
  p->spans = (int32_t *)(void *)(b + lay.spans);
  p->nspans = (int32_t *)(void *)(b + lay.nspans);
  p->row_len = (int32_t *)(void *)(b + lay.row_len);
  p->row_off = (int64_t *)(void *)(b + lay.row_off);
}

void nsa_plan_summarize_seq(nsa_plan_t *p) {
  int64_t acc = 0;
  int32_t mx = 0;
  memset(p->len_hist, 0, sizeof(p->len_hist));
  for (int64_t r = 0; r < p->rows; r++) {
    int32_t len = p->row_len[r];
    p->row_off[r] = acc;
    acc += len;
    if (len > mx) mx = len;
    p->len_hist[nsa_len_hist_bucket(len)]++;
  }
  p->row_off[p->rows] = acc;
  p->total_len = acc;
  p->max_len = mx;
}
