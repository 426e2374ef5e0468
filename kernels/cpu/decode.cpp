// Fused decode step and prompt prefill of the Talk2Face LM on CPUs.
//
// Decoding one token is memory-bound: the step's floor is the bytes of weights read divided by
// memory bandwidth. A batch of rows reads each weight once for all of them, so a batch costs
// little more than one row until the products become compute-bound; a prompt's prefill is the
// same products over all its positions at once, compute-bound (a GEMM).
//
// Entry points: facert_decode_step runs the layers (embeddings, every layer, final LayerNorm)
// for a batch of rows, each with its own cache slot and position; facert_head the
// vocabulary-window head for rows sharing a window (one call per window when a batch mixes
// tasks); facert_prefill a batch of whole prompts, writing their keys/values into the cache.
// Products are split by output rows across a small persistent thread pool.
//
// Weights are packed in panels of 16 output rows (see facert_linear): float32, or int8 per
// output row (symmetric) with the activations quantized per row on the fly. Every product is in
// outer-product form: each (output row, input row) pair is one accumulator lane that takes the
// input's k-th value times the weight's k-th value, k = 0, 1, ..., K-1 in order (float32: one
// fused multiply-add per k; int8: exact integer sums). Tiles of several panels x several inputs
// only share loads, so a pair gets the same arithmetic whatever the tile, the batch, the thread
// or the instruction set: a row's results never depend on the other rows of a call, and float32
// products are the same bits on the AVX-512, AVX2 and portable paths (the portable one uses
// std::fma). The math is that of facert.export.lm (TencentPretrain's LayerNorm, gelu_fast,
// scores divided by sqrt(head_dim), the prefix-LM mask); the KV cache is the runtime's
// (layers, slots, heads, capacity, head_dim) array, written in place: float32, or IEEE half
// (`kv_half`, int8 runs), which halves the bytes a long step's attention reads. Half keys and
// values are rounded to nearest on write and widened exactly on read; the arithmetic is float32.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
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
// Tiles' loops over registers, unrolled early enough that their arrays become registers.
#define FACERT_UNROLL _Pragma("GCC unroll 16")

extern "C" {
// y = W x + b with W (out, in), packed in panels of 16 output rows (the last one zero-padded):
// float32 panel p holds W[16p + r][k] at [p][k][r] (in x 16 floats); int8 panel p holds it at
// [p][k / 4][r][k % 4] (in4 x 16 bytes, in4 = in rounded up to a multiple of 4, zero-padded).
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

// The process's pool and the lock that runs one call at a time (the pool is shared by every
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

// Per-row work (LayerNorm, quantization, GELU) on the pool only when there are enough rows to
// pay for waking it (a row takes about a microsecond, a region a few).
void for_rows(int count, const std::function<void(int, int)>& fn) {
  constexpr int kParallelFrom = 8;
  if (count < kParallelFrom) return fn(0, count);
  pool().run(count, std::max(4, count / (8 * pool().size())), fn);
}

// A buffer reused across calls (calls hold step_lock; per-thread buffers are thread_local):
// no allocation or page faults in the steady state.
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t n) {
  if (int64_t(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// ---- instruction-set levels of the matrix products ----
//
// Which product tiles run: AVX-512 (float32 FMA, int8 VNNI vpdpbusd), AVX2 (float32 FMA, int8
// through vpmaddubsw on |w| and sign(x, w), which cannot saturate as |w|, |x| <= 127), or
// portable C++. The level changes only the products (every pair's arithmetic is the same on all
// three), so tests on one machine can run the others; the per-row operations (LayerNorm,
// softmax, GELU, attention) take the best the CPU has. A half KV cache's conversions follow the
// level too (F16C from AVX2 up, else C++), all exact or rounded to nearest, so the same bits.

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int best_isa() {
#if FACERT_X86
  static const int best = __builtin_cpu_supports("avx512f") &&
                                  __builtin_cpu_supports("avx512bw") &&
                                  __builtin_cpu_supports("avx512vnni")
                              ? kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                              ? kAvx2
                              : kPortable;
  return best;
#else
  return kPortable;
#endif
}

std::atomic<int> requested_isa{kAvx512};  // lowered by tests to run the other paths here

int product_isa() { return std::min(requested_isa.load(std::memory_order_relaxed), best_isa()); }

constexpr int kPanel = 16;  // output rows per weight panel: one AVX-512 register of lanes
using kv_half = _Float16;   // IEEE binary16: the KV cache of int8 runs

// One tile: R panels x I inputs. acc[i * acc_stride + r * 16 + lane] holds pair (panel r's
// row `lane`, input i); the tile continues those sums (`load`) or starts them at zero, so a long
// K can be cut into chunks without changing any pair's sequence of operations.
struct F32Tile {
  const float* w;        // panel 0 at k = 0
  int64_t panel_stride;  // floats from panel r to r + 1
  int64_t k_stride;      // floats from k to k + 1 within a panel (16 for packed weights)
  const float* x;        // input 0 at k = 0
  int64_t x_stride;      // floats from input i to i + 1
  int K;
  float* acc;
  int64_t acc_stride;
  bool load;
  int64_t prefetch;  // floats ahead of w to prefetch into L2 (the next tile), or 0
};

struct U8Tile {
  const int8_t* w;       // panel 0 at k = 0: groups of 16 rows x 4 bytes
  int64_t panel_stride;  // bytes from panel r to r + 1
  const uint8_t* x;      // input 0, quantized + 128
  int64_t x_stride;
  int groups;  // K / 4
  int32_t* acc;
  int64_t acc_stride;
  bool load;
  int64_t prefetch;  // bytes ahead
};

// Portable: one panel x one input, lane by lane. std::fma rounds once, as the vector FMAs do.
void f32_portable(const F32Tile& t) {
  float acc[kPanel];
  for (int l = 0; l < kPanel; l++) acc[l] = t.load ? t.acc[l] : 0.0f;
  for (int k = 0; k < t.K; k++) {
    const float* w = t.w + k * t.k_stride;
    for (int l = 0; l < kPanel; l++) acc[l] = std::fma(w[l], t.x[k], acc[l]);
  }
  std::copy_n(acc, kPanel, t.acc);
}

// Portable int8: signed sums (x - 128) * w, exact.
void u8_portable(const U8Tile& t) {
  int32_t acc[kPanel];
  for (int l = 0; l < kPanel; l++) acc[l] = t.load ? t.acc[l] : 0;
  for (int g = 0; g < t.groups; g++)
    for (int l = 0; l < kPanel; l++)
      for (int j = 0; j < 4; j++)
        acc[l] += (int32_t(t.x[4 * g + j]) - 128) * int32_t(t.w[(g * kPanel + l) * 4 + j]);
  std::copy_n(acc, kPanel, t.acc);
}

#if FACERT_X86
// R panels x I inputs: R weight loads and I broadcasts per k feed R * I accumulators (4 x 6:
// 24 of the 32 registers). With `prefetch`, the next tile is pulled into L2 as fast as this one
// is read (into L2, not L1, where it would push out the rows being read).
template <int R, int I>
__attribute__((target("avx512f"))) void f32_avx512(const F32Tile& t) {
  __m512 acc[R][I];
  FACERT_UNROLL for (int r = 0; r < R; r++)
    FACERT_UNROLL for (int i = 0; i < I; i++)
      acc[r][i] = t.load ? _mm512_loadu_ps(t.acc + i * t.acc_stride + r * kPanel)
                         : _mm512_setzero_ps();
  const float* w = t.w;
  for (int k = 0; k < t.K; k++, w += t.k_stride) {
    if (t.prefetch)
      FACERT_UNROLL for (int r = 0; r < R; r++)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * t.panel_stride + t.prefetch),
                     _MM_HINT_T1);
    __m512 wr[R];
    FACERT_UNROLL for (int r = 0; r < R; r++) wr[r] = _mm512_loadu_ps(w + r * t.panel_stride);
    FACERT_UNROLL for (int i = 0; i < I; i++) {
      const __m512 xb = _mm512_set1_ps(t.x[i * t.x_stride + k]);
      FACERT_UNROLL for (int r = 0; r < R; r++) {
        acc[r][i] = _mm512_fmadd_ps(wr[r], xb, acc[r][i]);
      }
    }
  }
  FACERT_UNROLL for (int r = 0; r < R; r++)
    FACERT_UNROLL for (int i = 0; i < I; i++) {
      _mm512_storeu_ps(t.acc + i * t.acc_stride + r * kPanel, acc[r][i]);
    }
}

// acc += the 4-byte dot products of x (unsigned) and w (signed) per lane. In assembly: GCC 12
// copies the accumulator around each _mm512_dpbusd_epi32 (most of the tile's time).
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline void dpbusd(
    __m512i& acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
}

// int8 with VNNI: unsigned sums (x + 128) * w over 4 k per lane; the caller subtracts
// 128 * row_sum. Exact integers, like every int8 path.
template <int R, int I>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void u8_avx512(const U8Tile& t) {
  __m512i acc[R][I];
  FACERT_UNROLL for (int r = 0; r < R; r++)
    FACERT_UNROLL for (int i = 0; i < I; i++)
      acc[r][i] = t.load ? _mm512_loadu_si512(t.acc + i * t.acc_stride + r * kPanel)
                         : _mm512_setzero_si512();
  for (int g = 0; g < t.groups; g++) {
    const int8_t* w = t.w + int64_t(g) * 64;
    if (t.prefetch)
      FACERT_UNROLL for (int r = 0; r < R; r++)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * t.panel_stride + t.prefetch),
                     _MM_HINT_T1);
    __m512i wr[R];
    FACERT_UNROLL for (int r = 0; r < R; r++) wr[r] = _mm512_loadu_si512(w + r * t.panel_stride);
    FACERT_UNROLL for (int i = 0; i < I; i++) {
      int32_t quad;
      std::memcpy(&quad, t.x + i * t.x_stride + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
      FACERT_UNROLL for (int r = 0; r < R; r++) dpbusd(acc[r][i], xb, wr[r]);
    }
  }
  FACERT_UNROLL for (int r = 0; r < R; r++)
    FACERT_UNROLL for (int i = 0; i < I; i++)
      _mm512_storeu_si512(t.acc + i * t.acc_stride + r * kPanel, acc[r][i]);
}

