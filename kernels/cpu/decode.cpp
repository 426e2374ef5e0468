// Fused decode step of the Talk2Face LM on CPUs.
//
// Decoding one token is memory-bound: the step's floor is the bytes of weights read divided by
// memory bandwidth. A step is two calls: facert_decode_step runs the layers (embeddings, every
// layer, final LayerNorm) for a batch of rows, each with its own cache slot and position, and
// facert_head the vocabulary-window head for rows sharing a window (one call per window when a
// batch mixes tasks). Each reads every weight matrix it uses exactly once, split by output rows
// across a small persistent thread pool. Weights are float32, or int8 per output row
// (symmetric) with the activations quantized per row on the fly; on CPUs with AVX512-VNNI the
// int8 dot products use vpdpbusd. A row's results never depend on the other rows of the call.
// The math is that of facert.export.lm (TencentPretrain's LayerNorm, gelu_fast, scores divided
// by sqrt(head_dim)); the KV cache is the runtime's (layers, slots, heads, capacity, head_dim)
// float32 array, written in place at each row's position.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <pthread.h>

#if defined(__x86_64__) && !defined(FACERT_PORTABLE)  // FACERT_PORTABLE: build as on other CPUs
#include <immintrin.h>
#define FACERT_X86 1
#define FACERT_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FACERT_CLONES
#endif

#define FACERT_API extern "C" __attribute__((visibility("default")))

extern "C" {
// y = W x + b with W (out, in) row-major: float32, or int8 when `scale` is set.
struct facert_linear {
  const void* weight;
  const float* scale;      // (out,) int8 row scales, or null for float32
  const int32_t* row_sum;  // (out,) sum of each int8 row (unsigned-activation correction)
  const float* bias;       // (out,) or null
  int32_t out, in;
};

struct facert_layer {
  const float* ln1_weight;
  const float* ln1_bias;
  facert_linear qkv;  // (3C, C): q, k, v stacked
  facert_linear proj;
  const float* ln2_weight;
  const float* ln2_bias;
  facert_linear fc;
  facert_linear fc_proj;
};

struct facert_lm {
  int32_t n_layer, n_head, n_embd, n_ffn, decode_segment;
  float eps;
  const float* wte;  // (V, C)
  const float* wpe;  // (P, C)
  const float* wse;  // (3, C)
  const facert_layer* layers;
  const float* lnf_weight;
  const float* lnf_bias;
  facert_linear head;  // (V, C), no bias
};
}

namespace {

// ---- thread pool: the caller plus persistent workers, woken once per parallel region ----
//
// A region is `count` items handed out in blocks of `grain` from a shared counter, and the
// caller works through them too. It never waits for a worker that has not started: on a busy
// machine (another process, another library's spinning threads) a descheduled worker would
// otherwise stall every region for a scheduler time slice. A late worker registers in `active_`
// and then checks `closed_`; the caller closes the region and then waits for `active_` to drain
// (both sequentially consistent), so a worker either joins before the close and is waited for,
// or sees the close and leaves.

class Pool {
 public:
  void resize(int threads) {
    if (threads == int(workers_.size()) + 1) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    const uint64_t now = generation_.load();
    for (int i = 1; i < threads; i++) workers_.emplace_back([this, now] { loop(now); });
  }

  int size() const { return int(workers_.size()) + 1; }

  // fn(begin, end) over blocks of [0, count); returns when every item is done.
  void run(int count, int grain, const std::function<void(int, int)>& fn) {
    if (workers_.empty() || count <= grain) return fn(0, count);
    task_ = &fn;
    count_ = count;
    grain_ = grain;
    next_.store(0);
    closed_.store(false);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    closed_.store(true);
    for (int spin = 0; active_.load() > 0; spin++) relax(spin);
  }

 private:
  void work() {
    for (int begin; (begin = next_.fetch_add(grain_, std::memory_order_relaxed)) < count_;)
      (*task_)(begin, std::min(count_, begin + grain_));
  }

