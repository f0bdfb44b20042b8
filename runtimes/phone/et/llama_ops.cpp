// The three `llama::` kernels a `.pte` of this project calls besides the wheel's own kernels:
// custom_sdpa.out, update_cache.out, gated_delta_rule.out. ExecuTorch ships them only in a
// torch-bound library (libcustom_ops_aot_lib.so), so the phone runner carries this project's own
// fp32 implementation, written from the ops' schemas and semantics (layout [B, S, H, D]; grouped
// K/V heads; a causal mask from start_pos; the delta rule's exact per-token recurrence).
//
// They are hand-written boxed kernels (`void fn(ctx, Span<EValue*> stack)`): gated_delta_rule has
// two out tensors, which the unboxing macro cannot express, and one style for all three keeps the
// argument checks in one place. Registration happens in mcv_register_llama_ops(), called once by
// the runner, never at static-init time: a duplicate name aborts the process, so the caller decides.
//
// Every argument is checked (stack size, tags, dtypes, ranks, shapes, contiguity); a bad call logs
// one ET_LOG(Error, ...) line naming the op and fails the kernel with InvalidArgument.

#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Kernel;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// Log one line naming the op and fail the kernel (the runtime then stops the method with this error).
#define MCV_FAIL(ctx, op, fmt, ...)                                 \
  do {                                                              \
    ET_LOG(Error, "%s: " fmt, op, ##__VA_ARGS__);                   \
    (ctx).fail(Error::InvalidArgument);                             \
    return;                                                         \
  } while (0)

// Row-major contiguous (the default dim order): every loop below indexes with plain offsets.
bool contiguous(const Tensor& t) {
  int64_t expect = 1;
  for (int d = (int)t.dim() - 1; d >= 0; --d) {
    if (t.size(d) != 1 && t.strides()[d] != expect) return false;
    expect *= t.size(d);
  }
  return true;
}

// A float32, contiguous tensor of the given rank; on a mismatch, the reason in `why`.
bool f32_tensor(const EValue* v, int rank, const char*& why) {
  if (v == nullptr || !v->isTensor()) { why = "not a tensor"; return false; }
  const Tensor& t = v->toTensor();
  if (t.scalar_type() != ScalarType::Float) { why = "not float32"; return false; }
  if (rank >= 0 && t.dim() != rank) { why = "wrong rank"; return false; }
  if (!contiguous(t)) { why = "not contiguous"; return false; }
  return true;
}

// Inner loops in blocks of 8 independent lanes: at -O2 GCC's vectoriser only takes loops whose
// trip count needs no scalar epilogue, and a float sum is not reassociated without -ffast-math.
// The fixed 8-wide blocks are vectorised (SLP) and the remainder runs scalar.
inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += a[i + l] * b[i + l];
  float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// y += a * x (y and x never overlap)
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) y[i + l] += a * x[i + l];
  for (; i < n; ++i) y[i] += a * x[i];
}

// y *= a
inline void scale_by(float* y, float a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) y[i + l] *= a;
  for (; i < n; ++i) y[i] *= a;
}

// Grain for parallel_for: about 32k multiply-adds per chunk, so tiny calls stay on one thread.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------------------------------------
// llama::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out)
// stack: [0]value [B,S,H,D] [1]cache [B,Cmax,H,D] [2]Int start_pos [3]out [4]return (=out)
// Writes value into cache[:, start_pos:start_pos+S] in place: the cache is the program's mutable
// buffer. `out` is a placeholder nobody reads, so it is left as planned.
void update_cache_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::update_cache.out";
  const char* why = "";
  if (stack.size() != 5) MCV_FAIL(ctx, op, "expected 5 stack values, got %zu", (size_t)stack.size());
  if (!f32_tensor(stack[0], 4, why)) MCV_FAIL(ctx, op, "value: %s (want float32 [B,S,H,D])", why);
  if (!f32_tensor(stack[1], 4, why)) MCV_FAIL(ctx, op, "cache: %s (want float32 [B,Cmax,H,D])", why);
  if (!stack[2]->isInt()) MCV_FAIL(ctx, op, "start_pos is not an int");
  if (!stack[3]->isTensor()) MCV_FAIL(ctx, op, "out is not a tensor");
  const Tensor& value = stack[0]->toTensor();
  Tensor& cache = stack[1]->toTensor();
  const int64_t start = stack[2]->toInt();
  const int64_t B = value.size(0), S = value.size(1), cmax = cache.size(1);
  if (cache.size(0) != B || cache.size(2) != value.size(2) || cache.size(3) != value.size(3))
    MCV_FAIL(ctx, op, "value [%d,%d,%d,%d] does not fit cache [%d,%d,%d,%d]", (int)value.size(0),
             (int)value.size(1), (int)value.size(2), (int)value.size(3), (int)cache.size(0),
             (int)cache.size(1), (int)cache.size(2), (int)cache.size(3));
  if (start < 0 || start + S > cmax)
    MCV_FAIL(ctx, op, "positions %lld..%lld outside the cache's %lld", (long long)start,
             (long long)(start + S), (long long)cmax);
  const int64_t row = value.size(2) * value.size(3);  // one position: H*D floats
  const float* src = value.const_data_ptr<float>();
  float* dst = cache.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dst + (b * cmax + start) * row, src + b * S * row, sizeof(float) * S * row);
}

