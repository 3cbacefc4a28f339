// The cells, each described once: its sizes and the pointwise math of one
// sequence's step, forward and backward. layer.cpp runs every cell through
// the same sweeps (layer.h), so a new cell is one more trait here plus its
// name in layer.cpp's cell switch. A trait provides:
//
//   kGates        blocks of H rows stacked in weight_ih, weight_hh, the biases
//   kStates       state tensors: the length of the ops' hx list. The first, h,
//                 is the output of each step and is multiplied by W_hh; a
//                 second (the LSTM's c) is each unit's own and is updated in
//                 place
//   kProjects     whether h may be projected, h = W_hr m (P x H), after the
//                 row function has written m
//   kSaved        H-wide values each step saves for backward: the workspace
//                 is (T, B, kSaved * H); 0 or at least kGates, as the
//                 projection is written into its rows in training. A second
//                 state's new value is the last H of each row.
//   kFoldedGates  leading gates whose hidden-side bias adds straight to the
//                 pre-activation, and so joins the input projection; the
//                 others' reach forward() as `bias`. When all fold, the input-
//                 and hidden-side pre-activation gradients are the same.
//   forward<scalar_t>(const ForwardRow<scalar_t>&)
//   backward<scalar_t>(const BackwardRow<scalar_t>&)
//
// The row functions are static and inlined into the sweeps' loops; the float
// loops are not templates but FASTRNN_MULTIVERSION functions (math.h), so
// that they are compiled for each vector width.
#pragma once

#include "math.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastrnn::cpu {

// Units [0, n) of one sequence's update at one step. Each pointer sits at the
// step's first unit j0 in its row; gate k of unit j at k * H + j.
template <typename scalar_t>
struct ForwardRow {
  // The input projection (kGates * H), or null where it was written into
  // `saved` (training, kSaved > 0) or into `out` (a one-gate cell otherwise).
  const scalar_t* proj;
  const scalar_t* q;     // W_hh h, every gate
  const scalar_t* bias;  // hidden-side bias of gates kFoldedGates.., null if every gate folds
  const scalar_t* h;     // the state the step starts from
  scalar_t* saved;       // the step's workspace row in training, else null
  scalar_t* out;         // the output row; null when h is projected (the sweep writes it)
  scalar_t* next;        // the new state, or with a projection the m it projects
  int64_t n, H;
  scalar_t* c = nullptr;  // the second state, updated in place (kStates == 2)
};

// Units [0, n) of one sequence's gradients at one step, pointers as above.
template <typename scalar_t>
struct BackwardRow {
  const scalar_t* grad_out;  // upstream gradient of the output
  const scalar_t* dh;        // gradient reaching the new state from the later step
  const scalar_t* out;       // the output (the new state)
  const scalar_t* h_prev;    // the state the step started from
  const scalar_t* saved;     // the step's workspace row (null if kSaved is 0)
  scalar_t* grad_ih;         // input-side pre-activation gradients, every gate
  scalar_t* grad_hh;         // hidden-side ones: the same row as grad_ih if every gate folds
  scalar_t* carry;           // the part of the earlier step's dh that bypasses W_hh,
                             // or null where the sweep sets it
  int64_t n, H;
  const scalar_t* c_prev = nullptr;  // the second state the step started from
  scalar_t* dc = nullptr;            // its gradient: from the later step, in place to this one's
  scalar_t* m = nullptr;             // with a projection: m of the step, for grad W_hr
};

// ---- tanh / ReLU RNN: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh) ----

namespace rnn {

template <typename scalar_t, bool Relu>
inline scalar_t activation(scalar_t v) {
  if constexpr (Relu) {
    return v < scalar_t(0) ? scalar_t(0) : v;  // NaN passes through, as in torch.relu
  } else {
    return cpu::tanh(v);
  }
}

// The activation's derivative, written through its output h = act(v).
template <typename scalar_t, bool Relu>
inline scalar_t activation_grad(scalar_t h) {
  if constexpr (Relu) {
    // As torch's threshold_backward: the gradient passes unless h <= 0, so
    // it also passes where h is NaN.
    return h <= scalar_t(0) ? scalar_t(0) : scalar_t(1);
  } else {
    return scalar_t(1) - h * h;
  }
}

// out holds the input projection p and becomes out = next = act(p + q).
template <typename scalar_t, bool Relu>
FASTRNN_INLINE void forward_body(const scalar_t* __restrict q, scalar_t* __restrict out,
                                 scalar_t* __restrict next, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = activation<scalar_t, Relu>(out[j] + q[j]);
    out[j] = v;
    next[j] = v;
  }
}

