// Elementwise functions for the pointwise step updates.
//
// float: written without libm calls so that the compiler vectorises the
// loops that use them (libm's scalar tanhf/expf dominated the step time).
// Accuracy is within a few float ulps of std::tanh / std::exp (checked by
// tests/test_math.py through the engine). double: libm, exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// The float row kernels are also compiled for x86-64-v3 (AVX2 + FMA) and
// x86-64-v4 (AVX-512), and the best version the CPU runs is picked when
// the library loads (GCC before 11 knows no such levels: AVX2 there).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FASTRNN_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTRNN_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define FASTRNN_MULTIVERSION
#endif
#define FASTRNN_INLINE inline __attribute__((always_inline))

namespace fastrnn::cpu {

// e^x as 2^n * e^r with r = x - n ln2, |r| <= ln2/2, and e^r from its Taylor
// series to r^7 (truncation below 1e-8 relative). Saturates outside
// [-87, 88]; NaN propagates.
FASTRNN_INLINE float exp(float x) {
  // std::max / std::min keep a NaN x (they return their first argument
  // unless the comparison holds), and compile to vmaxps / vminps.
  const float xs = std::min(std::max(x, -87.0f), 88.0f);
  // x/ln2 rounded to the nearest integer n by adding 1.5 * 2^23: n lands in
  // the low bits of t, so 2^n is built from t's bits without a float-to-int
  // conversion (undefined for NaN).
  const float shifter = 12582912.0f;
  const float t = xs * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xs - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;  // unsigned: a NaN's bits wrap rather than overflow
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // Outside the clamp, saturate as std::exp does (to 0 and to inf), so that
  // sigmoid(-inf) is 0 and sigmoid(inf) is 1 exactly.
  const float e = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? __builtin_inff() : e);
}

// tanh: its odd Taylor series for |x| < 0.5 (where 1 - 2/(e^2|x| + 1) would
// cancel), that formula above.
FASTRNN_INLINE float tanh(float x) {
  const float x2 = x * x;
  float s = -929569.0f / 638512875.0f;
  s = s * x2 + 21844.0f / 6081075.0f;
  s = s * x2 - 1382.0f / 155925.0f;
  s = s * x2 + 62.0f / 2835.0f;
  s = s * x2 - 17.0f / 315.0f;
  s = s * x2 + 2.0f / 15.0f;
  s = s * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * s;
  const float a = std::fabs(x);
  const float large = std::copysign(1.0f - 2.0f / (exp(2.0f * a) + 1.0f), x);
  return a < 0.5f ? small : large;
}

FASTRNN_INLINE float sigmoid(float x) {
  return 1.0f / (1.0f + exp(-x));
}

FASTRNN_INLINE double exp(double x) {
  return std::exp(x);
}

FASTRNN_INLINE double tanh(double x) {
  return std::tanh(x);
}

FASTRNN_INLINE double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

}  // namespace fastrnn::cpu