  static void relax(int spin) {
    if (spin > kSpins) return std::this_thread::yield();
#if FACERT_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Spin a while for the next region (a decode step has ~6 per layer, microseconds apart),
  // then sleep so an idle runtime costs no CPU.
  void loop(uint64_t seen) {
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load() == seen; spin++) relax(spin);
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
      }
      active_.fetch_add(1);
      if (!closed_.load()) work();
      active_.fetch_sub(1);
    }
  }

  static constexpr int kSpins = 1 << 16;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  const std::function<void(int, int)>* task_ = nullptr;
  int count_ = 0, grain_ = 1;
  std::atomic<int> next_{0}, active_{0};
  std::atomic<bool> closed_{true};
};

// The process's pool and the lock that runs one step at a time (the pool is shared by every
// model). Never destroyed: its threads end with the process. A child of fork() has none of its
// parent's threads, so it forgets the parent's pool (leaked, not joined) and starts a new one.
Pool* current_pool = nullptr;
std::mutex step_lock;

void forget_pool_in_child() {
  current_pool = nullptr;
  new (&step_lock) std::mutex();  // it may have been held by a parent thread mid-step
}

Pool& pool() {
  if (current_pool == nullptr) {
    static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
    (void)registered;
    current_pool = new Pool();
  }
  return *current_pool;
}

// ---- matrix-vector products over a slice of output rows ----

constexpr int kLanes = 16;

// Sum of the lanes by halves: shuffles and adds, not a chain of 16 scalar additions.
template <typename T>
inline __attribute__((always_inline)) T sum_lanes(T* acc) {
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int j = 0; j < half; j++) acc[j] += acc[j + half];
  return acc[0];
}

// Inlined into its callers, which carry the target clones.
inline __attribute__((always_inline)) float dot_f32(const float* w, const float* x, int K) {
  float acc[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] += w[k + j] * x[k + j];
  float s = 0.0f;
  for (; k < K; k++) s += w[k] * x[k];
  return s + sum_lanes(acc);
}

// Four rows against one vector: each weight byte is loaded once.
FACERT_CLONES
void dot4_f32(const float* w, const float* x, int K, float* out) {
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  const float *r0 = w, *r1 = w + K, *r2 = w + 2 * K, *r3 = w + 3 * K;
  int k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; j++) {
      float xv = x[k + j];
      a0[j] += r0[k + j] * xv;
      a1[j] += r1[k + j] * xv;
      a2[j] += r2[k + j] * xv;
      a3[j] += r3[k + j] * xv;
    }
  float s[4] = {};
  for (; k < K; k++) {
    s[0] += r0[k] * x[k];
    s[1] += r1[k] * x[k];
    s[2] += r2[k] * x[k];
    s[3] += r3[k] * x[k];
  }
  out[0] = s[0] + sum_lanes(a0);
  out[1] = s[1] + sum_lanes(a1);
  out[2] = s[2] + sum_lanes(a2);
  out[3] = s[3] + sum_lanes(a3);
}

// int8: sum_k xu[k] * w[k] with xu = xq + 128 unsigned (the caller subtracts 128 * row_sum).
FACERT_CLONES
int32_t dot_u8s8_portable(const int8_t* w, const uint8_t* xu, int K) {
  int32_t acc[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] += int32_t(xu[k + j]) * int32_t(w[k + j]);
  int32_t s = 0;
  for (; k < K; k++) s += int32_t(xu[k]) * int32_t(w[k]);
  return s + sum_lanes(acc);
}