// AVX2 (16 registers): one panel (two registers of 8 lanes) x I inputs.
template <int I>
__attribute__((target("avx2,fma"))) void f32_avx2(const F32Tile& t) {
  __m256 lo[I], hi[I];
  FACERT_UNROLL for (int i = 0; i < I; i++) {
    lo[i] = t.load ? _mm256_loadu_ps(t.acc + i * t.acc_stride) : _mm256_setzero_ps();
    hi[i] = t.load ? _mm256_loadu_ps(t.acc + i * t.acc_stride + 8) : _mm256_setzero_ps();
  }
  const float* w = t.w;
  for (int k = 0; k < t.K; k++, w += t.k_stride) {
    if (t.prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + t.prefetch), _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    FACERT_UNROLL for (int i = 0; i < I; i++) {
      const __m256 xb = _mm256_set1_ps(t.x[i * t.x_stride + k]);
      lo[i] = _mm256_fmadd_ps(w0, xb, lo[i]);
      hi[i] = _mm256_fmadd_ps(w1, xb, hi[i]);
    }
  }
  FACERT_UNROLL for (int i = 0; i < I; i++) {
    _mm256_storeu_ps(t.acc + i * t.acc_stride, lo[i]);
    _mm256_storeu_ps(t.acc + i * t.acc_stride + 8, hi[i]);
  }
}

// AVX2 int8: |w| (unsigned) times sign(x - 128, w) (signed) in pairs (vpmaddubsw: at most
// 2 * 127 * 127, no saturation), then pairs of those to int32 (vpmaddwd by 1): signed sums.
template <int I>
__attribute__((target("avx2"))) void u8_avx2(const U8Tile& t) {
  __m256i lo[I], hi[I];
  FACERT_UNROLL for (int i = 0; i < I; i++) {
    const int32_t* a = t.acc + i * t.acc_stride;
    lo[i] = t.load ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))
                   : _mm256_setzero_si256();
    hi[i] = t.load ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8))
                   : _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  for (int g = 0; g < t.groups; g++) {
    const int8_t* w = t.w + int64_t(g) * 64;
    if (t.prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + t.prefetch), _MM_HINT_T1);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
    FACERT_UNROLL for (int i = 0; i < I; i++) {
      int32_t quad;
      std::memcpy(&quad, t.x + i * t.x_stride + 4 * g, 4);
      const __m256i xs = _mm256_xor_si256(_mm256_set1_epi32(quad), flip);  // x - 128, signed
      const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xs, w0));
      const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xs, w1));
      lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(p0, ones));
      hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(p1, ones));
    }
  }
  FACERT_UNROLL for (int i = 0; i < I; i++) {
    int32_t* a = t.acc + i * t.acc_stride;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), lo[i]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8), hi[i]);
  }
}
#endif

// The tile kernels of each level, by [panels - 1][inputs - 1], and the widest tile.
using F32Kernel = void (*)(const F32Tile&);
using U8Kernel = void (*)(const U8Tile&);
constexpr int kMaxR = 4, kMaxI = 6;

struct Kernels {
  int max_r, max_i;
  F32Kernel f32[kMaxR][kMaxI];
  int u8_max_r, u8_max_i;
  U8Kernel u8[kMaxR][kMaxI];
};

#if FACERT_X86
template <int R, std::size_t... I>
constexpr std::array<F32Kernel, kMaxI> f32_avx512_row(std::index_sequence<I...>) {
  return {&f32_avx512<R, int(I) + 1>...};
}
template <int R, std::size_t... I>
constexpr std::array<U8Kernel, kMaxI> u8_avx512_row(std::index_sequence<I...>) {
  return {&u8_avx512<R, int(I) + 1>...};
}
#endif

