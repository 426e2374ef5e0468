// Fused CPU sampling: temperature -> top-k -> softmax -> top-p -> inverse-CDF draw, one token per
// logit row. The uniform number of each row comes from the caller (a per-request Philox stream),
// so the kernel is deterministic and a GPU kernel can reproduce the same choice from the same u.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#define FACERT_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Top-p groups tokens by d = max - x (how many nats below the top token they are), so that only
// the one group the nucleus boundary falls in has to be sorted. Groups are 1/32 nat wide; all
// tokens more than 32 nats down (relative probability < 1.3e-14) share the last group.
constexpr int kBucketsPerNat = 32;
constexpr int kBucketSpan = 32;
constexpr int kBuckets = kBucketsPerNat * kBucketSpan + 1;

// Up to this k the k-th largest value comes from a size-k min-heap in one pass (on unsorted
// logits almost every element is rejected by one compare: ~35 us at V = 31546, k = 70); beyond it
// heap updates dominate and nth_element on a copy (~200 us) is cheaper.
constexpr int64_t kHeapMaxK = 256;

struct Cand {
  double w;        // exp(x - max): the unnormalised probability
  int32_t idx;     // vocabulary index
  int32_t bucket;  // top-p group of max - x
};

// The order in which top-p admits tokens: higher probability first, lower index on ties.
inline bool admitted_before(const Cand& a, const Cand& b) {
  return a.w > b.w || (a.w == b.w && a.idx < b.idx);
}

// NaN counts as masked and +inf as the largest float, so the max subtraction never meets inf - inf.
inline float sanitize(float x) {
  return std::isnan(x) ? -kInf : std::min(x, std::numeric_limits<float>::max());
}

// Per-thread buffers reused across rows and calls: no allocation once they have grown.
struct Scratch {
  std::vector<float> x;      // [vocab] scaled logits of the current row
  std::vector<float> sel;    // [k] or [vocab] top-k selection buffer
  std::vector<Cand> cand;    // [vocab] surviving tokens, vocabulary order
  std::vector<Cand> cut;     // tokens of the group the nucleus boundary falls in
  std::vector<double> mass;  // [kBuckets] unnormalised probability per group
};

// First index of the largest value; 0 when every value is masked.
int64_t argmax_first(const float* row, int64_t vocab) {
  int64_t best = 0;
  float best_x = -kInf;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = sanitize(row[i]);
    if (x > best_x) {
      best_x = x;
      best = i;
    }
  }
  return best;
}

// The k-th largest of x[0..n), duplicates counted (0 < k < n, no NaN).
float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& buf) {
  if (k > kHeapMaxK) {
    buf.assign(x, x + n);
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    return buf[k - 1];
  }
  // min-heap of the k largest values seen so far: its top is the running k-th largest
  buf.assign(x, x + k);
  std::make_heap(buf.begin(), buf.end(), std::greater<float>());
  for (int64_t i = k; i < n; ++i) {
    if (x[i] > buf.front()) {
      std::pop_heap(buf.begin(), buf.end(), std::greater<float>());
      buf.back() = x[i];
      std::push_heap(buf.begin(), buf.end(), std::greater<float>());
    }
  }
  return buf.front();
}