#if FACERT_X86
// GCC 12 warns about an intentionally undefined register inside its own reduce intrinsic.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// Four int8 rows against NB = 1..4 input vectors (stride K), each weight loaded once for all of
// them. With `prefetch`, the next four rows are prefetched into L2 as fast as these are read
// (into L2, not L1: about 10 % faster steps in int8 and 15-25 % in float32 on an AVX-512 EPYC:
// a float32 tile of the 3072-wide fc_proj, 48 KB, would push the rows being read out of L1).
// Integer sums: exact, so every path (these tiles, the portable loop) gives the same int32.
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile4_u8s8_vnni(const int8_t* w, const uint8_t* xu, int K, bool prefetch, int32_t* out) {
  __m512i acc[4 * NB];
  for (auto& a : acc) a = _mm512_setzero_si512();
  for (int k = 0; k < K; k += 64) {
    for (int line = 0; prefetch && line < 4; line++)
      _mm_prefetch(reinterpret_cast<const char*>(w + 4 * K + 4 * k + 64 * line), _MM_HINT_T1);
    __m512i x[NB];
    for (int b = 0; b < NB; b++) x[b] = _mm512_loadu_si512(xu + b * K + k);
    for (int r = 0; r < 4; r++) {
      const __m512i wr = _mm512_loadu_si512(w + r * K + k);
      for (int b = 0; b < NB; b++)
        acc[NB * r + b] = _mm512_dpbusd_epi32(acc[NB * r + b], x[b], wr);
    }
  }
  for (int rb = 0; rb < 4 * NB; rb++) out[rb] = _mm512_reduce_add_epi32(acc[rb]);  // registers
}

// Four rows against NB = 1..4 input vectors (stride K). Every (row, input) pair is one 16-lane
// fused multiply-add chain over k followed by the same lane reduction, whatever NB: a row's
// value does not depend on how many other rows share its tile, so on AVX-512 a batch row gets
// the same bits as the row alone (the batch-independence the scheduler relies on).
template <int NB>
__attribute__((target("avx512f")))
void tile4_f32_avx512(const float* w, const float* x, int K, bool prefetch, float* out) {
  __m512 acc[4 * NB];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 16) {
    for (int line = 0; prefetch && line < 4; line++)  // the next 4 rows, as the int8 tiles do
      _mm_prefetch(reinterpret_cast<const char*>(w + 4 * K + 4 * k + 16 * line), _MM_HINT_T1);
    __m512 xb[NB];
    for (int b = 0; b < NB; b++) xb[b] = _mm512_loadu_ps(x + b * K + k);
    for (int r = 0; r < 4; r++) {
      const __m512 wr = _mm512_loadu_ps(w + r * K + k);
      for (int b = 0; b < NB; b++) acc[NB * r + b] = _mm512_fmadd_ps(wr, xb[b], acc[NB * r + b]);
    }
  }
  for (int rb = 0; rb < 4 * NB; rb++) out[rb] = _mm512_reduce_add_ps(acc[rb]);
}

// `prefetch`: on the first pass over these four rows only (later inputs find them in cache).
void tile4_f32(int inputs, const float* w, const float* x, int K, bool prefetch, float* out) {
  switch (inputs) {
    case 1: return tile4_f32_avx512<1>(w, x, K, prefetch, out);
    case 2: return tile4_f32_avx512<2>(w, x, K, prefetch, out);
    case 3: return tile4_f32_avx512<3>(w, x, K, prefetch, out);
    default: return tile4_f32_avx512<4>(w, x, K, prefetch, out);
  }
}

void tile4_u8s8(int inputs, const int8_t* w, const uint8_t* xu, int K, bool prefetch,
                int32_t* out) {
  switch (inputs) {
    case 1: return tile4_u8s8_vnni<1>(w, xu, K, prefetch, out);
    case 2: return tile4_u8s8_vnni<2>(w, xu, K, prefetch, out);
    case 3: return tile4_u8s8_vnni<3>(w, xu, K, prefetch, out);
    default: return tile4_u8s8_vnni<4>(w, xu, K, prefetch, out);
  }
}
#pragma GCC diagnostic pop

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}
#endif

std::atomic<bool> allow_vnni{true};  // off: the portable int8 path, for tests on VNNI machines