Kernels make_kernels(int isa) {
  Kernels k{1, 1, {{&f32_portable}}, 1, 1, {{&u8_portable}}};
#if FACERT_X86
  const auto seq = std::make_index_sequence<kMaxI>();
  if (isa == kAvx512) {
    const std::array<F32Kernel, kMaxI> f[kMaxR] = {
        f32_avx512_row<1>(seq), f32_avx512_row<2>(seq), f32_avx512_row<3>(seq),
        f32_avx512_row<4>(seq)};
    const std::array<U8Kernel, kMaxI> u[kMaxR] = {u8_avx512_row<1>(seq), u8_avx512_row<2>(seq),
                                                  u8_avx512_row<3>(seq), u8_avx512_row<4>(seq)};
    k.max_r = k.u8_max_r = 4;
    k.max_i = k.u8_max_i = 6;
    for (int r = 0; r < kMaxR; r++)
      for (int i = 0; i < kMaxI; i++) k.f32[r][i] = f[r][i], k.u8[r][i] = u[r][i];
  } else if (isa == kAvx2) {
    const F32Kernel f[kMaxI] = {&f32_avx2<1>, &f32_avx2<2>, &f32_avx2<3>,
                                &f32_avx2<4>, &f32_avx2<5>, &f32_avx2<6>};
    const U8Kernel u[4] = {&u8_avx2<1>, &u8_avx2<2>, &u8_avx2<3>, &u8_avx2<4>};
    k.max_i = 6;
    k.u8_max_i = 4;
    std::copy_n(f, kMaxI, k.f32[0]);
    std::copy_n(u, 4, k.u8[0]);
  }
#else
  (void)isa;
#endif
  return k;
}

const Kernels& kernels(int isa) {
  static const Kernels all[3] = {make_kernels(kPortable), make_kernels(kAvx2),
                                 make_kernels(kAvx512)};
  return all[isa];
}

// ---- products ----

// The input rows of a product, float32 or quantized per row for int8 weights.
struct Inputs {
  const float* x;        // (B, K)
  const uint8_t* xu;     // (B, K4) quantized + 128, int8 weights only
  const float* x_scale;  // (B,)
  int B, K;
};

int round_up(int n, int to) { return (n + to - 1) / to * to; }

// Per panel tile, K is cut into chunks when the inputs need several tiles, so that the chunk
// of weights (16 KB) stays in L1 while every input group goes over it (the sums carry over
// exactly from chunk to chunk).
constexpr int kChunkBytes = 16384;

// The sums of one tile of R panels (rows [16 p0, 16 (p0 + R))) for every input over the whole
// K, at acc[b * 64 + r * 16 + lane]; while the first input group reads the tile, the next
// `prefetch_panels` panels are pulled into L2.
void tile_sums(const facert_linear& L, const Inputs& in, const Kernels& ks, int p0, int R,
               int64_t prefetch_panels, float* acc) {
  const int K = L.in, I = ks.max_i;
  const int64_t acc_stride = kMaxR * kPanel, ps = int64_t(K) * kPanel;
  const int chunk = in.B <= I ? K : std::max(16, kChunkBytes / (R * kPanel * 4));
  const float* w = static_cast<const float*>(L.weight) + p0 * ps;
  for (int k0 = 0; k0 < K; k0 += chunk)
    for (int b = 0; b < in.B; b += I) {
      const F32Tile t{w + int64_t(k0) * kPanel, ps, kPanel, in.x + int64_t(b) * K + k0, K,
                      std::min(chunk, K - k0), acc + b * acc_stride, acc_stride, k0 > 0,
                      b == 0 ? prefetch_panels * ps : 0};
      ks.f32[R - 1][std::min(I, in.B - b) - 1](t);
    }
}

// The same for int8 weights: exact int32 sums (unsigned x + 128 on VNNI, signed otherwise).
void tile_sums(const facert_linear& L, const Inputs& in, const Kernels& ks, int p0, int R,
               int64_t prefetch_panels, int32_t* acc) {
  const int K4 = round_up(L.in, 4), I = ks.u8_max_i;
  const int64_t acc_stride = kMaxR * kPanel, ps = int64_t(K4) * kPanel;
  const int chunk = in.B <= I ? K4 : std::max(64, kChunkBytes / (R * kPanel)) & ~3;
  const int8_t* w = static_cast<const int8_t*>(L.weight) + p0 * ps;
  for (int k0 = 0; k0 < K4; k0 += chunk)
    for (int b = 0; b < in.B; b += I) {
      const U8Tile t{w + int64_t(k0) * kPanel, ps, in.xu + int64_t(b) * K4 + k0, K4,
                     std::min(chunk, K4 - k0) / 4, acc + b * acc_stride, acc_stride, k0 > 0,
                     b == 0 ? prefetch_panels * ps : 0};
      ks.u8[R - 1][std::min(I, in.B - b) - 1](t);
    }
}

// y[b, n] = W[n] . x[b] + bias[n] for the rows n in [lo, hi) of panels [p0, p1), then
// epilogue(b, n, value). The tile shapes depend on the level and the batch, never the
// arithmetic of a pair; the int8 scaling is one scalar expression shared by every level.
template <typename Epilogue>
void linear_panels(const facert_linear& L, const Inputs& in, int isa, int p0, int p1, int lo,
                   int hi, Epilogue epilogue) {
  const Kernels& ks = kernels(isa);
  const bool int8 = L.scale != nullptr;
  const int TR = int8 ? ks.u8_max_r : ks.max_r;
  thread_local std::vector<float> facc;
  thread_local std::vector<int32_t> qacc;
  const int64_t acc_stride = kMaxR * kPanel;
  float* fa = int8 ? nullptr : scratch(facc, in.B * acc_stride);
  int32_t* qa = int8 ? scratch(qacc, in.B * acc_stride) : nullptr;
  const bool unsigned_sums = int8 && isa == kAvx512;
  for (int p = p0; p < p1; p += TR) {
    const int R = std::min(TR, p1 - p);
    if (int8)
      tile_sums(L, in, ks, p, R, R, qa);
    else
      tile_sums(L, in, ks, p, R, R, fa);
    const int n0 = std::max(lo, p * kPanel), n1 = std::min(hi, (p + R) * kPanel);
    for (int b = 0; b < in.B; b++)
      for (int n = n0; n < n1; n++) {
        const int64_t at = b * acc_stride + (n - p * kPanel);
        float v;
        if (int8) {
          const int32_t dot = qa[at] - (unsigned_sums ? 128 * L.row_sum[n] : 0);
          v = float(dot) * L.scale[n] * in.x_scale[b];
        } else {
          v = fa[at];
        }
        epilogue(b, n, v + (L.bias ? L.bias[n] : 0.0f));
      }
  }
}

int64_t row_bytes(const facert_linear& L) {
  return L.scale ? round_up(L.in, 4) : int64_t(L.in) * sizeof(float);
}

// Quantize an input row symmetrically to int8, stored + 128 as uint8 and padded with 128 (whose
// weights are zero) to a multiple of 4.
FACERT_CLONES
void quantize_row(const float* x, int K, uint8_t* xu, float* scale) {
  float top[kPanel] = {};
  int k = 0;
  for (; k + kPanel <= K; k += kPanel)
    for (int j = 0; j < kPanel; j++) top[j] = std::max(top[j], std::fabs(x[k + j]));
  float amax = 0.0f;
  for (; k < K; k++) amax = std::max(amax, std::fabs(x[k]));
  for (int j = 0; j < kPanel; j++) amax = std::max(amax, top[j]);
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
  for (k = 0; k < K; k++)  // round half away from zero, then shift to unsigned
    xu[k] = uint8_t(int(x[k] * inv + std::copysign(0.5f, x[k])) + 128);
  for (; k < round_up(K, 4); k++) xu[k] = 128;
  *scale = s;
}