inline FASTRNN_MULTIVERSION void forward_f32(const float* q, float* out, float* next, int64_t n,
                                             bool relu) {
  if (relu) {
    forward_body<float, true>(q, out, next, n);
  } else {
    forward_body<float, false>(q, out, next, n);
  }
}

}  // namespace rnn

template <bool Relu>
struct RnnCell {
  static constexpr int64_t kGates = 1;
  static constexpr int64_t kStates = 1;
  static constexpr bool kProjects = false;
  static constexpr int64_t kSaved = 0;  // backward needs only the outputs
  static constexpr int64_t kFoldedGates = 1;

  // The projection sits in r.out (one gate, nothing saved).
  template <typename scalar_t>
  FASTRNN_INLINE static void forward(const ForwardRow<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      rnn::forward_f32(r.q, r.out, r.next, r.n, Relu);
    } else {
      rnn::forward_body<scalar_t, Relu>(r.q, r.out, r.next, r.n);
    }
  }

  template <typename scalar_t>
  FASTRNN_INLINE static void backward(const BackwardRow<scalar_t>& r) {
    const scalar_t *go = r.grad_out, *dh = r.dh, *out = r.out;
    scalar_t *dp = r.grad_hh, *carry = r.carry;
    for (int64_t j = 0; j < r.n; ++j) {
      dp[j] = (go[j] + dh[j]) * rnn::activation_grad<scalar_t, Relu>(out[j]);
      carry[j] = scalar_t(0);  // all of dh_{t-1} comes through W_hh
    }
  }
};

// ---- GRU, gate rows stacked r | z | n ----
//   r = σ(W_ir x + b_ir + W_hr h + b_hr)
//   z = σ(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
//   h' = (1 − z) ⊙ n + z ⊙ h
// b_hr and b_hz fold into the projection; b_hn, inside the reset product,
// stays in the loop.

namespace gru {

// Reads the input-side pre-activations, q = W_hh h and the state h; writes
// the output and the new state. Inference (Save false) reads the
// pre-activations from p. Training (Save true) finds them in the workspace
// row's first 3H entries, where the projection was written, and overwrites
// them in place with the gates r | z | n, W_hn h + b_hn going to hn_saved
// (the row's last H): one pointer reads and writes the gates, so no two
// restrict pointers alias.
template <typename scalar_t, bool Save>
FASTRNN_INLINE void forward_body(const scalar_t* __restrict p, const scalar_t* __restrict q,
                                 const scalar_t* __restrict bias_hn,
                                 const scalar_t* __restrict h, scalar_t* __restrict gates,
                                 scalar_t* __restrict hn_saved, scalar_t* __restrict out,
                                 scalar_t* __restrict next, int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* pre = Save ? gates : p;  // based on one of them: no alias between the two
    const scalar_t r = sigmoid(pre[j] + q[j]);
    const scalar_t z = sigmoid(pre[H + j] + q[H + j]);
    const scalar_t hn = q[2 * H + j] + bias_hn[j];
    const scalar_t c = cpu::tanh(pre[2 * H + j] + r * hn);
    const scalar_t v = (h[j] - c) * z + c;
    if constexpr (Save) {
      gates[j] = r;
      gates[H + j] = z;
      gates[2 * H + j] = c;
      hn_saved[j] = hn;
    }
    out[j] = v;
    next[j] = v;
  }
}

// saved null: inference, the pre-activations come from p and no gates are
// kept; else saved is the step's workspace row.
template <typename scalar_t>
FASTRNN_INLINE void forward_dispatch(const scalar_t* p, const scalar_t* q, const scalar_t* bias_hn,
                                     const scalar_t* h, scalar_t* saved, scalar_t* out,
                                     scalar_t* next, int64_t n, int64_t H) {
  if (saved) {
    forward_body<scalar_t, true>(p, q, bias_hn, h, saved, saved + 3 * H, out, next, n, H);
  } else {
    forward_body<scalar_t, false>(p, q, bias_hn, h, nullptr, nullptr, out, next, n, H);
  }
}

inline FASTRNN_MULTIVERSION void forward_f32(const float* p, const float* q, const float* bias_hn,
                                             const float* h, float* saved, float* out,
                                             float* next, int64_t n, int64_t H) {
  forward_dispatch(p, q, bias_hn, h, saved, out, next, n, H);
}