bool use_vnni() {
#if FACERT_X86
  return has_vnni() && allow_vnni.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// The input rows of a product, float32 or quantized per row for int8 weights.
struct Inputs {
  const float* x;        // (B, K)
  const uint8_t* xu;     // (B, K) quantized + 128, int8 weights only
  const float* x_scale;  // (B,)
  int B, K;
};

// y[b, n] = W[n] . x[b] + bias[n] for rows n in [n0, n1), then epilogue(b, n, value). Blocks
// of 4 rows x up to 4 inputs on AVX-512 (float32, or int8 with VNNI), else 4 rows x 1 input,
// else one row at a time. Which of these a row takes depends on the weights' shape and the CPU,
// never on the batch, and the tiles give each (row, input) the same arithmetic whatever their
// width: a row's result is the same whatever other rows share the call.
template <typename Epilogue>
void linear_rows(const facert_linear& L, const Inputs& in, int n0, int n1, Epilogue epilogue) {
  const int K = L.in;
  const bool int8 = L.scale != nullptr;
  // Whether this product takes the tiles, decided once: VNNI for int8, AVX-512 for float32.
#if FACERT_X86
  const bool vnni = int8 && K % 64 == 0 && use_vnni();
  const bool wide = int8 ? vnni : K % 16 == 0 && has_avx512();
#else
  const bool wide = false;
#endif
  float vals[16];
  int32_t dots[16];
  for (int n = n0; n < n1; n += 4) {
    const int rows = std::min(4, n1 - n);
    const float* wf = static_cast<const float*>(L.weight) + int64_t(n) * K;
    const int8_t* wq = static_cast<const int8_t*>(L.weight) + int64_t(n) * K;
    for (int b = 0; b < in.B;) {
      const int inputs = wide && rows == 4 ? std::min(4, in.B - b) : 1;  // vals[r * inputs + i]
      if (!int8) {
        const float* x = in.x + int64_t(b) * K;
#if FACERT_X86
        if (wide && rows == 4) {
          tile4_f32(inputs, wf, x, K, b == 0, vals);
        } else
#endif
        if (rows == 4) {
          dot4_f32(wf, x, K, vals);
        } else {
          for (int r = 0; r < rows; r++) vals[r] = dot_f32(wf + int64_t(r) * K, x, K);
        }
      } else {
        const uint8_t* xu = in.xu + int64_t(b) * K;
#if FACERT_X86
        if (wide && rows == 4) {
          tile4_u8s8(inputs, wq, xu, K, b == 0, dots);
        } else
#endif
        {
          for (int r = 0; r < rows; r++) dots[r] = dot_u8s8_portable(wq + int64_t(r) * K, xu, K);
        }
        for (int r = 0; r < rows; r++)
          for (int i = 0; i < inputs; i++)
            vals[r * inputs + i] = float(dots[r * inputs + i] - 128 * L.row_sum[n + r]) *
                                   L.scale[n + r] * in.x_scale[b + i];
      }
      for (int r = 0; r < rows; r++)
        for (int i = 0; i < inputs; i++)
          epilogue(b + i, n + r, vals[r * inputs + i] + (L.bias ? L.bias[n + r] : 0.0f));
      b += inputs;
    }
  }
}

int64_t row_bytes(const facert_linear& L) {
  return L.scale ? L.in : int64_t(L.in) * sizeof(float);
}

// Quantize each input row symmetrically to int8 (stored + 128 as uint8) when L is int8.
FACERT_CLONES
void quantize_row(const float* x, int K, uint8_t* xu, float* scale) {
  float top[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; j++) top[j] = std::max(top[j], std::fabs(x[k + j]));
  float amax = 0.0f;
  for (; k < K; k++) amax = std::max(amax, std::fabs(x[k]));
  for (int j = 0; j < kLanes; j++) amax = std::max(amax, top[j]);
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
  for (k = 0; k < K; k++)  // round half away from zero, then shift to unsigned
    xu[k] = uint8_t(int(x[k] * inv + std::copysign(0.5f, x[k])) + 128);
  *scale = s;
}

void quantize_inputs(const facert_linear& L, Inputs* in, std::vector<uint8_t>* xu,
                     std::vector<float>* scale) {
  if (L.scale == nullptr) return;
  xu->resize(int64_t(in->B) * in->K);
  scale->resize(in->B);
  for (int b = 0; b < in->B; b++)
    quantize_row(in->x + int64_t(b) * in->K, in->K, xu->data() + int64_t(b) * in->K,
                 scale->data() + b);
  in->xu = xu->data();
  in->x_scale = scale->data();
}

// Runs a product over all output rows on the pool, in blocks of rows handed out one at a time:
// cores of a busy machine rarely stream at the same speed, and a static split would leave the
// faster one waiting. Blocks of 256 KB of weights (about 8 % faster steps than 64 KB: longer
// sequential reads), but at least about 4 per thread and never under 64 KB.
template <typename Epilogue>
void linear(const facert_linear& L, const float* x, int B, Epilogue epilogue) {
  thread_local std::vector<uint8_t> xu;
  thread_local std::vector<float> scale;
  Inputs in{x, nullptr, nullptr, B, L.in};
  quantize_inputs(L, &in, &xu, &scale);
  const int64_t bytes = row_bytes(L);
  const int64_t quarter = L.out / (4 * pool().size());  // about 4 blocks per thread
  const int64_t rows = std::max(65536 / bytes, std::min(262144 / bytes, quarter));
  const int grain = int(std::max<int64_t>(4, rows & ~int64_t(3)));
  pool().run(L.out, grain, [&](int n0, int n1) { linear_rows(L, in, n0, n1, epilogue); });
}

// ---- the small per-row operations ----

// TencentPretrain's LayerNorm: gamma * (x - mean) / (std + eps) + beta, unbiased std.
void layer_norm(const float* x, const float* g, const float* b, float eps, int C, float* out) {
  double sum = 0.0;
  for (int i = 0; i < C; i++) sum += x[i];
  const float mean = float(sum / C);
  double sq = 0.0;
  for (int i = 0; i < C; i++) sq += double(x[i] - mean) * double(x[i] - mean);
  const float stdev = float(std::sqrt(sq / (C - 1)));
  for (int i = 0; i < C; i++) out[i] = g[i] * (x[i] - mean) / (stdev + eps) + b[i];
}

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|): libm's tanhf costs several times more.
float gelu_fast(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float e = std::exp(-2.0f * std::fabs(u));
  return 0.5f * x * (1.0f + std::copysign((1.0f - e) / (1.0f + e), u));
}