// Runs a product over output rows [lo, hi) on the pool, in blocks of panels handed out one at
// a time: cores of a busy machine rarely stream at the same speed, and a static split would
// leave the faster one waiting. Blocks of 256 KB of weights (about 8 % faster steps than 64 KB:
// longer sequential reads), but at least about 4 per thread and never under 64 KB; for long
// batches (prefill), blocks of one tile, enough to share the work evenly.
template <typename Epilogue>
void linear(const facert_linear& L, const float* x, int B, int lo, int hi, Epilogue epilogue) {
  static std::vector<uint8_t> xu;  // callers hold step_lock
  static std::vector<float> scale;
  const int K = L.in, K4 = round_up(K, 4);
  Inputs in{x, nullptr, nullptr, B, K};
  if (L.scale != nullptr) {
    uint8_t* q = scratch(xu, int64_t(B) * K4);
    float* s = scratch(scale, B);
    for_rows(B, [&](int b0, int b1) {
      for (int b = b0; b < b1; b++) quantize_row(x + int64_t(b) * K, K, q + int64_t(b) * K4, s + b);
    });
    in.xu = q;
    in.x_scale = s;
  }
  const int isa = product_isa();
  const Kernels& ks = kernels(isa);
  const int TR = L.scale ? ks.u8_max_r : ks.max_r;
  const int p_lo = lo / kPanel, p_hi = (hi + kPanel - 1) / kPanel;
  const int64_t bytes = row_bytes(L) * kPanel;  // per panel
  const int64_t quarter = (p_hi - p_lo) / (4 * pool().size());
  int64_t grain = std::max(65536 / bytes, std::min(262144 / bytes, quarter));
  if (B > 16) grain = TR;
  grain = std::max<int64_t>(TR, grain / TR * TR);
  pool().run(p_hi - p_lo, int(grain), [&](int begin, int end) {
    linear_panels(L, in, isa, p_lo + begin, p_lo + end, lo, hi, epilogue);
  });
}

// All of C (rows x 16 * panels) = A (rows x K, row stride a_stride) times B (K x 16 * panels,
// row-major with row stride b_stride), in the same tiles as the products: attention's scores
// (queries x keys) and outputs (queries x head_dim).
void gemm_f32(int isa, const float* A, int64_t a_stride, int rows, const float* B,
              int64_t b_stride, int panels, int K, float* C, int64_t c_stride) {
  const Kernels& ks = kernels(isa);
  for (int p = 0; p < panels; p += ks.max_r) {
    const int R = std::min(ks.max_r, panels - p);
    for (int i = 0; i < rows; i += ks.max_i) {
      const int n = std::min(ks.max_i, rows - i);
      const F32Tile t{B + p * kPanel, kPanel, b_stride, A + i * a_stride, a_stride, K,
                      C + i * c_stride + p * kPanel, c_stride, false, 0};
      ks.f32[R - 1][n - 1](t);
    }
  }
}

// ---- the small per-row operations ----

// Sum of 16 lanes by halves: shuffles and adds, not a chain of 16 scalar additions.
inline __attribute__((always_inline)) float sum_lanes(float* acc) {
  for (int half = kPanel / 2; half > 0; half /= 2)
    for (int j = 0; j < half; j++) acc[j] += acc[j + half];
  return acc[0];
}

// TencentPretrain's LayerNorm: gamma * (x - mean) / (std + eps) + beta, unbiased std; sums in
// 16 float lanes (vectorized; plenty accurate over a few thousand values).
FACERT_CLONES
void layer_norm(const float* x, const float* g, const float* b, float eps, int C, float* out) {
  float acc[kPanel] = {};
  int i = 0;
  for (; i + kPanel <= C; i += kPanel)
    for (int j = 0; j < kPanel; j++) acc[j] += x[i + j];
  float sum = 0.0f;
  for (; i < C; i++) sum += x[i];
  const float mean = (sum + sum_lanes(acc)) / float(C);
  float sq[kPanel] = {};
  for (i = 0; i + kPanel <= C; i += kPanel)
    for (int j = 0; j < kPanel; j++) sq[j] += (x[i + j] - mean) * (x[i + j] - mean);
  float tail = 0.0f;
  for (; i < C; i++) tail += (x[i] - mean) * (x[i] - mean);
  const float stdev = std::sqrt((tail + sum_lanes(sq)) / float(C - 1));
  for (i = 0; i < C; i++) out[i] = g[i] * (x[i] - mean) / (stdev + eps) + b[i];
}

void layer_norm_rows(const float* x, const float* g, const float* b, float eps, int C, int rows,
                     float* out) {
  for_rows(rows, [&](int r0, int r1) {
    for (int r = r0; r < r1; r++)
      layer_norm(x + int64_t(r) * C, g, b, eps, C, out + int64_t(r) * C);
  });
}

// exp(v) for v <= 0 (softmax, GELU), about 1 ulp: 2^n times a polynomial on [-ln2/2, ln2/2],
// in plain float operations the compiler vectorizes (libm's expf is a call per value). Below
// -87 (masked keys are -inf): exactly 0.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float v = std::max(x, -87.0f);
  const float n = (v * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.0f ? 0.0f : y * two_n;
}

// gelu_fast in place; tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|).
FACERT_CLONES
void gelu_fast(float* x, int n) {
  for (int i = 0; i < n; i++) {
    const float v = x[i], u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    const float e = exp_nonpositive(-2.0f * std::fabs(u));
    x[i] = 0.5f * v * (1.0f + std::copysign((1.0f - e) / (1.0f + e), u));
  }
}

// scores[t] = exp(scores[t] - top) for t < T; returns their sum.
FACERT_CLONES
float softmax_exp(float* scores, int T, float top) {
  float total[kPanel] = {};
  int t = 0;
  for (; t + kPanel <= T; t += kPanel)
    for (int j = 0; j < kPanel; j++)
      total[j] += (scores[t + j] = exp_nonpositive(scores[t + j] - top));
  float rest = 0.0f;
  for (; t < T; t++) rest += (scores[t] = exp_nonpositive(scores[t] - top));
  return rest + sum_lanes(total);
}

// Four keys against one query: each query value is loaded once.
FACERT_CLONES
void dot4(const float* keys, const float* q, int D, float* out) {
  float a[4][kPanel] = {};
  int d = 0;
  for (; d + kPanel <= D; d += kPanel)
    for (int r = 0; r < 4; r++)
      for (int j = 0; j < kPanel; j++) a[r][j] += keys[r * D + d + j] * q[d + j];
  for (int r = 0; r < 4; r++) {
    float s = 0.0f;
    for (int e = d; e < D; e++) s += keys[r * D + e] * q[e];
    out[r] = s + sum_lanes(a[r]);
  }
}

// out (D,) += sum_t p[t] values[t], t in order.
FACERT_CLONES
void add_weighted_values(const float* p, const float* values, int T, int D, float* out) {
  for (int t = 0; t < T; t++)
    for (int d = 0; d < D; d++) out[d] += p[t] * values[int64_t(t) * D + d];
}

// Half <-> float in C++ (GCC converts _Float16 one value at a time): the portable level.
void halves(const float* x, int64_t n, kv_half* out) {
  for (int64_t i = 0; i < n; i++) out[i] = kv_half(x[i]);
}
void widen(const kv_half* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = float(x[i]);
}