// From the gradient g reaching the output (upstream plus from the next
// step), the input-side and hidden-side gate pre-activation gradients (they
// differ in the n rows, where the hidden side is scaled by r) and the
// direct part g z of dh.
template <typename scalar_t>
FASTRNN_INLINE void backward_body(const scalar_t* __restrict grad_out,
                                  const scalar_t* __restrict h_prev,
                                  const scalar_t* __restrict saved,
                                  const scalar_t* __restrict dh, scalar_t* __restrict grad_ih,
                                  scalar_t* __restrict grad_hh, scalar_t* __restrict carry,
                                  int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t r = saved[j], z = saved[H + j], c = saved[2 * H + j], hn = saved[3 * H + j];
    const scalar_t g = grad_out[j] + dh[j];
    const scalar_t dn = g * (scalar_t(1) - z) * (scalar_t(1) - c * c);
    const scalar_t dz = g * (h_prev[j] - c) * z * (scalar_t(1) - z);
    const scalar_t dr = dn * hn * r * (scalar_t(1) - r);
    grad_ih[j] = dr;
    grad_ih[H + j] = dz;
    grad_ih[2 * H + j] = dn;
    grad_hh[j] = dr;
    grad_hh[H + j] = dz;
    grad_hh[2 * H + j] = dn * r;
    carry[j] = g * z;
  }
}

inline FASTRNN_MULTIVERSION void backward_f32(const float* grad_out, const float* h_prev,
                                              const float* saved, const float* dh,
                                              float* grad_ih, float* grad_hh, float* carry,
                                              int64_t n, int64_t H) {
  backward_body(grad_out, h_prev, saved, dh, grad_ih, grad_hh, carry, n, H);
}

}  // namespace gru

struct GruCell {
  static constexpr int64_t kGates = 3;
  static constexpr int64_t kStates = 1;
  static constexpr bool kProjects = false;
  static constexpr int64_t kSaved = 4;  // r | z | n | W_hn h + b_hn
  static constexpr int64_t kFoldedGates = 2;

  template <typename scalar_t>
  FASTRNN_INLINE static void forward(const ForwardRow<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      gru::forward_f32(r.proj, r.q, r.bias, r.h, r.saved, r.out, r.next, r.n, r.H);
    } else {
      gru::forward_dispatch(r.proj, r.q, r.bias, r.h, r.saved, r.out, r.next, r.n, r.H);
    }
  }

  template <typename scalar_t>
  FASTRNN_INLINE static void backward(const BackwardRow<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      gru::backward_f32(r.grad_out, r.h_prev, r.saved, r.dh, r.grad_ih, r.grad_hh, r.carry, r.n,
                        r.H);
    } else {
      gru::backward_body(r.grad_out, r.h_prev, r.saved, r.dh, r.grad_ih, r.grad_hh, r.carry, r.n,
                         r.H);
    }
  }
};

// ---- LSTM, gate rows stacked i | f | g | o ----
//   i = σ(W_ii x + b_ii + W_hi h + b_hi), f, o likewise, g = tanh(...)
//   c' = f ⊙ c + i ⊙ g,  m = o ⊙ tanh(c'),  h' = m (or W_hr m with a projection)
// Every hidden-side bias folds into the projection.

namespace lstm {

// Training (Save) finds the pre-activations in the workspace row's first 4H
// entries and overwrites them with i | f | g | o, c' going to the row's
// last H; inference reads them from p. c is updated in place; m goes to
// next, and to out unless h is projected (Out false: the sweep writes it).
// The variants are template arguments, so that each loop is branch-free and
// vectorises.
template <typename scalar_t, bool Save, bool Out>
FASTRNN_INLINE void forward_body(const scalar_t* __restrict p, const scalar_t* __restrict q,
                                 scalar_t* __restrict gates, scalar_t* __restrict c,
                                 scalar_t* __restrict out, scalar_t* __restrict next, int64_t n,
                                 int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* pre = Save ? gates : p;
    const scalar_t i = sigmoid(pre[j] + q[j]);
    const scalar_t f = sigmoid(pre[H + j] + q[H + j]);
    const scalar_t g = cpu::tanh(pre[2 * H + j] + q[2 * H + j]);
    const scalar_t o = sigmoid(pre[3 * H + j] + q[3 * H + j]);
    const scalar_t c_new = f * c[j] + i * g;
    const scalar_t m = o * cpu::tanh(c_new);
    if constexpr (Save) {
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
      gates[4 * H + j] = c_new;
    }
    c[j] = c_new;
    next[j] = m;
    if constexpr (Out) {
      out[j] = m;
    }
  }
}

