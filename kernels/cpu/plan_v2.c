/*
 * plan_v2.c — the v2 ("device") planner on the CPU.
 *
 * Written as the data-parallel algorithm the GPU planner runs: one
 * independent task per row r = ((b*S)+t)*G+g, each working only inside its
 * own n span slots, then a blocked exclusive scan of the row lengths.
 *
 * Per row (its slots spans[r][0..n) are the scratch, so no extra memory):
 *   1. load the n entries, classify (unused / invalid / usable); invalid ones
 *      are counted and skipped, so nothing later can index out of bounds;
 *   2. clip usable spans to [0, min(p(t)+1, Skv)), drop the empty ones;
 *   3. insertion-sort by (start, end) — n is small (NSA uses 16–32);
 *   4. merge in place when spans overlap or touch (a.end >= b.start), so the
 *      plan is canonical: the same key set always gives the same bytes;
 *   5. zero the unused tail slots, write nspans and row_len.
 */
#include <stdlib.h>

#include "cpu_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Returns the number of invalid entries of row r. */
static int64_t plan_row(const nsa_selection_t *sel, const nsa_dims_t *d, int64_t r,
                        nsa_plan_t *plan) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  const int64_t n = d->n, lim = nsa_row_limit(d, t);
  int32_t *sp = plan->spans + r * n * 2; /* sp[i][0..1] = {start, end} */
  int64_t cnt = 0, bad = 0;

  for (int64_t i = 0; i < n; i++) {
    int64_t lo = 0, hi = 0;
    int kind = nsa_sel_entry(sel, d, b, t, g, i, &lo, &hi);
    if (kind < 0) {
      bad++;
      continue;
    }
    if (kind == 0) continue;
    if (lo < 0) lo = 0;
    if (hi > lim) hi = lim;
    if (hi <= lo) continue;
    sp[2 * cnt] = (int32_t)lo;
    sp[2 * cnt + 1] = (int32_t)hi;
    cnt++;
  }

  /* insertion sort by (start, end) */
  for (int64_t i = 1; i < cnt; i++) {
    int32_t s0 = sp[2 * i], e0 = sp[2 * i + 1];
    int64_t j = i - 1;
    while (j >= 0 && (sp[2 * j] > s0 || (sp[2 * j] == s0 && sp[2 * j + 1] > e0))) {
      sp[2 * (j + 1)] = sp[2 * j];
      sp[2 * (j + 1) + 1] = sp[2 * j + 1];
      j--;
    }
    sp[2 * (j + 1)] = s0;
    sp[2 * (j + 1) + 1] = e0;
  }

  /* merge overlapping or touching spans in place */
  int64_t m = 0, len = 0;
  for (int64_t i = 0; i < cnt; i++) {
    if (m > 0 && sp[2 * (m - 1) + 1] >= sp[2 * i]) {
      if (sp[2 * i + 1] > sp[2 * (m - 1) + 1]) sp[2 * (m - 1) + 1] = sp[2 * i + 1];
    } else {
      sp[2 * m] = sp[2 * i];
      sp[2 * m + 1] = sp[2 * i + 1];
      m++;
    }
  }
  for (int64_t i = 0; i < m; i++) len += sp[2 * i + 1] - sp[2 * i];
  for (int64_t i = m; i < n; i++) sp[2 * i] = sp[2 * i + 1] = 0;
  plan->nspans[r] = (int32_t)m;
  plan->row_len[r] = (int32_t)len;
  return bad;
}

int nsa_cpu_plan_v2(const nsa_selection_t *sel, const nsa_dims_t *d, nsa_plan_t *plan) {
  const int64_t rows = d->rows;
  int64_t bad = 0;
  plan->rows = rows;
  plan->n = d->n;

#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (int64_t r = 0; r < rows; r++) bad += plan_row(sel, d, r, plan);

  /* Blocked exclusive scan: each of nb blocks sums its rows, a short scan
   * over the block sums, then each block writes its offsets. max_len and the
   * histogram are per-block partials merged at the end. */
  int nb = 1;
#ifdef _OPENMP
  nb = omp_get_max_threads();
#endif
  if (nb < 1) nb = 1;
  if ((int64_t)nb > rows) nb = rows > 0 ? (int)rows : 1;
  int64_t *bsum = calloc((size_t)nb + 1, sizeof(int64_t));
  int32_t *bmax = calloc((size_t)nb, sizeof(int32_t));
  int64_t(*bhist)[NSA_LEN_HIST_BUCKETS] = calloc((size_t)nb, sizeof(*bhist));
  if (!bsum || !bmax || !bhist) {
    free(bsum);
    free(bmax);
    free(bhist);
    return NSA_ERR_INTERNAL;
  }
  const int64_t per = (rows + nb - 1) / (nb > 0 ? nb : 1);

#pragma omp parallel for schedule(static)
  for (int k = 0; k < nb; k++) {
    int64_t r0 = (int64_t)k * per, r1 = r0 + per < rows ? r0 + per : rows;
    int64_t s = 0;
    int32_t mx = 0;
    for (int64_t r = r0; r < r1; r++) {
      s += plan->row_len[r];
      if (plan->row_len[r] > mx) mx = plan->row_len[r];
      bhist[k][nsa_len_hist_bucket(plan->row_len[r])]++;
    }
    bsum[k + 1] = s;
    bmax[k] = mx;
  }
  for (int k = 0; k < nb; k++) bsum[k + 1] += bsum[k];

#pragma omp parallel for schedule(static)
  for (int k = 0; k < nb; k++) {
    int64_t r0 = (int64_t)k * per, r1 = r0 + per < rows ? r0 + per : rows;
    int64_t acc = bsum[k];
    for (int64_t r = r0; r < r1; r++) {
      plan->row_off[r] = acc;
      acc += plan->row_len[r];
    }
  }
  plan->row_off[rows] = bsum[nb];
  plan->total_len = bsum[nb];
  plan->max_len = 0;
  memset(plan->len_hist, 0, sizeof(plan->len_hist));
  for (int k = 0; k < nb; k++) {
    if (bmax[k] > plan->max_len) plan->max_len = bmax[k];
    for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) plan->len_hist[i] += bhist[k][i];
  }
  /* rows == 0: the loops above did nothing; the histogram stays empty. */
  if (rows == 0) memset(plan->len_hist, 0, sizeof(plan->len_hist));
  plan->invalid = bad;
  free(bsum);
  free(bmax);
  free(bhist);
  return NSA_OK;
}