#if FACERT_X86
// GCC 12 warns about an intentionally undefined register inside its own shuffle and
// conversion intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 cached values as floats.
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const kv_half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Rounded to nearest (ties to even), as kv_half(x) rounds: the same bits on every level.
__attribute__((target("avx,f16c"))) void halves_f16c(const float* x, int64_t n, kv_half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  halves(x + i, n - i, out + i);
}
__attribute__((target("avx,f16c"))) void widen_f16c(const kv_half* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  widen(x + i, n - i, out + i);
}

// Sixteen keys (rows of D values, D a multiple of 16, up to 256) against one query: one FMA
// chain per key over D, then the 16 chains' lanes summed in a transposing tree (45 shuffles and
// adds for all 16, not 16 separate reductions).
template <typename KV>
__attribute__((target("avx512f"))) __m512 dot16_avx512(const KV* keys, const float* q, int D) {
  __m512 s[16];
  const __m512 q0 = _mm512_loadu_ps(q);
  FACERT_UNROLL for (int j = 0; j < 16; j++) {
    s[j] = _mm512_mul_ps(load16(keys + j * D), q0);
  }
  for (int d = 16; d < D; d += 16) {
    const __m512 qd = _mm512_loadu_ps(q + d);
    FACERT_UNROLL for (int j = 0; j < 16; j++) {
      s[j] = _mm512_fmadd_ps(load16(keys + j * D + d), qd, s[j]);
    }
  }
  __m512 r[8], u[4], v[2];
  FACERT_UNROLL for (int j = 0; j < 8; j++)  // 128-bit lanes: key j, j, j + 8, j + 8
    r[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[j], s[j + 8], 0x44),
                         _mm512_shuffle_f32x4(s[j], s[j + 8], 0xEE));
  FACERT_UNROLL for (int j = 0; j < 4; j++)  // lanes: key j, j + 8, j + 4, j + 12
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(r[j], r[j + 4], 0x88),
                         _mm512_shuffle_f32x4(r[j], r[j + 4], 0xDD));
  FACERT_UNROLL for (int j = 0; j < 2; j++)
    v[j] = _mm512_add_ps(_mm512_shuffle_ps(u[j], u[j + 2], 0x44),
                         _mm512_shuffle_ps(u[j], u[j + 2], 0xEE));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88),
                                 _mm512_shuffle_ps(v[0], v[1], 0xDD));
  // w holds keys 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15: back in order
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, w);
}

// scores[t] = keys[t] . q / root for t < T (keys past T are not read).
template <typename KV>
__attribute__((target("avx512f"))) void scores_avx512(const float* q, const KV* keys, int T, int D,
                                                      float root, float* scores) {
  const __m512 div = _mm512_set1_ps(root);
  int t = 0;
  for (; t + 16 <= T; t += 16)
    _mm512_storeu_ps(scores + t, _mm512_div_ps(dot16_avx512(keys + int64_t(t) * D, q, D), div));
  if (t < T) {  // the last keys through a zero-padded copy
    thread_local std::vector<KV> tail;
    KV* k = scratch(tail, 16 * int64_t(D));
    std::fill_n(k, 16 * D, KV(0.0f));
    std::copy_n(keys + int64_t(t) * D, int64_t(T - t) * D, k);
    const __m512 last = _mm512_div_ps(dot16_avx512(k, q, D), div);
    _mm512_mask_storeu_ps(scores + t, __mmask16((1u << (T - t)) - 1), last);
  }
}

// out (D,) = sum_t p[t] values[t] / total, D a multiple of 16 up to 256.
template <typename KV>
__attribute__((target("avx512f"))) void weighted_values_avx512(const float* p, const KV* values,
                                                               int T, int D, float total,
                                                               float* out) {
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int n = std::min(4, (D - d0) / 16);  // registers of 16 used
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int t = 0; t < T; t++) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      const KV* row = values + int64_t(t) * D + d0;
      FACERT_UNROLL for (int j = 0; j < 4; j++) {
        if (j < n) acc[j] = _mm512_fmadd_ps(pt, load16(row + 16 * j), acc[j]);
      }
    }
    FACERT_UNROLL for (int j = 0; j < 4; j++) {
      if (j < n) _mm512_storeu_ps(out + d0 + 16 * j, _mm512_div_ps(acc[j], _mm512_set1_ps(total)));
    }
  }
}

// softmax(q K^T / sqrt(D)) V for D a multiple of 16, keys and values float or kv_half.
template <typename KV>
__attribute__((target("avx512f"))) void attend_avx512(const float* q, const KV* keys,
                                                      const KV* values, int T, int D,
                                                      float* scores, float* out) {
  scores_avx512(q, keys, T, D, std::sqrt(float(D)), scores);
  float top = -INFINITY;
  for (int t = 0; t < T; t++) top = std::max(top, scores[t]);
  weighted_values_avx512(scores, values, T, D, softmax_exp(scores, T, top), out);
}
#pragma GCC diagnostic pop

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// Keys/values x (n,) into the cache.
inline void store_kv(const float* x, int64_t n, float* out) { std::copy_n(x, n, out); }
inline void store_kv(const float* x, int64_t n, kv_half* out) {
#if FACERT_X86
  if (product_isa() >= kAvx2 && has_f16c()) return halves_f16c(x, n, out);
#endif
  halves(x, n, out);
}

// Half keys/values (n,) as floats, exactly.
inline void widen_kv(const kv_half* x, int64_t n, float* out) {
#if FACERT_X86
  if (product_isa() >= kAvx2 && has_f16c()) return widen_f16c(x, n, out);
#endif
  widen(x, n, out);
}

// n keys or values of one head from the cache as floats: the float cache itself, or a half
// cache's values widened (exactly) into `buf`.
inline const float* as_floats(const float* x, int64_t, float*) { return x; }
inline const float* as_floats(const kv_half* x, int64_t n, float* buf) {
  widen_kv(x, n, buf);
  return buf;
}

// fn(keys, values) over the caller's KV cache, typed float32 or half as the C API says.
template <typename Fn>
int with_cache(void* k_cache, void* v_cache, int32_t half, Fn fn) {
  if (half) return fn(static_cast<kv_half*>(k_cache), static_cast<kv_half*>(v_cache));
  return fn(static_cast<float*>(k_cache), static_cast<float*>(v_cache));
}