// ---------------------------------------------------------------------------------------------
// llama::custom_sdpa.out(q, k, v, SymInt start_pos, Tensor? attn_mask, float dropout_p,
//                        bool is_causal, float? scale, *, Tensor(a!) out)
// stack: [0]q [B,Sq,Hq,D] [1]k [B,Skv,Hkv,D] [2]v [B,Skv,Hkv,Dv] [3]Int start_pos [4]mask (None)
//        [5]Double dropout (ignored: inference) [6]Bool is_causal [7]Double|None scale [8]out [9]return
// Sequence at dim 1. Only the first start_pos+Sq keys are read (k/v may be the whole cache).
// Causal: query row i sits at absolute position start_pos+i and sees keys j <= start_pos+i.
// GQA: query head h reads kv head h / (Hq/Hkv) (consecutive groups, as repeat_interleave).
// Per work chunk: one score row (plus, for row blocks, a transposed copy of the keys read);
// never an Sq x Skv matrix (vision calls plan 16k tokens).
void custom_sdpa_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::custom_sdpa.out";
  const char* why = "";
  if (stack.size() != 10) MCV_FAIL(ctx, op, "expected 10 stack values, got %zu", (size_t)stack.size());
  if (!f32_tensor(stack[0], 4, why)) MCV_FAIL(ctx, op, "query: %s (want float32 [B,S,H,D])", why);
  if (!f32_tensor(stack[1], 4, why)) MCV_FAIL(ctx, op, "key: %s (want float32 [B,S,H,D])", why);
  if (!f32_tensor(stack[2], 4, why)) MCV_FAIL(ctx, op, "value: %s (want float32 [B,S,H,D])", why);
  if (!stack[3]->isInt()) MCV_FAIL(ctx, op, "start_pos is not an int");
  if (!stack[4]->isNone()) MCV_FAIL(ctx, op, "attn_mask is not supported (this project passes None)");
  if (!stack[5]->isDouble()) MCV_FAIL(ctx, op, "dropout_p is not a float");
  if (!stack[6]->isBool()) MCV_FAIL(ctx, op, "is_causal is not a bool");
  if (!stack[7]->isNone() && !stack[7]->isDouble()) MCV_FAIL(ctx, op, "scale is neither None nor a float");
  if (!f32_tensor(stack[8], 4, why)) MCV_FAIL(ctx, op, "out: %s", why);
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  Tensor& out = stack[8]->toTensor();
  const int64_t start = stack[3]->toInt();
  const bool causal = stack[6]->toBool();
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Skv = k.size(1), Hkv = k.size(2), Dv = v.size(3);
  if (k.size(0) != B || v.size(0) != B || k.size(3) != D || v.size(1) != Skv || v.size(2) != Hkv)
    MCV_FAIL(ctx, op, "query/key/value shapes disagree");
  if (Hkv <= 0 || Hq % Hkv != 0) MCV_FAIL(ctx, op, "%lld query heads not a multiple of %lld kv heads",
                                          (long long)Hq, (long long)Hkv);
  const int64_t n_keys = start + Sq;
  if (start < 0 || n_keys > Skv)
    MCV_FAIL(ctx, op, "start_pos %lld + %lld queries exceed the %lld keys", (long long)start,
             (long long)Sq, (long long)Skv);
  const double scale_d = stack[7]->isDouble() ? stack[7]->toDouble() : 1.0 / std::sqrt((double)D);
  const float scale = (float)scale_d;
  SizesType osz[4] = {(SizesType)B, (SizesType)Sq, (SizesType)Hq, (SizesType)Dv};
  if (executorch::runtime::resize_tensor(out, {osz, 4}) != Error::Ok)
    MCV_FAIL(ctx, op, "cannot resize out to [%lld,%lld,%lld,%lld]", (long long)B, (long long)Sq,
             (long long)Hq, (long long)Dv);
  if (Sq == 0) return;

  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op_ = out.mutable_data_ptr<float>();
  const int64_t group = Hq / Hkv;
  const int64_t q_row = Hq * D, kv_row = Hkv * D, v_row = Hkv * Dv, o_row = Hq * Dv;
  // A work item is a block of up to kRows query rows of one (b, h). A block of several rows first
  // copies the keys it reads transposed (D x n, contiguous per channel), so each row's scores are D
  // contiguous axpys; a row alone (decoding) reads the keys in place. Then, per row: an fp32
  // softmax with the row max subtracted, and the weighted sum of the values.
  constexpr int64_t kRows = 32;
  const int64_t n_blocks = (Sq + kRows - 1) / kRows;
  const int64_t items = B * Hq * n_blocks;
  auto blocks = [&](int64_t begin, int64_t end) {
    std::vector<float> score((size_t)n_keys), acc((size_t)Dv), kt;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t h = it % Hq, blk = (it / Hq) % n_blocks, b = it / (Hq * n_blocks);
      const int64_t i0 = blk * kRows, i1 = std::min(Sq, i0 + kRows);
      const int64_t n_max = causal ? start + i1 : n_keys;  // keys the block's last row sees
      const float* kb = kp + b * Skv * kv_row + (h / group) * D;
      const float* vb = vp + b * Skv * v_row + (h / group) * Dv;
      const bool packed = i1 - i0 >= 4;
      if (packed) {
        kt.resize((size_t)(D * n_max));
        for (int64_t j = 0; j < n_max; ++j)
          for (int64_t d = 0; d < D; ++d) kt[d * n_max + j] = kb[j * kv_row + d];
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = causal ? start + i + 1 : n_keys;  // keys this row sees
        const float* qr = qp + (b * Sq + i) * q_row + h * D;
        if (packed) {
          std::fill(score.begin(), score.begin() + n, 0.f);
          for (int64_t d = 0; d < D; ++d) axpy(score.data(), qr[d] * scale, kt.data() + d * n_max, n);
        } else {
          for (int64_t j = 0; j < n; ++j) score[j] = dot(qr, kb + j * kv_row, D) * scale;
        }
        const float mx = *std::max_element(score.begin(), score.begin() + n);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          score[j] = std::exp(score[j] - mx);
          sum += score[j];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy(acc.data(), score[j], vb + j * v_row, Dv);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        float* orow = op_ + (b * Sq + i) * o_row + h * Dv;
        for (int64_t d = 0; d < Dv; ++d) orow[d] = acc[d] * inv;
      }
    }
  };
  if (!executorch::extension::parallel_for(0, items, grain_for(kRows * n_keys * (D + Dv)), blocks))
    MCV_FAIL(ctx, op, "parallel_for failed");
}