// One query against T cached positions of one head: softmax(q K^T / sqrt(D)) V -> out (D,).
FACERT_CLONES
void attend(const float* q, const float* keys, const float* values, int T, int D, float* scores,
            float* out) {
  const float root = std::sqrt(float(D));
  float top = -INFINITY;
  int t = 0;
  for (; t + 4 <= T; t += 4) dot4_f32(keys + int64_t(t) * D, q, D, scores + t);  // 4 keys a call
  for (; t < T; t++) scores[t] = dot_f32(keys + int64_t(t) * D, q, D);
  for (t = 0; t < T; t++) {
    scores[t] /= root;
    top = std::max(top, scores[t]);
  }
  float total = 0.0f;
  for (t = 0; t < T; t++) total += (scores[t] = std::exp(scores[t] - top));
  std::fill_n(out, D, 0.0f);
  for (t = 0; t < T; t++)
    for (int d = 0; d < D; d++) out[d] += scores[t] * values[int64_t(t) * D + d];
  for (int d = 0; d < D; d++) out[d] /= total;
}

}  // namespace

// Allow (1) or forbid (0) the AVX512-VNNI int8 path; returns whether int8 products use it now.
FACERT_API int facert_decode_vnni(int allow) {
  allow_vnni.store(allow != 0);
  return use_vnni();
}

