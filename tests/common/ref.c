/*
 * ref.c — float64 reference (see ref.h). Deliberately simple and slow:
 * a boolean mask per row, a dense softmax over the masked keys.
 */
#include "ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double ref_scale(const nsa_ref_problem_t *p) {
  return p->scale > 0 ? p->scale : 1.0 / sqrt((double)p->Dk);
}

/* Entry i of row (b,t,g): 1 usable (span in *lo,*hi), 0 unused, -1 invalid. */
static int ref_entry(const nsa_ref_problem_t *p, int64_t b, int64_t t, int64_t g, int64_t i,
                     int64_t *lo, int64_t *hi) {
  int64_t row = (b * p->S + t) * p->G + g;
  if (p->sel_kind == NSA_REF_BLOCKS) {
    int64_t id = p->sel[row * p->n + i];
    int64_t nblocks = p->Skv / p->block_size + (p->Skv % p->block_size != 0);
    if (id == -1) return 0;
    if (id < -1 || id >= nblocks) return -1;
    *lo = id * p->block_size;
    *hi = (id + 1) * p->block_size;
    return 1;
  }
  int64_t s = p->sel[(row * p->n + i) * 2], e = p->sel[(row * p->n + i) * 2 + 1];
  if (s < 0 || s > e) return -1;
  if (s == 0 && e == 0) return 0;
  *lo = s;
  *hi = e;
  return 1;
}

int64_t nsa_ref_count_invalid(const nsa_ref_problem_t *p) {
  int64_t bad = 0, lo, hi;
  for (int64_t b = 0; b < p->B; b++)
    for (int64_t t = 0; t < p->S; t++)
      for (int64_t g = 0; g < p->G; g++)
        for (int64_t i = 0; i < p->n; i++)
          if (ref_entry(p, b, t, g, i, &lo, &hi) < 0) bad++;
  return bad;
}

int64_t nsa_ref_row_mask(const nsa_ref_problem_t *p, int64_t b, int64_t t, int64_t g,
                         unsigned char *mask) {
  memset(mask, 0, (size_t)p->Skv);
  int64_t pos = t + (p->Skv - p->S); /* bottom-right alignment */
  for (int64_t i = 0; i < p->n; i++) {
    int64_t lo, hi;
    if (ref_entry(p, b, t, g, i, &lo, &hi) <= 0) continue;
    for (int64_t s = lo; s < hi; s++)
      if (s >= 0 && s <= pos && s < p->Skv) mask[s] = 1;
  }
  int64_t cnt = 0;
  for (int64_t s = 0; s < p->Skv; s++) cnt += mask[s];
  return cnt;
}

/* Softmax probabilities of head (b,t,hd) over the row's mask into prob[Skv];
 * returns lse (-inf when empty). */
static double ref_probs(const nsa_ref_problem_t *p, int64_t b, int64_t t, int64_t hd,
                        const unsigned char *mask, double *prob) {
  const int64_t H = p->G * p->h, g = hd / p->h;
  const double sc = ref_scale(p);
  const double *qv = p->q + ((b * p->S + t) * H + hd) * p->Dk;
  double mx = -INFINITY;
  for (int64_t s = 0; s < p->Skv; s++) {
    prob[s] = 0;
    if (!mask[s]) continue;
    const double *kv = p->k + ((b * p->Skv + s) * p->G + g) * p->Dk;
    double dot = 0;
    for (int64_t c = 0; c < p->Dk; c++) dot += qv[c] * kv[c];
    prob[s] = sc * dot;
    if (prob[s] > mx) mx = prob[s];
  }
  if (mx == -INFINITY) return -INFINITY;
  double sum = 0;
  for (int64_t s = 0; s < p->Skv; s++)
    if (mask[s]) sum += exp(prob[s] - mx);
  for (int64_t s = 0; s < p->Skv; s++) prob[s] = mask[s] ? exp(prob[s] - mx) / sum : 0.0;
  return mx + log(sum);
}