template <typename scalar_t>
FASTRNN_INLINE void forward_dispatch(const scalar_t* p, const scalar_t* q, scalar_t* saved,
                                     scalar_t* c, scalar_t* out, scalar_t* next, int64_t n,
                                     int64_t H) {
  if (saved && out) {
    forward_body<scalar_t, true, true>(p, q, saved, c, out, next, n, H);
  } else if (saved) {
    forward_body<scalar_t, true, false>(p, q, saved, c, nullptr, next, n, H);
  } else if (out) {
    forward_body<scalar_t, false, true>(p, q, nullptr, c, out, next, n, H);
  } else {
    forward_body<scalar_t, false, false>(p, q, nullptr, c, nullptr, next, n, H);
  }
}

inline FASTRNN_MULTIVERSION void forward_f32(const float* p, const float* q, float* saved,
                                             float* c, float* out, float* next, int64_t n,
                                             int64_t H) {
  forward_dispatch(p, q, saved, c, out, next, n, H);
}

// From the gradient reaching m and dc from the later step: the gate
// pre-activation gradients and dc of the earlier step (in place). Without a
// projection the gradient reaching m is grad_out + dh; with one (Projected)
// dh alone, already taken through W_hr, and m is written for grad W_hr.
template <typename scalar_t, bool Projected>
FASTRNN_INLINE void backward_body(const scalar_t* __restrict grad_out,
                                  const scalar_t* __restrict saved,
                                  const scalar_t* __restrict c_prev,
                                  const scalar_t* __restrict dh, scalar_t* __restrict dc,
                                  scalar_t* __restrict grad, scalar_t* __restrict m_out,
                                  int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t i = saved[j], f = saved[H + j], g = saved[2 * H + j], o = saved[3 * H + j];
    const scalar_t tc = cpu::tanh(saved[4 * H + j]);
    scalar_t dm = dh[j];
    if constexpr (!Projected) {
      dm += grad_out[j];
    }
    const scalar_t dct = dc[j] + dm * o * (scalar_t(1) - tc * tc);
    grad[j] = dct * g * i * (scalar_t(1) - i);
    grad[H + j] = dct * c_prev[j] * f * (scalar_t(1) - f);
    grad[2 * H + j] = dct * i * (scalar_t(1) - g * g);
    grad[3 * H + j] = dm * tc * o * (scalar_t(1) - o);
    dc[j] = dct * f;
    if constexpr (Projected) {
      m_out[j] = o * tc;
    }
  }
}

template <typename scalar_t>
FASTRNN_INLINE void backward_dispatch(const scalar_t* grad_out, const scalar_t* saved,
                                      const scalar_t* c_prev, const scalar_t* dh, scalar_t* dc,
                                      scalar_t* grad, scalar_t* m_out, int64_t n, int64_t H) {
  if (m_out) {
    backward_body<scalar_t, true>(nullptr, saved, c_prev, dh, dc, grad, m_out, n, H);
  } else {
    backward_body<scalar_t, false>(grad_out, saved, c_prev, dh, dc, grad, nullptr, n, H);
  }
}

inline FASTRNN_MULTIVERSION void backward_f32(const float* grad_out, const float* saved,
                                              const float* c_prev, const float* dh, float* dc,
                                              float* grad, float* m_out, int64_t n, int64_t H) {
  backward_dispatch(grad_out, saved, c_prev, dh, dc, grad, m_out, n, H);
}

}  // namespace lstm

struct LstmCell {
  static constexpr int64_t kGates = 4;
  static constexpr int64_t kStates = 2;
  static constexpr bool kProjects = true;
  static constexpr int64_t kSaved = 5;  // i | f | g | o | c
  static constexpr int64_t kFoldedGates = 4;

  template <typename scalar_t>
  FASTRNN_INLINE static void forward(const ForwardRow<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      lstm::forward_f32(r.proj, r.q, r.saved, r.c, r.out, r.next, r.n, r.H);
    } else {
      lstm::forward_dispatch(r.proj, r.q, r.saved, r.c, r.out, r.next, r.n, r.H);
    }
  }

  template <typename scalar_t>
  FASTRNN_INLINE static void backward(const BackwardRow<scalar_t>& r) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      lstm::backward_f32(r.grad_out, r.saved, r.c_prev, r.dh, r.dc, r.grad_hh, r.m, r.n, r.H);
    } else {
      lstm::backward_dispatch(r.grad_out, r.saved, r.c_prev, r.dh, r.dc, r.grad_hh, r.m, r.n,
                              r.H);
    }
    if (r.carry) {
      std::fill(r.carry, r.carry + r.n, scalar_t(0));  // all of dh_{t-1} comes through W_hh
    }
  }
};

}  // namespace fastrnn::cpu