// One query against T cached positions of one head: softmax(q K^T / sqrt(D)) V -> out (D,).
// The code path depends on the CPU and D only, never on the batch. AVX-512 reads a half cache
// in the registers that use its values; elsewhere a half cache is widened a block of positions
// at a time (a block stays in L1) and attended as floats: the same values in the same
// arithmetic, so the same bits either way.
template <typename KV>
void attend(const float* q, const KV* keys, const KV* values, int T, int D, float* scores,
            float* out) {
  constexpr bool kHalf = std::is_same_v<KV, kv_half>;
#if FACERT_X86
  if (D % 16 == 0 && has_avx512() && (!kHalf || product_isa() == kAvx512))
    return attend_avx512(q, keys, values, T, D, scores, out);
#endif
  const int block = std::max(4, (4096 / D) & ~3);  // positions at a time: 16 KB of floats
  thread_local std::vector<float> widened;
  float* buf = kHalf ? scratch(widened, int64_t(block) * D) : nullptr;
  for (int t0 = 0; t0 < T; t0 += block) {
    const int n = std::min(block, T - t0);
    const float* k = as_floats(keys + int64_t(t0) * D, int64_t(n) * D, buf);
    for (int t = 0; t < n; t += 4) {
      if (t + 4 <= n) {
        dot4(k + int64_t(t) * D, q, D, scores + t0 + t);
      } else {  // the last 1-3 keys, through a copy so nothing past the cache is read
        float tail[4 * 256] = {};
        std::copy_n(k + int64_t(t) * D, int64_t(n - t) * D, tail);
        dot4(tail, q, D, scores + t0 + t);
      }
    }
  }
  const float root = std::sqrt(float(D));
  float top = -INFINITY;
  for (int t = 0; t < T; t++) top = std::max(top, scores[t] /= root);
  const float total = softmax_exp(scores, T, top);
  std::fill_n(out, D, 0.0f);
  for (int t0 = 0; t0 < T; t0 += block) {
    const int n = std::min(block, T - t0);
    add_weighted_values(scores + t0, as_floats(values + int64_t(t0) * D, int64_t(n) * D, buf), n,
                        D, out);
  }
  for (int d = 0; d < D; d++) out[d] /= total;
}

// ---- prefill attention: one prompt, one head, every query at once ----

// Which keys query i sees (export/lm.py prefix_mask_bias): two of (seg_j == 1, seg_j > 0,
// j <= i), i.e. segment-1 keys always, segment-2 keys causally, segment-0 keys never.
inline bool visible(int64_t seg_j, int j, int i) {
  return int(seg_j == 1) + int(seg_j > 0) + int(j <= i) >= 2;
}

// q, k, v: rows of T positions (stride `stride`) of one head; out: T rows (stride out_stride).
// Scores and outputs are products in the same tiles as the linear layers (float32 pairs get
// one FMA per k whatever the tile), so a query's values do not depend on the prompt's other
// queries beyond the keys it sees.
void attend_prompt(int isa, const float* q, const float* k, const float* v, int64_t stride,
                   const int64_t* segs, int T, int D, float* out, int64_t out_stride) {
  thread_local std::vector<float> kt_buf, v_buf, s_buf, o_buf;
  const int Tp = round_up(T, kPanel), Dp = round_up(D, kPanel);
  float* kt = scratch(kt_buf, int64_t(D) * Tp);  // (D, Tp): keys transposed, zero-padded
  float* vp = scratch(v_buf, int64_t(T) * Dp);   // (T, Dp)
  float* s = scratch(s_buf, int64_t(T) * Tp);    // (T, Tp) scores, then weights
  float* o = scratch(o_buf, int64_t(T) * Dp);    // (T, Dp)
  std::fill_n(kt, int64_t(D) * Tp, 0.0f);
  std::fill_n(vp, int64_t(T) * Dp, 0.0f);
  for (int j = 0; j < T; j++)
    for (int d = 0; d < D; d++) {
      kt[int64_t(d) * Tp + j] = k[j * stride + d];
      vp[int64_t(j) * Dp + d] = v[j * stride + d];
    }
  gemm_f32(isa, q, stride, T, kt, Tp, Tp / kPanel, D, s, Tp);
  const float root = std::sqrt(float(D));
  std::vector<float> totals(T);
  for (int i = 0; i < T; i++) {
    float* row = s + int64_t(i) * Tp;
    float top = -INFINITY;
    bool any = false;
    for (int j = 0; j < T; j++) any |= visible(segs[j], j, i);
    for (int j = 0; j < T; j++) {  // masked keys weigh exactly 0 (as -10000 does in float32)
      row[j] = !any || visible(segs[j], j, i) ? row[j] / root : -INFINITY;
      top = std::max(top, row[j]);
    }
    totals[i] = softmax_exp(row, T, top);  // a query that sees no key: all of them, as the
    std::fill(row + T, row + Tp, 0.0f);    // reference's uniform -10000 gives
  }
  gemm_f32(isa, s, Tp, T, vp, Dp, Dp / kPanel, T, o, Dp);
  for (int i = 0; i < T; i++)
    for (int d = 0; d < D; d++) out[i * out_stride + d] = o[int64_t(i) * Dp + d] / totals[i];
}

// ---- the layers, shared by the decode step and prefill ----

// Working memory of a call: rows x (C, C, 3C, C, F) floats, reused across calls.
struct Work {
  float *x, *h, *qkv, *att, *ff;
};

Work work_for(const facert_lm* m, int rows) {
  static std::vector<float> buffer;
  const int64_t C = m->n_embd, F = m->n_ffn;
  float* base = scratch(buffer, rows * (6 * C + F));
  return {base, base + rows * C, base + rows * 2 * C, base + rows * 5 * C, base + rows * 6 * C};
}

// LayerNorm, qkv; then `attention` writes the cache and fills w.att.
template <typename Attention>
void attention_half(const facert_lm* m, const facert_layer& L, int rows, Work w,
                    Attention attention) {
  const int C = m->n_embd;
  layer_norm_rows(w.x, L.ln1_weight, L.ln1_bias, m->eps, C, rows, w.h);
  linear(L.qkv, w.h, rows, 0, 3 * C,
         [&](int b, int n, float v) { w.qkv[int64_t(b) * 3 * C + n] = v; });
  attention();
}

// proj and the MLP, onto the residual w.x.
void mlp_half(const facert_lm* m, const facert_layer& L, int rows, Work w) {
  const int C = m->n_embd, F = m->n_ffn;
  linear(L.proj, w.att, rows, 0, C, [&](int b, int n, float v) { w.x[int64_t(b) * C + n] += v; });
  layer_norm_rows(w.x, L.ln2_weight, L.ln2_bias, m->eps, C, rows, w.h);
  linear(L.fc, w.h, rows, 0, F, [&](int b, int n, float v) { w.ff[int64_t(b) * F + n] = v; });
  for_rows(rows, [&](int r0, int r1) {
    for (int r = r0; r < r1; r++) gelu_fast(w.ff + int64_t(r) * F, F);
  });
  linear(L.fc_proj, w.ff, rows, 0, C,
         [&](int b, int n, float v) { w.x[int64_t(b) * C + n] += v; });
}

}  // namespace

// Products at instruction-set level `level` (0 portable, 1 AVX2, 2 AVX-512 with VNNI) or the
// best this CPU has below it; returns the level in use. For tests: every level gives each pair
// the same arithmetic, so results are the same bits (float32 and int8).
FACERT_API int facert_decode_isa(int level) {
  requested_isa.store(std::max(0, std::min(int(kAvx512), level)));
  return product_isa();
}

// Allow (1) or forbid (0) the AVX512-VNNI int8 path (forbidden: the AVX2 level); returns
// whether int8 products use it now.
FACERT_API int facert_decode_vnni(int allow) {
  return facert_decode_isa(allow ? kAvx512 : kAvx2) == kAvx512;
}