// One decode step for `batch` rows, up to the final LayerNorm. Row b appends token tokens[b]
// (segment `decode_segment`) at position positions[b] of cache slot slots[b], attends to that
// slot's positions 0..pos, and gets its final hidden state in hidden (batch, n_embd); the
// logits are facert_head's. Each row's result is the same whatever the other rows of the call.
// k_cache, v_cache: (n_layer, num_slots, n_head, capacity, head_dim) float32.
// Returns 0, or 1 when an argument is out of range (nothing is written then).
FACERT_API int facert_decode_step(const facert_lm* m, float* k_cache, float* v_cache,
                                  int64_t num_slots, int64_t capacity, int32_t batch,
                                  const int64_t* tokens, const int64_t* positions,
                                  const int64_t* slots, float* hidden, int32_t threads) {
  const int C = m->n_embd, H = m->n_head, D = C / H, F = m->n_ffn, B = batch;
  if (B <= 0) return 1;
  for (int b = 0; b < B; b++)
    if (slots[b] < 0 || slots[b] >= num_slots || positions[b] < 0 || positions[b] >= capacity ||
        tokens[b] < 0 || tokens[b] >= m->head.out)
      return 1;
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));

  std::vector<float> x(int64_t(B) * C), h(int64_t(B) * C), qkv(int64_t(B) * 3 * C),
      att(int64_t(B) * C), ff(int64_t(B) * F);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < C; i++)
      x[b * C + i] = (m->wte[tokens[b] * C + i] + m->wpe[positions[b] * C + i]) +
                     m->wse[int64_t(m->decode_segment) * C + i];

  const int64_t slot_stride = int64_t(H) * capacity * D;
  const int64_t layer_stride = num_slots * slot_stride;
  for (int l = 0; l < m->n_layer; l++) {
    const facert_layer& L = m->layers[l];
    for (int b = 0; b < B; b++)
      layer_norm(&x[b * C], L.ln1_weight, L.ln1_bias, m->eps, C, &h[b * C]);
    linear(L.qkv, h.data(), B, [&](int b, int n, float v) { qkv[int64_t(b) * 3 * C + n] = v; });

    // Write this position's keys/values, then attend over positions 0..pos of the slot.
    float* kl = k_cache + l * layer_stride;
    float* vl = v_cache + l * layer_stride;
    for (int b = 0; b < B; b++)
      for (int hd = 0; hd < H; hd++) {
        const int64_t at = slots[b] * slot_stride + (int64_t(hd) * capacity + positions[b]) * D;
        std::copy_n(&qkv[int64_t(b) * 3 * C + C + hd * D], D, kl + at);
        std::copy_n(&qkv[int64_t(b) * 3 * C + 2 * C + hd * D], D, vl + at);
      }
    pool().run(B * H, 1, [&](int begin, int end) {
      thread_local std::vector<float> scores;
      scores.resize(capacity);
      for (int task = begin; task < end; task++) {
        const int b = task / H, hd = task % H;
        const int64_t head = slots[b] * slot_stride + int64_t(hd) * capacity * D;
        attend(&qkv[int64_t(b) * 3 * C + hd * D], kl + head, vl + head, int(positions[b]) + 1,
               D, scores.data(), &att[int64_t(b) * C + hd * D]);
      }
    });
    linear(L.proj, att.data(), B, [&](int b, int n, float v) { x[int64_t(b) * C + n] += v; });

    for (int b = 0; b < B; b++)
      layer_norm(&x[b * C], L.ln2_weight, L.ln2_bias, m->eps, C, &h[b * C]);
    linear(L.fc, h.data(), B,
           [&](int b, int n, float v) { ff[int64_t(b) * F + n] = gelu_fast(v); });
    linear(L.fc_proj, ff.data(), B, [&](int b, int n, float v) { x[int64_t(b) * C + n] += v; });
  }

  for (int b = 0; b < B; b++)
    layer_norm(&x[b * C], m->lnf_weight, m->lnf_bias, m->eps, C, &hidden[int64_t(b) * C]);
  return 0;
}

// The head's rows [lo, hi) for `batch` final hidden states (batch, n_embd): logits (batch,
// hi - lo), each weight row read once for all of them. A decode step over one vocabulary window
// is facert_decode_step then this; rows of other windows take one call per window. Each row's
// logits are the same whatever the other rows of the call. Returns 0, or 1 when out of range.
FACERT_API int facert_head(const facert_lm* m, const float* hidden, int32_t batch, int32_t lo,
                           int32_t hi, float* logits, int32_t threads) {
  if (batch <= 0 || lo < 0 || hi > m->head.out || lo >= hi) return 1;
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));
  facert_linear window = m->head;  // rows [lo, hi) of the head
  window.weight = static_cast<const char*>(m->head.weight) + lo * row_bytes(m->head);
  if (m->head.scale) {
    window.scale += lo;
    window.row_sum += lo;
  }
  window.out = hi - lo;
  const int64_t W = hi - lo;
  linear(window, hidden, batch, [&](int b, int n, float v) { logits[b * W + n] = v; });
  return 0;
}