void nsa_ref_fwd(const nsa_ref_problem_t *p, double *o, double *lse) {
  const int64_t H = p->G * p->h;
  unsigned char *mask = malloc((size_t)(p->Skv > 0 ? p->Skv : 1));
  double *prob = malloc(sizeof(double) * (size_t)(p->Skv > 0 ? p->Skv : 1));
  for (int64_t b = 0; b < p->B; b++)
    for (int64_t t = 0; t < p->S; t++)
      for (int64_t hd = 0; hd < H; hd++) {
        int64_t g = hd / p->h;
        nsa_ref_row_mask(p, b, t, g, mask);
        double l = ref_probs(p, b, t, hd, mask, prob);
        double *ov = o + ((b * p->S + t) * H + hd) * p->Dv;
        for (int64_t c = 0; c < p->Dv; c++) ov[c] = 0;
        for (int64_t s = 0; s < p->Skv; s++) {
          if (!mask[s]) continue;
          const double *vv = p->v + ((b * p->Skv + s) * p->G + g) * p->Dv;
          for (int64_t c = 0; c < p->Dv; c++) ov[c] += prob[s] * vv[c];
        }
        if (lse) lse[(b * p->S + t) * H + hd] = l;
      }
  free(mask);
  free(prob);
}

/* With P = softmax(scale * q K^T) over the mask and o = P V:
 *   dV[s] += P_s dout;   dP_s = dout . v_s;   dS_s = P_s (dP_s - sum_u P_u dP_u)
 *   dq    = scale * sum_s dS_s k_s;            dK[s] += scale * dS_s q          */
void nsa_ref_bwd(const nsa_ref_problem_t *p, const double *dout, double *dq, double *dk,
                 double *dv) {
  const int64_t H = p->G * p->h;
  const double sc = ref_scale(p);
  memset(dq, 0, sizeof(double) * (size_t)(p->B * p->S * H * p->Dk));
  memset(dk, 0, sizeof(double) * (size_t)(p->B * p->Skv * p->G * p->Dk));
  memset(dv, 0, sizeof(double) * (size_t)(p->B * p->Skv * p->G * p->Dv));
  size_t sk = (size_t)(p->Skv > 0 ? p->Skv : 1);
  unsigned char *mask = malloc(sk);
  double *prob = malloc(sizeof(double) * sk), *dp = malloc(sizeof(double) * sk);
  for (int64_t b = 0; b < p->B; b++)
    for (int64_t t = 0; t < p->S; t++)
      for (int64_t hd = 0; hd < H; hd++) {
        int64_t g = hd / p->h;
        nsa_ref_row_mask(p, b, t, g, mask);
        ref_probs(p, b, t, hd, mask, prob);
        const double *dov = dout + ((b * p->S + t) * H + hd) * p->Dv;
        const double *qv = p->q + ((b * p->S + t) * H + hd) * p->Dk;
        double *dqv = dq + ((b * p->S + t) * H + hd) * p->Dk;
        double pdp = 0;
        for (int64_t s = 0; s < p->Skv; s++) {
          dp[s] = 0;
          if (!mask[s]) continue;
          const double *vv = p->v + ((b * p->Skv + s) * p->G + g) * p->Dv;
          for (int64_t c = 0; c < p->Dv; c++) dp[s] += dov[c] * vv[c];
          pdp += prob[s] * dp[s];
        }
        for (int64_t s = 0; s < p->Skv; s++) {
          if (!mask[s]) continue;
          double ds = prob[s] * (dp[s] - pdp);
          const double *kv = p->k + ((b * p->Skv + s) * p->G + g) * p->Dk;
          double *dkv = dk + ((b * p->Skv + s) * p->G + g) * p->Dk;
          double *dvv = dv + ((b * p->Skv + s) * p->G + g) * p->Dv;
          for (int64_t c = 0; c < p->Dv; c++) dvv[c] += prob[s] * dov[c];
          for (int64_t c = 0; c < p->Dk; c++) {
            dqv[c] += sc * ds * kv[c];
            dkv[c] += sc * ds * qv[c];
          }
        }
      }
  free(mask);
  free(prob);
  free(dp);
}
