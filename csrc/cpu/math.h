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

// Both e^x and tanh reduce their argument as y = n ln2 + r, |r| <= ln2/2,
// and take e^r - 1 = r + r^2 P(r) there: P of degree 4, fitted to the
// relative error of e^r (below 3.1e-9: a fortieth of a float ulp).
FASTRNN_INLINE float expm1_reduced(float r) {
  float p = 1.3814611040262133e-3f;
  p = p * r + 8.368710080017388e-3f;
  p = p * r + 4.166838741116735e-2f;
  p = p * r + 1.6666520687194994e-1f;
  p = p * r + 4.999999345145227e-1f;
  return (r * r) * p + r;
}

// y = n ln2 + r for |y| <= 88: returns r, with t holding n in its low bits.
// y/ln2 is rounded to the nearest integer by adding 1.5 * 2^23, so that 2^n
// is built from t's bits (two_to) without a float-to-int conversion
// (undefined for NaN).
FASTRNN_INLINE float reduce(float y, float& t) {
  const float shifter = 12582912.0f;
  t = y * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  return (y - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
}

FASTRNN_INLINE float two_to(float t) {
  uint32_t bits;  // unsigned: a NaN's bits wrap rather than overflow
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

// e^x = 2^n (1 + (e^r - 1)). Saturates outside [-87, 88]; NaN propagates.
FASTRNN_INLINE float exp(float x) {
  // std::max / std::min keep a NaN x (they return their first argument
  // unless the comparison holds), and compile to vmaxps / vminps.
  float t;
  const float r = reduce(std::min(std::max(x, -87.0f), 88.0f), t);
  const float scale = two_to(t);
  const float e = expm1_reduced(r) * scale + scale;
  // Outside the clamp, saturate as std::exp does (to 0 and to inf), so that
  // sigmoid(-inf) is 0 and sigmoid(inf) is 1 exactly.
  return x < -87.0f ? 0.0f : (x > 88.0f ? __builtin_inff() : e);
}

// tanh |x| = (e^2|x| - 1) / (e^2|x| + 1), with e^2|x| - 1 = 2^n (e^r - 1) +
// (2^n - 1): one fused multiply-add, which does not cancel near 0 as
// 1 - 2/(e^2|x| + 1) would, so one path serves every x. tanh rounds to 1
// from about 9.01; the clamp at 9.5 leaves a margin.
FASTRNN_INLINE float tanh(float x) {
  float t;
  const float r = reduce(2.0f * std::min(std::fabs(x), 9.5f), t);
  const float scale = two_to(t);
  const float e = expm1_reduced(r) * scale + (scale - 1.0f);
  return std::copysign(e / (e + 2.0f), x);
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
