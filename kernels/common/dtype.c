/* dtype.c — public bf16/f16 <-> f32 conversions (round to nearest even).
 * The inline versions in nsa_internal.h are what the kernels use. */
#include "nsa_internal.h"

float nsa_bf16_to_f32(uint16_t x) { return nsa_bf16_to_f32_i(x); }
uint16_t nsa_f32_to_bf16(float x) { return nsa_f32_to_bf16_i(x); }
float nsa_f16_to_f32(uint16_t x) { return nsa_f16_to_f32_i(x); }
uint16_t nsa_f32_to_f16(float x) { return nsa_f32_to_f16_i(x); }