// Restricts c[0..n) (vocabulary order) to the top-p nucleus in place and returns its size. A token
// is kept iff the mass admitted before it is <= limit (= top_p * total), so the first always is.
size_t keep_nucleus(Cand* c, size_t n, double limit, Scratch& s) {
  s.mass.assign(kBuckets, 0.0);
  for (size_t i = 0; i < n; ++i) s.mass[c[i].bucket] += c[i].w;
  // Whole groups above the boundary group are kept, groups below it removed.
  double before = 0.0;
  int cut_bucket = 0;
  while (before + s.mass[cut_bucket] <= limit) {
    before += s.mass[cut_bucket];
    if (++cut_bucket == kBuckets) return n;  // rounding let every group in
  }
  s.cut.clear();
  for (size_t i = 0; i < n; ++i) {
    if (c[i].bucket == cut_bucket) s.cut.push_back(c[i]);
  }
  // Usually a handful of tokens; only near-flat rows (many equal logits) make this group large,
  // and then the sort dominates (~1.5 ms for 31546 equal logits).
  std::sort(s.cut.begin(), s.cut.end(), admitted_before);
  size_t admitted = 0;  // >= 1: the loop above left before <= limit
  while (admitted < s.cut.size() && before <= limit) before += s.cut[admitted++].w;
  const Cand last = s.cut[admitted - 1];

  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool in = c[i].bucket < cut_bucket ||
                    (c[i].bucket == cut_bucket && !admitted_before(last, c[i]));
    if (in) c[kept++] = c[i];
  }
  return kept;
}

int64_t sample_row(const float* row, int64_t vocab, float temperature, int32_t top_k, float top_p,
                   float uniform, Scratch& s) {
  if (!(temperature > 0.0f)) return argmax_first(row, vocab);

  s.x.resize(vocab);
  float* x = s.x.data();  // [vocab]
  float max_x = -kInf;
  for (int64_t i = 0; i < vocab; ++i) {
    x[i] = sanitize(row[i] / temperature);
    max_x = std::max(max_x, x[i]);
  }
  if (max_x == -kInf) return 0;  // every token masked: same answer as greedy

  // Top-k is a value threshold, so tokens tied with the k-th value all survive.
  float threshold = -kInf;
  if (top_k > 0 && top_k < vocab) threshold = kth_largest(x, vocab, top_k, s.sel);

  s.cand.resize(vocab);
  Cand* c = s.cand.data();  // [n] survivors with their softmax numerators
  size_t n = 0;
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (x[i] == -kInf || x[i] < threshold) continue;
    const double d = double(max_x) - double(x[i]);
    const double w = std::exp(-d);
    const int32_t bucket = d < kBucketSpan ? int32_t(d * kBucketsPerNat) : kBuckets - 1;
    c[n++] = {w, int32_t(i), bucket};
    total += w;
  }
  if (top_p > 0.0f && top_p < 1.0f) n = keep_nucleus(c, n, double(top_p) * total, s);

  // Inverse CDF in vocabulary order, compared unnormalised: the walk sums in the same order as
  // `kept`, so it reaches kept exactly and any u < 1 lands on a token. Zero-mass tokens (exp
  // underflow) can never be the one that crosses the target; for u >= 1 the last token with
  // non-zero mass is returned.
  double kept = 0.0;
  for (size_t i = 0; i < n; ++i) kept += c[i].w;
  const double target = (uniform > 0.0f ? double(uniform) : 0.0) * kept;
  int64_t token = c[0].idx;
  double cum = 0.0;
  for (size_t i = 0; i < n && cum <= target; ++i) {
    if (c[i].w > 0.0) token = c[i].idx;
    cum += c[i].w;
  }
  return token;
}

}  // namespace

FACERT_API int facert_abi_version() { return 1; }

// logits [rows, vocab] row-major; temperature, top_k, top_p, uniform, out_tokens [rows].
// Requires 1 <= vocab < 2^31. temperature <= 0 (or NaN) is greedy; top_k outside (0, vocab) and
// top_p outside (0, 1) are off. NaN logits are masked like -inf, +inf counts as the largest float;
// a row with every token masked yields token 0. u below 0 (or NaN) acts as 0, u >= 1 yields the
// last kept token with non-zero probability.
FACERT_API void facert_sample(const float* logits, int64_t rows, int64_t vocab,
                              const float* temperature, const int32_t* top_k, const float* top_p,
                              const float* uniform, int64_t* out_tokens) {
  thread_local Scratch scratch;
  for (int64_t r = 0; r < rows; ++r) {
    out_tokens[r] = sample_row(logits + r * vocab, vocab, temperature[r], top_k[r], top_p[r],
                               uniform[r], scratch);
  }
}