// One decode step for `batch` rows, up to the final LayerNorm. Row b appends token tokens[b]
// (segment `decode_segment`) at position positions[b] of cache slot slots[b], attends to that
// slot's positions 0..pos, and gets its final hidden state in hidden (batch, n_embd); the
// logits are facert_head's. Each row's result is the same whatever the other rows of the call.
// k_cache, v_cache: (n_layer, num_slots, n_head, capacity, head_dim), float32, or half when
// kv_half_cache is 1.
// Returns 0, or 1 when an argument is out of range (nothing is written then).
namespace {
template <typename KV>
int decode_step(const facert_lm* m, KV* k_cache, KV* v_cache, int64_t num_slots,
                int64_t capacity, int32_t batch, const int64_t* tokens, const int64_t* positions,
                const int64_t* slots, float* hidden, int32_t threads) {
  const int C = m->n_embd, H = m->n_head, D = C / H, B = batch;
  if (B <= 0 || D > 256) return 1;
  for (int b = 0; b < B; b++)
    if (slots[b] < 0 || slots[b] >= num_slots || positions[b] < 0 || positions[b] >= capacity ||
        tokens[b] < 0 || tokens[b] >= m->head.out)
      return 1;
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));

  const Work w = work_for(m, B);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < C; i++)
      w.x[b * C + i] = (m->wte[tokens[b] * C + i] + m->wpe[positions[b] * C + i]) +
                       m->wse[int64_t(m->decode_segment) * C + i];

  const int64_t slot_stride = int64_t(H) * capacity * D;
  const int64_t layer_stride = num_slots * slot_stride;
  for (int l = 0; l < m->n_layer; l++) {
    KV* kl = k_cache + l * layer_stride;
    KV* vl = v_cache + l * layer_stride;
    attention_half(m, m->layers[l], B, w, [&] {
      // Write this position's keys/values, then attend over positions 0..pos of the slot.
      for (int b = 0; b < B; b++)
        for (int hd = 0; hd < H; hd++) {
          const int64_t at = slots[b] * slot_stride + (int64_t(hd) * capacity + positions[b]) * D;
          store_kv(&w.qkv[int64_t(b) * 3 * C + C + hd * D], D, kl + at);
          store_kv(&w.qkv[int64_t(b) * 3 * C + 2 * C + hd * D], D, vl + at);
        }
      pool().run(B * H, 1, [&](int begin, int end) {
        thread_local std::vector<float> scores;
        float* s = scratch(scores, capacity + 4);
        for (int task = begin; task < end; task++) {
          const int b = task / H, hd = task % H;
          const int64_t head = slots[b] * slot_stride + int64_t(hd) * capacity * D;
          attend(&w.qkv[int64_t(b) * 3 * C + hd * D], kl + head, vl + head,
                 int(positions[b]) + 1, D, s, &w.att[int64_t(b) * C + hd * D]);
        }
      });
    });
    mlp_half(m, m->layers[l], B, w);
  }
  layer_norm_rows(w.x, m->lnf_weight, m->lnf_bias, m->eps, C, B, hidden);
  return 0;
}
}  // namespace

FACERT_API int facert_decode_step(const facert_lm* m, void* k_cache, void* v_cache,
                                  int64_t num_slots, int64_t capacity, int32_t batch,
                                  const int64_t* tokens, const int64_t* positions,
                                  const int64_t* slots, float* hidden, int32_t threads,
                                  int32_t kv_half_cache) {
  return with_cache(k_cache, v_cache, kv_half_cache, [&](auto* k, auto* v) {
    return decode_step(m, k, v, num_slots, capacity, batch, tokens, positions, slots, hidden,
                       threads);
  });
}

// The head's rows [lo, hi) for `batch` final hidden states (batch, n_embd): logits (batch,
// hi - lo), each weight row read once for all of them. A decode step over one vocabulary window
// is facert_decode_step then this; rows of other windows take one call per window. A row's
// logits are the same whatever the other rows of the call and whatever the window (a logit is
// one pair's sum). Returns 0, or 1 when out of range.
FACERT_API int facert_head(const facert_lm* m, const float* hidden, int32_t batch, int32_t lo,
                           int32_t hi, float* logits, int32_t threads) {
  if (batch <= 0 || lo < 0 || hi > m->head.out || lo >= hi) return 1;
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));
  const int64_t W = hi - lo;
  linear(m->head, hidden, batch, lo, hi,
         [&](int b, int n, float v) { logits[b * W + n - lo] = v; });
  return 0;
}

// Prefill: `batch` prompts, prompt b of lengths[b] tokens (ids and segment ids concatenated
// prompt after prompt in ids, segs), at positions 0..lengths[b]-1 of cache slot slots[b]. Writes
// every position's keys/values into the cache and the final hidden state (after the final
// LayerNorm) of each prompt's last position into hidden (batch, n_embd). Attention is
// export/lm.py's prefix-LM mask. All positions of a group of prompts are the rows of the same
// products; a prompt's results never depend on the other prompts of the call.
// Returns 0, or 1 when an argument is out of range (nothing is written then).
namespace {
template <typename KV>
int prefill(const facert_lm* m, KV* k_cache, KV* v_cache, int64_t num_slots, int64_t capacity,
            int32_t batch, const int64_t* lengths, const int64_t* ids, const int64_t* segs,
            const int64_t* slots, float* hidden, int32_t threads) {
  const int C = m->n_embd, H = m->n_head, D = C / H;
  if (batch <= 0) return 1;
  std::vector<int64_t> start(batch + 1, 0);  // prompt b's tokens: [start[b], start[b + 1])
  for (int b = 0; b < batch; b++) {
    if (slots[b] < 0 || slots[b] >= num_slots || lengths[b] < 1 || lengths[b] > capacity)
      return 1;
    start[b + 1] = start[b] + lengths[b];
  }
  for (int64_t t = 0; t < start[batch]; t++)
    if (ids[t] < 0 || ids[t] >= m->head.out || segs[t] < 0 || segs[t] > 2) return 1;
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));
  const int isa = product_isa();
  const int64_t slot_stride = int64_t(H) * capacity * D;
  const int64_t layer_stride = num_slots * slot_stride;

  // Groups of prompts of up to ~1024 tokens (one longer prompt alone) bound the working memory;
  // past a few hundred rows the products are as fast as they get.
  constexpr int64_t kGroupTokens = 1024;
  for (int g0 = 0, g1; g0 < batch; g0 = g1) {
    for (g1 = g0 + 1; g1 < batch && start[g1 + 1] - start[g0] <= kGroupTokens;) g1++;
    const int64_t first = start[g0];
    const int rows = int(start[g1] - first);
    const Work w = work_for(m, rows);
    for (int b = g0; b < g1; b++)
      for (int64_t t = 0; t < lengths[b]; t++) {
        const int64_t r = start[b] + t - first, id = ids[start[b] + t], seg = segs[start[b] + t];
        for (int i = 0; i < C; i++)
          w.x[r * C + i] = (m->wte[id * C + i] + m->wpe[t * C + i]) + m->wse[seg * C + i];
      }
    for (int l = 0; l < m->n_layer; l++) {
      KV* kl = k_cache + l * layer_stride;
      KV* vl = v_cache + l * layer_stride;
      attention_half(m, m->layers[l], rows, w, [&] {
        pool().run((g1 - g0) * H, 1, [&](int begin, int end) {
          for (int task = begin; task < end; task++) {
            const int b = g0 + task / H, hd = task % H;
            const int T = int(lengths[b]);
            const float* q = w.qkv + (start[b] - first) * 3 * C + hd * D;  // (T, 3C) rows
            const int64_t head = slots[b] * slot_stride + int64_t(hd) * capacity * D;
            for (int t = 0; t < T; t++) {
              store_kv(q + int64_t(t) * 3 * C + C, D, kl + head + int64_t(t) * D);
              store_kv(q + int64_t(t) * 3 * C + 2 * C, D, vl + head + int64_t(t) * D);
            }
            attend_prompt(isa, q, q + C, q + 2 * C, 3 * C, segs + start[b], T, D,
                          w.att + (start[b] - first) * C + hd * D, C);
          }
        });
      });
      if (l + 1 < m->n_layer) {
        mlp_half(m, m->layers[l], rows, w);
        continue;
      }
      // The last layer: only each prompt's last position goes on (its keys/values are written),
      // moved to the front rows (b - g0 <= its own row: nothing is overwritten before it moves).
      for (int b = g0; b < g1; b++) {
        const int64_t last = start[b + 1] - 1 - first;
        std::copy_n(w.x + last * C, C, w.x + int64_t(b - g0) * C);
        std::copy_n(w.att + last * C, C, w.att + int64_t(b - g0) * C);
      }
      mlp_half(m, m->layers[l], g1 - g0, w);
    }
    for (int b = g0; b < g1; b++)
      layer_norm(w.x + int64_t(b - g0) * C, m->lnf_weight, m->lnf_bias, m->eps, C,
                 hidden + int64_t(b) * C);
  }
  return 0;
}
}  // namespace

