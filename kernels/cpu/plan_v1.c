/*
 * plan_v1.c — the v1 (host) planner: a plain sequential loop over rows.
 *
 * Deliberately a different implementation from plan_v2.c (qsort on a scratch
 * copy, then a run-based merge), so the tests comparing the two plans byte
 * for byte compare two independent codes. Same rules: invalid entries are
 * counted and skipped, spans clipped to [0, min(p(t)+1, Skv)), empty spans
 * dropped, overlapping or touching spans merged, tail slots zeroed.
 */
#include <stdlib.h>

#include "cpu_internal.h"

typedef struct {
  int64_t lo, hi;
} v1_span_t;

static int v1_cmp(const void *a, const void *b) {
  const v1_span_t *x = a, *y = b;
  if (x->lo != y->lo) return x->lo < y->lo ? -1 : 1;
  if (x->hi != y->hi) return x->hi < y->hi ? -1 : 1;
  return 0;
}

int nsa_cpu_plan_v1(const nsa_selection_t *sel, const nsa_dims_t *d, nsa_plan_t *plan) {
  const int64_t n = d->n;
  v1_span_t *tmp = malloc(sizeof(v1_span_t) * (size_t)(n > 0 ? n : 1));
  if (!tmp) return NSA_ERR_INTERNAL;
  plan->rows = d->rows;
  plan->n = n;
  plan->invalid = 0;

  int64_t r = 0;
  for (int64_t b = 0; b < d->B; b++) {
    for (int64_t t = 0; t < d->S; t++) {
      int64_t lim = nsa_row_limit(d, t);
      for (int64_t g = 0; g < d->G; g++, r++) {
        size_t cnt = 0;
        for (int64_t i = 0; i < n; i++) {
          int64_t lo = 0, hi = 0;
          int kind = nsa_sel_entry(sel, d, b, t, g, i, &lo, &hi);
          if (kind < 0) plan->invalid++;
          if (kind <= 0) continue;
          lo = lo > 0 ? lo : 0;
          hi = hi < lim ? hi : lim;
          if (lo < hi) tmp[cnt++] = (v1_span_t){lo, hi};
        }
        qsort(tmp, cnt, sizeof(v1_span_t), v1_cmp);

        int32_t *out = plan->spans + r * n * 2;
        memset(out, 0, sizeof(int32_t) * 2 * (size_t)n);
        int32_t ns = 0, len = 0;
        size_t i = 0;
        while (i < cnt) {
          /* extend a run while the next span starts at or before its end */
          int64_t lo = tmp[i].lo, hi = tmp[i].hi;
          for (i++; i < cnt && tmp[i].lo <= hi; i++)
            if (tmp[i].hi > hi) hi = tmp[i].hi;
          out[2 * ns] = (int32_t)lo;
          out[2 * ns + 1] = (int32_t)hi;
          ns++;
          len += (int32_t)(hi - lo);
        }
        plan->nspans[r] = ns;
        plan->row_len[r] = len;
      }
    }
  }
  free(tmp);
  nsa_plan_summarize_seq(plan);
  return NSA_OK;
}