// ---------------------------------------------------------------------------------------------
// llama::gated_delta_rule.out(q, k, v, decay, beta, initial_state, *, out, final_state_out)
// stack: [0]q [B,Hq,T,K] [1]k [B,H,T,K] [2]v [B,H,T,V] [3]decay [B,H,T] or [B,H,T,K] (channelwise)
//        [4]beta [B,H,T] [5]initial_state [B,H,K,V] [6]out [B,Hq,T,V] [7]final_state_out [B,H,K,V]
//        [8]the (out, final_state_out) return list, ignored.
// Heads first. No scaling or L2 norm here: the caller normalises q and k and scales q. Per (b, h),
// with S = initial_state (a copy, kept in final_state_out) and for each step t:
//   S = diag(decay_t) S;  delta = beta_t (v_t - S^T k_t);  S += k_t (x) delta;  o_t = S^T q_t.
// Query head hq reads the state of head hq / (Hq/H) (the project passes Hq == H). Always this exact
// recurrence (upstream uses a chunked form for prefill: same math, different fp32 rounding).
void gated_delta_rule_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const char* op = "llama::gated_delta_rule.out";
  const char* why = "";
  if (stack.size() != 9) MCV_FAIL(ctx, op, "expected 9 stack values, got %zu", (size_t)stack.size());
  if (!f32_tensor(stack[0], 4, why)) MCV_FAIL(ctx, op, "query: %s (want float32 [B,H,T,K])", why);
  if (!f32_tensor(stack[1], 4, why)) MCV_FAIL(ctx, op, "key: %s (want float32 [B,H,T,K])", why);
  if (!f32_tensor(stack[2], 4, why)) MCV_FAIL(ctx, op, "value: %s (want float32 [B,H,T,V])", why);
  if (!f32_tensor(stack[3], -1, why)) MCV_FAIL(ctx, op, "decay: %s", why);
  if (!f32_tensor(stack[4], 3, why)) MCV_FAIL(ctx, op, "beta: %s (want float32 [B,H,T])", why);
  if (!f32_tensor(stack[5], 4, why)) MCV_FAIL(ctx, op, "initial_state: %s (want float32 [B,H,K,V])", why);
  if (!f32_tensor(stack[6], 4, why)) MCV_FAIL(ctx, op, "out: %s", why);
  if (!f32_tensor(stack[7], 4, why)) MCV_FAIL(ctx, op, "final_state_out: %s", why);
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const Tensor& decay = stack[3]->toTensor();
  const Tensor& beta = stack[4]->toTensor();
  const Tensor& s0 = stack[5]->toTensor();
  Tensor& out = stack[6]->toTensor();
  Tensor& sf = stack[7]->toTensor();
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), K = k.size(3), V = v.size(3);
  const int64_t Hq = q.size(1);
  if (q.size(0) != B || q.size(2) != T || q.size(3) != K) MCV_FAIL(ctx, op, "query and key shapes disagree");
  if (H <= 0 || Hq % H != 0) MCV_FAIL(ctx, op, "%lld query heads not a multiple of %lld key heads",
                                      (long long)Hq, (long long)H);
  if (v.size(0) != B || v.size(1) != H || v.size(2) != T) MCV_FAIL(ctx, op, "value and key shapes disagree");
  if (beta.size(0) != B || beta.size(1) != H || beta.size(2) != T) MCV_FAIL(ctx, op, "beta is not [B,H,T]");
  const bool channelwise = decay.dim() == 4;
  if (decay.dim() != 3 && !channelwise) MCV_FAIL(ctx, op, "decay is neither [B,H,T] nor [B,H,T,K]");
  if (decay.size(0) != B || decay.size(1) != H || decay.size(2) != T || (channelwise && decay.size(3) != K))
    MCV_FAIL(ctx, op, "decay shape does not match key");
  if (s0.size(0) != B || s0.size(1) != H || s0.size(2) != K || s0.size(3) != V)
    MCV_FAIL(ctx, op, "initial_state is not [B,H,K,V] = [%lld,%lld,%lld,%lld]", (long long)B,
             (long long)H, (long long)K, (long long)V);
  SizesType osz[4] = {(SizesType)B, (SizesType)Hq, (SizesType)T, (SizesType)V};
  if (executorch::runtime::resize_tensor(out, {osz, 4}) != Error::Ok)
    MCV_FAIL(ctx, op, "cannot resize out to [B,Hq,T,V]");
  if (executorch::runtime::resize_tensor(sf, s0.sizes()) != Error::Ok)
    MCV_FAIL(ctx, op, "cannot resize final_state_out to initial_state's shape");

  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const float* gp = decay.const_data_ptr<float>();
  const float* bp = beta.const_data_ptr<float>();
  const float* s0p = s0.const_data_ptr<float>();
  float* op_ = out.mutable_data_ptr<float>();
  float* sp = sf.mutable_data_ptr<float>();
  const int64_t group = Hq / H, KV = K * V;
  // one work item per (b, h): its state lives in final_state_out, updated in place
  auto heads = [&](int64_t begin, int64_t end) {
    std::vector<float> delta((size_t)V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = sp + bh * KV;
      if (S != s0p + bh * KV) std::memcpy(S, s0p + bh * KV, sizeof(float) * KV);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t bht = bh * T + t;
        const float* kt = kp + bht * K;
        const float* vt = vp + bht * V;
        const float bt = bp[bht];
        // decay the state, and accumulate S^T k_t into delta from the decayed rows
        std::fill(delta.begin(), delta.end(), 0.f);
        for (int64_t r = 0; r < K; ++r) {
          float* Sr = S + r * V;
          scale_by(Sr, channelwise ? gp[bht * K + r] : gp[bht], V);
          axpy(delta.data(), kt[r], Sr, V);
        }
        for (int64_t c = 0; c < V; ++c) delta[c] = bt * (vt[c] - delta[c]);
        for (int64_t r = 0; r < K; ++r) axpy(S + r * V, kt[r], delta.data(), V);
        // read out with the updated state for every query head of this group
        for (int64_t j = 0; j < group; ++j) {
          const int64_t hq = h * group + j;
          const float* qt = qp + ((b * Hq + hq) * T + t) * K;
          float* o = op_ + ((b * Hq + hq) * T + t) * V;
          std::fill(o, o + V, 0.f);
          for (int64_t r = 0; r < K; ++r) axpy(o, qt[r], S + r * V, V);
        }
      }
    }
  };
  if (!executorch::extension::parallel_for(0, B * H, grain_for(T * KV * (3 + group)), heads))
    MCV_FAIL(ctx, op, "parallel_for failed");
}

}  // namespace

// Registers the three kernels with the runtime's global registry, once per process. Returns 0 on
// success (also on later calls), otherwise the ExecuTorch error code of the registration.
extern "C" int mcv_register_llama_ops() {
  static std::once_flag once;
  static int result = 0;
  std::call_once(once, [] {
    static const Kernel kernels[] = {
        Kernel("llama::custom_sdpa.out", custom_sdpa_boxed),
        Kernel("llama::update_cache.out", update_cache_boxed),
        Kernel("llama::gated_delta_rule.out", gated_delta_rule_boxed),
    };
    result = (int)executorch::runtime::register_kernels({kernels, 3});
  });
  return result;
}