FACERT_API int facert_prefill(const facert_lm* m, void* k_cache, void* v_cache,
                              int64_t num_slots, int64_t capacity, int32_t batch,
                              const int64_t* lengths, const int64_t* ids, const int64_t* segs,
                              const int64_t* slots, float* hidden, int32_t threads,
                              int32_t kv_half_cache) {
  return with_cache(k_cache, v_cache, kv_half_cache, [&](auto* k, auto* v) {
    return prefill(m, k, v, num_slots, capacity, batch, lengths, ids, segs, slots, hidden,
                   threads);
  });
}

// ---- packing weights at load time ----
//
// A matrix's rows reach facert_pack_f32 / facert_pack_int8 in blocks as they are read from the
// file (q, k and v are three parts of the qkv matrix), each call packing its rows into their
// places among the panels, a panel per thread at a time. The caller zeroes the panels, so
// padding stays zero.

namespace {

// Round to nearest, ties to even (numpy's rint) in the default rounding mode, for |v| <= 2^22:
// adding 1.5 * 2^23 leaves no fraction bits. No call to a libm function, so it vectorizes.
inline float round_even(float v) {
  constexpr float kShift = 12582912.0f;
  return (v + kShift) - kShift;
}

// Rows [first, last) of a matrix, row n from w + (n - row0) * K, into float32 panels `out`.
FACERT_CLONES
void pack_f32_rows(const float* w, int K, int row0, int first, int last, float* out) {
  for (int n = first; n < last; n++) {
    const float* src = w + int64_t(n - row0) * K;
    float* dst = out + int64_t(n / kPanel) * K * kPanel + n % kPanel;
    for (int k = 0; k < K; k++) dst[int64_t(k) * kPanel] = src[k];
  }
}

// max(a, b), NaN when either is (as numpy's max).
inline float nan_max(float a, float b) { return !(b <= a) ? b : a; }

// The same rows quantized as facert.kernels.decode.quantize_rows does, bit for bit: scale =
// max|w| / 127 (1 for a zero row), q = rint(w / scale) clipped to +-127 (NaN -> 0, as numpy's
// cast gives on x86 and ARM), into int8 panels `out`, with each row's scale and sum of q. Where
// max|w| is finite and the scale a normal float, |w / scale| <= 127 (1 + 2^-23) rounds to at most
// 127: no clipping, and the loop vectorizes; other rows take the careful loop.
FACERT_CLONES
void pack_int8_rows(const float* w, int K, int row0, int first, int last, int8_t* out,
                    float* scale, int32_t* row_sum) {
  constexpr float kNormal = 0x1p-119f;  // > 127 * 2^-126: the scale is a normal float
  const int K4 = round_up(K, 4);
  thread_local std::vector<int8_t> row;
  int8_t* q = scratch(row, K4);
  for (int n = first; n < last; n++) {
    const float* src = w + int64_t(n - row0) * K;
    float top[kPanel] = {};
    int k = 0;
    for (; k + kPanel <= K; k += kPanel)
      for (int j = 0; j < kPanel; j++) top[j] = nan_max(top[j], std::fabs(src[k + j]));
    float amax = 0.0f;
    for (; k < K; k++) amax = nan_max(amax, std::fabs(src[k]));
    for (int j = 0; j < kPanel; j++) amax = nan_max(amax, top[j]);
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    int32_t sum = 0;
    if (amax >= kNormal && amax <= std::numeric_limits<float>::max()) {
      for (k = 0; k < K; k++) {
        const int32_t v = int32_t(round_even(src[k] / s));
        sum += v;
        q[k] = int8_t(v);
      }
    } else {  // a zero, tiny, infinite or NaN row
      for (k = 0; k < K; k++) {
        const float v = src[k] / s;
        const int32_t c = v != v ? 0 : int32_t(round_even(std::min(127.0f, std::max(-127.0f, v))));
        sum += c;
        q[k] = int8_t(c);
      }
    }
    for (; k < K4; k++) q[k] = 0;
    int8_t* dst = out + int64_t(n / kPanel) * K4 * kPanel + (n % kPanel) * 4;
    for (k = 0; k < K4; k += 4) std::memcpy(dst + int64_t(k) * kPanel, q + k, 4);
    scale[n] = s;
    row_sum[n] = sum;
  }
}

// Runs pack(first, last) over rows [row0, row0 + rows) on the pool, a panel at a time.
template <typename Pack>
void for_panels(int rows, int row0, int threads, Pack pack) {
  std::lock_guard<std::mutex> lock(step_lock);
  pool().resize(std::max(1, threads));
  const int p0 = row0 / kPanel, p1 = (row0 + rows + kPanel - 1) / kPanel;
  pool().run(p1 - p0, 1, [&](int begin, int end) {
    pack(std::max(row0, (p0 + begin) * kPanel), std::min(row0 + rows, (p0 + end) * kPanel));
  });
}

}  // namespace

// Rows w (rows, K) float32 are rows [row0, row0 + rows) of a float32 matrix packed in panels
// (see facert_linear) at `out`, which the caller zeroed.
FACERT_API void facert_pack_f32(const float* w, int32_t rows, int32_t K, int32_t row0,
                                float* out, int32_t threads) {
  for_panels(rows, row0, threads,
             [&](int first, int last) { pack_f32_rows(w, K, row0, first, last, out); });
}

// Rows w (rows, K) float32, quantized per row to int8 (see pack_int8_rows), are rows
// [row0, row0 + rows) of an int8 matrix packed in panels at `out` (zeroed by the caller); their
// scales and sums of q go to scale[row0 + i] and row_sum[row0 + i].
FACERT_API void facert_pack_int8(const float* w, int32_t rows, int32_t K, int32_t row0,
                                 int8_t* out, float* scale, int32_t* row_sum, int32_t threads) {
  for_panels(rows, row0, threads, [&](int first, int last) {
    pack_int8_rows(w, K, row0, first, last, out, scale, row_sum);
  });
}
