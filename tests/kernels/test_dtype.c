/*
 * test_dtype.c — bf16/f16 <-> f32 conversions against independent decodes and
 * a brute-force nearest-even rounding in double.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "nsa/sel_attn.h"
#include "testutil.h"

Test(dtype, decode_all_bit_patterns) {
  for (uint32_t x = 0; x < 65536; x++) {
    double w16 = nsa_tu_f16_value((uint16_t)x), wb = nsa_tu_bf16_value((uint16_t)x);
    float g16 = nsa_f16_to_f32((uint16_t)x), gb = nsa_bf16_to_f32((uint16_t)x);
    if (isnan(w16))
      cr_assert(isnan(g16), "f16 %04x", x);
    else
      cr_assert((double)g16 == w16 && !signbit(g16) == !signbit(w16), "f16 %04x: %g vs %g", x, g16, w16);
    if (isnan(wb))
      cr_assert(isnan(gb), "bf16 %04x", x);
    else
      cr_assert((double)gb == wb, "bf16 %04x", x);
    /* round trip of every non-NaN pattern is exact */
    if (!isnan(w16)) cr_assert_eq(nsa_f32_to_f16(g16), (uint16_t)x, "f16 round trip %04x", x);
    if (!isnan(wb)) cr_assert_eq(nsa_f32_to_bf16(gb), (uint16_t)x, "bf16 round trip %04x", x);
  }
}

/* Nearest representable value with ties to the even bit pattern, found by
 * scanning the neighbours of the candidate in the ordered code space. */
typedef double (*decode_fn)(uint16_t);
static void check_rne(float x, uint16_t got, decode_fn dec, uint16_t inf_bits, const char *what) {
  double xv = x, gv = dec(got);
  cr_assert(!isnan(gv), "%s(%a) gave NaN", what, x);
  if (isinf(gv)) {
    /* only when x is beyond the halfway point above the largest finite */
    double maxf = dec((uint16_t)((inf_bits & 0x7fff) - 1));
    double next = ldexp(1.0, ilogb(maxf) + 1);
    cr_assert(fabs(xv) >= (maxf + next) / 2, "%s(%a) overflowed to inf", what, x);
    return;
  }
  uint16_t mag = got & 0x7fff;
  for (int dlt = -1; dlt <= 1; dlt += 2) {
    int nb = (int)mag + dlt;
    if (nb < 0 || nb >= (inf_bits & 0x7fff)) continue;
    uint16_t other = (uint16_t)((got & 0x8000) | nb);
    double ov = dec(other);
    double eg = fabs(xv - gv), eo = fabs(xv - ov);
    cr_assert(eg <= eo, "%s(%a): %a is farther than %a", what, x, gv, ov);
    if (eg == eo && gv != ov) cr_assert((got & 1) == 0, "%s(%a): tie not to even", what, x);
  }
}

static double dec_f16(uint16_t b) { return nsa_tu_f16_value(b); }
static double dec_bf16(uint16_t b) { return nsa_tu_bf16_value(b); }

Test(dtype, round_to_nearest_even) {
  nsa_tu_rng_t r;
  nsa_tu_rng_seed(&r, 9);
  for (int i = 0; i < 200000; i++) {
    uint32_t u = (uint32_t)nsa_tu_rng_u64(&r);
    if (i % 4 == 0) u = (u & 0x807fffffu) | ((uint32_t)nsa_tu_rng_int(&r, 100, 145) << 23); /* f16 range */
    if (i % 8 == 1) u &= 0xffffe000u | 0x00001000u;   /* exact f16 halfway patterns */
    if (i % 8 == 3) u = (u & 0xffff0000u) | 0x8000u;  /* exact bf16 halfway */
    float x;
    memcpy(&x, &u, 4);
    if (isnan(x)) {
      cr_assert(isnan(nsa_f16_to_f32(nsa_f32_to_f16(x))));
      cr_assert(isnan(nsa_bf16_to_f32(nsa_f32_to_bf16(x))));
      continue;
    }
    if (isinf(x)) continue;
    check_rne(x, nsa_f32_to_f16(x), dec_f16, 0x7c00, "f16");
    check_rne(x, nsa_f32_to_bf16(x), dec_bf16, 0x7f80, "bf16");
  }
  cr_assert_eq(nsa_f32_to_f16(65519.0f), 0x7bff);
  cr_assert_eq(nsa_f32_to_f16(65520.0f), 0x7c00);
  cr_assert_eq(nsa_f32_to_f16(INFINITY), 0x7c00);
  cr_assert_eq(nsa_f32_to_f16(-INFINITY), 0xfc00);
  cr_assert_eq(nsa_f32_to_f16(0x1p-25f), 0x0000);        /* tie to even: 0 */
  cr_assert_eq(nsa_f32_to_f16(0x1.000002p-25f), 0x0001); /* just above the tie */
  cr_assert_eq(nsa_f32_to_f16(-0.0f), 0x8000);
  cr_assert_eq(nsa_f32_to_bf16(1.00390625f), 0x3f80); /* 1 + 2^-8: tie → even */
  cr_assert_eq(nsa_f32_to_bf16(INFINITY), 0x7f80);
}

Test(dtype, names_and_sizes) {
  nsa_dtype_t dt;
  cr_assert_eq(nsa_dtype_parse("bf16", 4, &dt), 0);
  cr_assert_eq(dt, NSA_BF16);
  cr_assert_eq(nsa_dtype_size(NSA_F16), 2);
  cr_assert_eq(nsa_dtype_size(NSA_F32), 4);
  cr_assert_str_eq(nsa_path_name(NSA_PATH_PACKED), "packed");
  cr_assert_eq(nsa_len_hist_bucket(0), 0);
  cr_assert_eq(nsa_len_hist_bucket(1), 1);
  cr_assert_eq(nsa_len_hist_bucket(16), 1);
  cr_assert_eq(nsa_len_hist_bucket(17), 2);
  cr_assert_eq(nsa_len_hist_bucket(8192), NSA_LEN_HIST_BUCKETS - 2);
  cr_assert_eq(nsa_len_hist_bucket(8193), NSA_LEN_HIST_BUCKETS - 1);
  nsa_plan_layout_t lay;
  size_t tot = nsa_plan_layout(5, 3, &lay);
  cr_assert(lay.spans % 16 == 0 && lay.nspans % 16 == 0 && lay.row_len % 16 == 0 && lay.row_off % 16 == 0);
  cr_assert(lay.nspans >= 5 * 3 * 2 * 4 && lay.row_len >= lay.nspans + 20 &&
            lay.row_off >= lay.row_len + 20 && tot >= lay.row_off + 6 * 8);
}
