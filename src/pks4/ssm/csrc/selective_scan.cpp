// Fused sequential selective scan for the CPU (Mamba-1 recurrence, Gu & Dao 2023, eq. 2a-2b):
//   h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t * u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t * silu(z_t).
//
// The cost is one exp per (batch, channel, step, state). The vector lanes run across W neighbouring channels
// of one batch element, not across the d_state lanes: B_t and C_t are shared by those channels, so every
// state update, the sum y_t = C_t . h_t and exp(dt_t * A) are full-width vertical operations, with no
// horizontal sum per step. The exp is inlined (a library call at every step would spill the state).
// Time is cut into segments of `seg` steps whose per-step inputs are transposed (8x8 blocks) to step-major
// tiles that stay in cache; softplus, sigmoid and the gate are computed on those tiles, also inline.
// When gradients are wanted, the forward pass also stores the state at each segment start (1/seg of the
// states); the backward pass then recomputes one segment at a time from its checkpoint, keeping the segment's
// states and decays exp(dt A) for the reverse sweep, so each exp is evaluated twice in all, never three
// times, and nothing of size rows x steps x states is stored.
// Layouts (all contiguous): u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, N, L), copied inside
// to Bt, Ct: (batch, L, N) so that a step's N values are adjacent; D, bias: (dim); last state: (batch, dim, N);
// checkpoints: (batch, dim, ceil(L / seg) - 1, N).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <thread>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = v8f;
  static constexpr int W = 8;
};
template <>
struct Lanes<double> {
  using V = v4d;
  static constexpr int W = 4;
};

// Hide a value from the optimiser: -ffast-math would otherwise simplify (t + M) - M back to t.
inline void opaque(v8f &v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#else
  __asm__("" : : "r"(&v) : "memory");
#endif
}

// exp on 8 float lanes: x = k ln2 + r with |r| <= ln2 / 2, exp(r) = 1 + r + r^2 P(r) with P of degree 4
// (a minimax fit, 5e-9 from exp on that interval), times 2^k through the exponent bits. k is rounded by adding
// 1.5 * 2^23: the sum's low mantissa bits are then k + 127, ready to shift into an exponent. Measured: at most
// 1.2e-7 relative error on [-20, 0], 3e-7 on [-87, 88]. Inputs are clamped to [-87.3, 88.3]: exp(-87.3) ~ 1e-38
// stands in for underflow, which moves no sum by a float ulp. clamp = false skips that, for callers that know
// their arguments lie in that range (two of the ~18 operations).
template <bool clamp = true>
inline v8f vexp(v8f x) {
  const v8f lo = v8f{} - 87.3f, hi = v8f{} + 88.3f, magic = v8f{} + (12582912.0f + 127.0f);
  if (clamp) {
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
  }
  v8f t = x * 1.44269504088896341f + magic;
  opaque(t);
  const v8f kf = t - magic, r = x - kf * 0.693147180559945f;
  v8f p = v8f{} + 1.3872283744e-3f;
  p = p * r + 8.3686923608e-3f;
  p = p * r + 4.1667357087e-2f;
  p = p * r + 1.6666521132e-1f;
  p = p * r + 4.9999997020e-1f;
  p = p * r * r + r + 1.0f;
  return p * (v8f)((v8i)t << 23);
}

// log(1 + e) on 8 float lanes for e in [0, 1]: u = 1 + e is split as m 2^k with m in [sqrt(1/2), sqrt(2)),
// log(m) from the Cephes logf polynomial in m - 1, plus (e - (u - 1)) / u, the first-order correction for the
// rounding of 1 + e, which keeps small e exact.
inline v8f vlog1p_unit(v8f e) {
  v8f u = e + 1.0f;
  opaque(u);
  const v8f corr = (e - (u - 1.0f)) / u;
  const v8i big = u > 1.41421356f;
  const v8f m = big ? u * 0.5f : u, kf = big ? v8f{} + 1.0f : v8f{}, f = m - 1.0f, f2 = f * f;
  v8f p = v8f{} + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const v8f y = p * f2 * f + kf * -2.12194440e-4f - 0.5f * f2;
  return f + y + kf * 0.693359375f + corr;
}

// Double lanes are for gradient checks, not speed: library functions keep them exact to the last bit.
template <bool clamp = true>
inline v4d vexp(v4d x) {
  for (int c = 0; c < 4; ++c) x[c] = std::exp(x[c]);
  return x;
}

inline v4d vlog1p_unit(v4d e) {
  for (int c = 0; c < 4; ++c) e[c] = std::log1p(e[c]);
  return e;
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)), the step size of Mamba's dt projection; sig gets its
// derivative sigmoid(x) from the same exp.
template <typename V>
inline V vsoftplus(V x, V &sig) {
  const V zero{}, one = zero + 1, pos = x > zero ? x : zero, e = vexp(x - pos - pos);  // exp(-|x|)
  sig = (x > zero ? one : e) / (one + e);
  return pos + vlog1p_unit(e);
}

template <typename V>
inline V vsigmoid(V x) {
  return 1 / (1 + vexp(-x));
}

// Rows <-> step-major tiles: tile[i] holds step i of the W rows r[0..W-1] (each K long). With AVX, blocks of
// 8 steps move as 8x8 transposes (24 shuffles for 64 values instead of one insert or extract per value).
#if defined(__AVX__)
inline void transpose8(__m256 &r0, __m256 &r1, __m256 &r2, __m256 &r3, __m256 &r4, __m256 &r5, __m256 &r6,
                       __m256 &r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

inline void to_tile(const float *const *r, int64_t K, v8f *tile) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= K; i += 8) {
    __m256 v[8];
    for (int c = 0; c < 8; ++c) v[c] = _mm256_loadu_ps(r[c] + i);
    transpose8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
    for (int j = 0; j < 8; ++j) tile[i + j] = v[j];
  }
#endif
  for (; i < K; ++i) tile[i] = v8f{r[0][i], r[1][i], r[2][i], r[3][i], r[4][i], r[5][i], r[6][i], r[7][i]};
}

inline void from_tile(const v8f *tile, int64_t K, float *const *r) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= K; i += 8) {
    __m256 v[8];
    for (int j = 0; j < 8; ++j) v[j] = tile[i + j];
    transpose8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(r[c] + i, v[c]);
  }
#endif
  for (; i < K; ++i)
    for (int c = 0; c < 8; ++c) r[c][i] = tile[i][c];
}

inline void to_tile(const double *const *r, int64_t K, v4d *tile) {
  for (int64_t i = 0; i < K; ++i) tile[i] = v4d{r[0][i], r[1][i], r[2][i], r[3][i]};
}

inline void from_tile(const v4d *tile, int64_t K, double *const *r) {
  for (int64_t i = 0; i < K; ++i)
    for (int c = 0; c < 4; ++c) r[c][i] = tile[i][c];
}

// dst[n] += sum of the lanes of v[n], for n < N. With AVX, eight vectors are reduced at once by a
// transpose-and-add tree (7 adds for 8 sums instead of 8 separate horizontal sums).
inline void add_lane_sums(const v8f *v, int64_t N, float *dst) {
  int64_t n = 0;
#if defined(__AVX__)
  for (; n + 8 <= N; n += 8) {
    const __m256 a = _mm256_hadd_ps(v[n], v[n + 1]), b = _mm256_hadd_ps(v[n + 2], v[n + 3]);
    const __m256 c = _mm256_hadd_ps(v[n + 4], v[n + 5]), d = _mm256_hadd_ps(v[n + 6], v[n + 7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
    _mm256_storeu_ps(dst + n, _mm256_add_ps(_mm256_loadu_ps(dst + n), s));
  }
#endif
  for (; n < N; ++n) {
    float s = 0.f;
    for (int c = 0; c < 8; ++c) s += v[n][c];
    dst[n] += s;
  }
}

inline void add_lane_sums(const v4d *v, int64_t N, double *dst) {
  for (int64_t n = 0; n < N; ++n) dst[n] += (v[n][0] + v[n][1]) + (v[n][2] + v[n][3]);
}

struct Shape {
  int64_t batch, dim, L, N, seg;
  int64_t segments() const { return (L + seg - 1) / seg; }
};

template <typename T>
struct Inputs {
  const T *u, *delta, *A, *Bt, *Ct, *D, *z, *bias;
  int softplus;
};

// W neighbouring channels [d0, d0 + nc) of batch element b; lanes nc..W-1 are padding (zero step, zero input).
struct Block {
  int64_t b, d0, nc, row0;
};

template <typename T>
Block block_at(const Shape &s, int64_t k) {
  constexpr int W = Lanes<T>::W;
  const int64_t per_batch = (s.dim + W - 1) / W, b = k / per_batch, d0 = (k % per_batch) * W;
  return Block{b, d0, std::min<int64_t>(W, s.dim - d0), b * s.dim + d0};
}

template <typename T>
int64_t block_count(const Shape &s) {
  return s.batch * ((s.dim + Lanes<T>::W - 1) / Lanes<T>::W);
}

// Outputs are fresh, untouched allocations: asking for transparent huge pages before the first write turns
// ~500 page faults per 2 MiB into one. Measured on these VMs: a win for outputs of tens of MiB (kernel time per
// fwd+bwd at batch 2 x 768 x 3137: 0.6 -> 0.25 ns per element), a loss for 300 MiB ones (0.7 -> 1.5 ns), where
// the host has to back each fresh 2 MiB page; hence the size cap. Only whole 2 MiB pages are advised.
inline void prefer_huge_pages(void *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
  if (p && end > begin && bytes <= (size_t(64) << 20))
    madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Work is cut into `units` equal contiguous ranges of [0, items), handed out one at a time to up to `nthreads`
// threads (a thread slowed by other processes simply takes fewer). Each thread runs worker(take);
// take(unit, begin, end) returns false once every unit is handed out. Results must depend on the unit only,
// never on the thread that ran it: then they depend neither on timing nor on the thread count.
template <typename F>
void parallel_units(int64_t items, int64_t units, int nthreads, F worker) {
  std::atomic<int64_t> next{0};
  auto take = [&](int64_t &u, int64_t &begin, int64_t &end) {
    u = next.fetch_add(1);
    begin = items * u / units;
    end = items * (u + 1) / units;
    return u < units;
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < std::min<int64_t>(units, nthreads); ++i) pool.emplace_back([&] { worker(take); });
  worker(take);
  for (auto &t : pool) t.join();
}

// Backward units: a fixed count, so that the order of the partial sums of dA, dB, dC, dD and dbias (and so the
// result, to the last bit) is the same whatever the thread count; 16 balance 2-8 threads well enough.
constexpr int64_t kBackwardUnits = 16, kForwardUnits = 64;

// Per-thread scratch: step-major tiles of one segment (one vector of W channels per step: dt, dt u, u,
// softplus', pre-gate y, gate-side gradient gy, the reverse sweep's sums, two temporaries), the segment's
// states H and decays dA, and the block's lanes: per-state vectors (segment start h0, A, running h and its
// adjoint gh, dA sums, dB/dC terms) and per-channel constants.
template <typename T>
struct Work {
  using V = typename Lanes<T>::V;
  std::vector<V> dt, du, uu, sig, y, gy, sB, sdt, t1, t2, H, dA, h0, a, h, gh, dAacc, dl;
  std::vector<T> zeros, sink;  // stand-in rows for padding lanes: read as zeros, written and ignored
  V bias{}, Dv{};
  Work(const Shape &s)
      : dt(s.seg), du(s.seg), uu(s.seg), sig(s.seg), y(s.seg), gy(s.seg), sB(s.seg), sdt(s.seg), t1(s.seg),
        t2(s.seg), H(s.seg * s.N), dA(s.seg * s.N), h0(s.N), a(s.N), h(s.N), gh(s.N), dAacc(s.N), dl(2 * s.N),
        zeros(s.seg), sink(s.seg) {}
};

// Steps [t0, t0 + K) of the block's rows of a (rows, L) array as a tile; padding lanes read zeros.
template <typename T>
inline void load_tile(const T *base, const Block &k, const Shape &s, int64_t t0, int64_t K, Work<T> &w,
                      typename Lanes<T>::V *tile) {
  const T *r[Lanes<T>::W];
  for (int c = 0; c < Lanes<T>::W; ++c) r[c] = c < k.nc ? base + (k.row0 + c) * s.L + t0 : w.zeros.data();
  to_tile(r, K, tile);
}

// A tile back into steps [t0, t0 + K) of the block's rows; padding lanes go to a scratch row.
template <typename T>
inline void store_tile(const typename Lanes<T>::V *tile, const Block &k, const Shape &s, int64_t t0, int64_t K,
                       Work<T> &w, T *base) {
  T *r[Lanes<T>::W];
  for (int c = 0; c < Lanes<T>::W; ++c) r[c] = c < k.nc ? base + (k.row0 + c) * s.L + t0 : w.sink.data();
  from_tile(tile, K, r);
}

// dt (softplus(delta + bias), or delta + bias), u and dt * u for steps [t0, t0 + K) of a block as tiles, and
// with want_sig softplus'(delta + bias) for the backward pass.
template <typename T, bool want_sig>
void load_steps(const Inputs<T> &in, const Shape &s, const Block &k, int64_t t0, int64_t K, Work<T> &w) {
  using V = typename Lanes<T>::V;
  load_tile(in.delta, k, s, t0, K, w, w.dt.data());
  load_tile(in.u, k, s, t0, K, w, w.uu.data());
  for (int64_t i = 0; i < K; ++i) {
    const V x = w.dt[i] + w.bias;
    V dt = x, sig = V{} + T(1);
    if (in.softplus) dt = vsoftplus(x, sig);
    w.dt[i] = dt;
    w.du[i] = dt * w.uu[i];
    if (want_sig) w.sig[i] = sig;
  }
}

// The block's per-channel lanes: A's rows as N vectors, delta_bias and D (zero on padding lanes).
template <typename T>
void load_channels(const Inputs<T> &in, const Shape &s, const Block &k, Work<T> &w) {
  for (int c = 0; c < Lanes<T>::W; ++c) {
    const bool real = c < k.nc;
    for (int64_t n = 0; n < s.N; ++n) w.a[n][c] = real ? in.A[(k.d0 + c) * s.N + n] : T(0);
    w.bias[c] = real && in.bias ? in.bias[k.d0 + c] : T(0);
    w.Dv[c] = real && in.D ? in.D[k.d0 + c] : T(0);
  }
}

// State `h` (N vectors) <-> rows of a (rows, stride) array at offset `at`, for the block's real lanes.
template <typename T, typename V>
void store_state(const V *h, const Block &k, int64_t N, T *dst, int64_t stride, int64_t at) {
  for (int64_t c = 0; c < k.nc; ++c)
    for (int64_t n = 0; n < N; ++n) dst[(k.row0 + c) * stride + at + n] = h[n][c];
}

template <typename T, typename V>
void load_state(V *h, const Block &k, int64_t N, const T *src, int64_t stride, int64_t at) {
  for (int64_t n = 0; n < N; ++n) h[n] = V{};
  if (src)
    for (int64_t c = 0; c < k.nc; ++c)
      for (int64_t n = 0; n < N; ++n) h[n][c] = src[(k.row0 + c) * stride + at + n];
}

// The step loops keep their per-lane state in local arrays when N is a compile-time constant: unlike the
// heap scratch, the compiler knows that stores to outputs cannot change them.
template <typename V, int NC>
struct Local {
  V v[NC > 0 ? NC : 1];
  V *bind(std::vector<V> &heap) {
    if (NC == 0) return heap.data();
    std::copy(heap.begin(), heap.begin() + NC, v);
    return v;
  }
  void back(std::vector<V> &heap) const {
    if (NC > 0) std::copy(v, v + NC, heap.begin());
  }
};

// Whether every exp argument dt * A of the segment's K steps lies in [-87, 88], where vexp needs no clamp:
// true for any usual Mamba (A < 0, dt of order 1e-3..1), checked from the extremes of dt and A in each lane.
template <typename T>
bool exp_args_in_range(const Work<T> &w, int64_t N, int64_t K) {
  using V = typename Lanes<T>::V;
  V dlo = w.dt[0], dhi = w.dt[0], alo = w.a[0], ahi = w.a[0];
  for (int64_t i = 1; i < K; ++i) {
    dlo = w.dt[i] < dlo ? w.dt[i] : dlo;
    dhi = w.dt[i] > dhi ? w.dt[i] : dhi;
  }
  for (int64_t n = 1; n < N; ++n) {
    alo = w.a[n] < alo ? w.a[n] : alo;
    ahi = w.a[n] > ahi ? w.a[n] : ahi;
  }
  for (int c = 0; c < Lanes<T>::W; ++c)
    for (const T x : {dlo[c] * alo[c], dlo[c] * ahi[c], dhi[c] * alo[c], dhi[c] * ahi[c]})
      if (!(x >= T(-87) && x <= T(88))) return false;
  return true;
}

// K steps of eq. 2a-2b on the W lanes from state w.h: y[i] = C_t . h_t. With keep, also every h_t (H) and
// decay exp(dt A) (dA) for the reverse sweep. NC = N fixed at compile time (16) or 0 (read from s.N).
template <typename T, int NC, bool keep, bool clamp>
void scan_steps(const Shape &s, const T *Bt, const T *Ct, int64_t K, Work<T> &w) {
  using V = typename Lanes<T>::V;
  const int64_t N = NC > 0 ? NC : s.N;
  Local<V, NC> hl, al;
  V *h = hl.bind(w.h), *a = al.bind(w.a), *H = w.H.data(), *dA = w.dA.data();
  for (int64_t i = 0; i < K; ++i) {
    const T *Bv = Bt + i * N, *Cv = Ct + i * N;
    const V dt = w.dt[i], du = w.du[i];
    V y0{}, y1{};  // two sums halve the chain of dependent adds
#pragma GCC unroll 16
    for (int64_t n = 0; n < N; ++n) {
      const V decay = vexp<clamp>(dt * a[n]);
      h[n] = decay * h[n] + du * Bv[n];
      (n % 2 ? y1 : y0) += h[n] * Cv[n];
      if (keep) {
        H[i * N + n] = h[n];
        dA[i * N + n] = decay;
      }
    }
    w.y[i] = y0 + y1;
  }
  hl.back(w.h);
}

// out = (y + D u) * silu(z) for the block's rows, steps [t0, t0 + K).
template <typename T>
void write_out(const Inputs<T> &in, const Shape &s, const Block &k, int64_t t0, int64_t K, Work<T> &w, T *out) {
  using V = typename Lanes<T>::V;
  V *z = w.t1.data(), *o = w.t2.data();
  if (in.z) load_tile(in.z, k, s, t0, K, w, z);
  for (int64_t i = 0; i < K; ++i) {
    o[i] = w.y[i] + w.Dv * w.uu[i];
    if (in.z) o[i] *= z[i] * vsigmoid(z[i]);
  }
  store_tile(o, k, s, t0, K, w, out);
}

template <typename T, int NC>
void forward_block(const Inputs<T> &in, const Shape &s, const Block &k, Work<T> &w, T *out, T *last, T *ckpt) {
  const int64_t N = s.N, L = s.L, nck = s.segments() - 1;
  load_channels(in, s, k, w);
  load_state<T>(w.h.data(), k, N, nullptr, 0, 0);
  for (int64_t g = 0, t0 = 0; t0 < L; ++g, t0 += s.seg) {
    const int64_t K = std::min(s.seg, L - t0);
    if (ckpt && g > 0) store_state(w.h.data(), k, N, ckpt, nck * N, (g - 1) * N);
    load_steps<T, false>(in, s, k, t0, K, w);
    const int64_t bt = (k.b * L + t0) * N;
    if (exp_args_in_range(w, N, K)) scan_steps<T, NC, false, false>(s, in.Bt + bt, in.Ct + bt, K, w);
    else scan_steps<T, NC, false, true>(s, in.Bt + bt, in.Ct + bt, K, w);
    write_out(in, s, k, t0, K, w, out);
  }
  if (last) store_state(w.h.data(), k, N, last, N, 0);
}

template <typename T>
struct Grads {
  const T *dout, *dlast;
  T *du, *ddelta, *dz;           // (batch, dim, L), written row by row
  T *dBt, *dCt;                  // (batch, L, N), zeroed
  std::vector<T> dA, dD, dbias;  // per unit partial sums: (units, dim, N), (units, dim)
  std::vector<T> edge;           // per unit dB, dC of its first and last batch: (units, 2, 2, L, N)
};

// Gate gradients for steps [t0, t0 + K): gy = dout * silu(z) into the tile, dz = dout * y * silu'(z) to dz.
template <typename T>
void gate_grads(const Inputs<T> &in, const Shape &s, const Block &k, int64_t t0, int64_t K, Work<T> &w,
                const Grads<T> &g) {
  using V = typename Lanes<T>::V;
  V *z = w.t1.data(), *dz = w.t2.data();
  load_tile(g.dout, k, s, t0, K, w, w.gy.data());
  if (!in.z) return;
  load_tile(in.z, k, s, t0, K, w, z);
  for (int64_t i = 0; i < K; ++i) {
    const V sg = vsigmoid(z[i]), dout = w.gy[i];
    dz[i] = dout * (w.y[i] + w.Dv * w.uu[i]) * sg * (1 + z[i] * (1 - sg));
    w.gy[i] = dout * z[i] * sg;
  }
  store_tile(dz, k, s, t0, K, w, g.dz);
}

// Reverse sweep over one segment. gh carries dLoss/dh_t back through h_t = dA_t h_{t-1} + dt_t B_t u_t;
// per step it leaves sum_n gh B (-> du, ddelta) and the adjoint of dt through the exp (sdt) in tiles, and adds
// the channel sums of dB, dC to this batch element's (L, N) accumulators.
template <typename T, int NC>
void reverse_steps(const Shape &s, const T *Bt, const T *Ct, int64_t K, Work<T> &w, T *dB, T *dC) {
  using V = typename Lanes<T>::V;
  const int64_t N = NC > 0 ? NC : s.N;
  V *__restrict gh = w.gh.data(), *__restrict dAacc = w.dAacc.data();
  const V *__restrict a = w.a.data(), *H = w.H.data(), *dA = w.dA.data();
  V *__restrict dl = w.dl.data(), *__restrict dBl = dl, *__restrict dCl = dl + N;
  for (int64_t i = K - 1; i >= 0; --i) {
    const T *Bv = Bt + i * N, *Cv = Ct + i * N;
    const V *Hp = i > 0 ? H + (i - 1) * N : w.h0.data(), *Hc = H + i * N, *dAi = dA + i * N;
    const V gy = w.gy[i], dt = w.dt[i], du = w.du[i];
    V sB0{}, sB1{}, sdt0{}, sdt1{};
#pragma GCC unroll 16
    for (int64_t n = 0; n < N; ++n) {
      const V ghn = gh[n] + gy * Cv[n], g = ghn * dAi[n];
      const V x = g * Hp[n];  // adjoint of the exp argument dt * A[n]
      dCl[n] = gy * Hc[n];
      dBl[n] = ghn * du;
      (n % 2 ? sB1 : sB0) += ghn * Bv[n];
      (n % 2 ? sdt1 : sdt0) += x * a[n];
      dAacc[n] += x * dt;
      gh[n] = g;
    }
    w.sB[i] = sB0 + sB1;
    w.sdt[i] = sdt0 + sdt1;
    add_lane_sums(dBl, N, dB + i * N);
    add_lane_sums(dCl, N, dC + i * N);
  }
}

// du, ddelta (through softplus) rows for steps [t0, t0 + K); per-channel sums for dD and dbias.
template <typename T>
void write_input_grads(const Shape &s, const Block &k, int64_t t0, int64_t K, Work<T> &w, Grads<T> &g, T *dD,
                       T *dbias) {
  using V = typename Lanes<T>::V;
  V *du = w.t1.data(), *dd = w.t2.data(), dDsum{}, dbsum{};
  for (int64_t i = 0; i < K; ++i) {
    du[i] = w.dt[i] * w.sB[i] + w.gy[i] * w.Dv;
    dd[i] = (w.sdt[i] + w.sB[i] * w.uu[i]) * w.sig[i];  // dLoss/d dt, then through softplus
    dDsum += w.gy[i] * w.uu[i];
    dbsum += dd[i];
  }
  store_tile(du, k, s, t0, K, w, g.du);
  store_tile(dd, k, s, t0, K, w, g.ddelta);
  for (int64_t c = 0; c < k.nc; ++c) {
    dD[k.d0 + c] += dDsum[c];
    dbias[k.d0 + c] += dbsum[c];
  }
}

// Backward of one block, segments last to first, each recomputed from its checkpoint.
template <typename T, int NC>
void backward_block(const Inputs<T> &in, const Shape &s, const Block &k, Work<T> &w, Grads<T> &g,
                    const T *ckpt, T *dB, T *dC, T *dA, T *dD, T *dbias) {
  using V = typename Lanes<T>::V;
  const int64_t N = s.N, L = s.L, nck = s.segments() - 1;
  load_channels(in, s, k, w);
  load_state(w.gh.data(), k, N, g.dlast, N, 0);
  std::fill(w.dAacc.begin(), w.dAacc.end(), V{});
  for (int64_t sg = nck; sg >= 0; --sg) {
    const int64_t t0 = sg * s.seg, K = std::min(s.seg, L - t0), bt = (k.b * L + t0) * N;
    load_state(w.h0.data(), k, N, sg > 0 ? ckpt : nullptr, nck * N, (sg - 1) * N);
    std::copy(w.h0.begin(), w.h0.end(), w.h.begin());
    load_steps<T, true>(in, s, k, t0, K, w);
    if (exp_args_in_range(w, N, K)) scan_steps<T, NC, true, false>(s, in.Bt + bt, in.Ct + bt, K, w);
    else scan_steps<T, NC, true, true>(s, in.Bt + bt, in.Ct + bt, K, w);
    gate_grads(in, s, k, t0, K, w, g);
    reverse_steps<T, NC>(s, in.Bt + bt, in.Ct + bt, K, w, dB + t0 * N, dC + t0 * N);
    write_input_grads(s, k, t0, K, w, g, dD, dbias);
  }
  for (int64_t c = 0; c < k.nc; ++c)
    for (int64_t n = 0; n < N; ++n) dA[(k.d0 + c) * N + n] += w.dAacc[n][c];
}

// One unit of the backward pass: blocks [k0, k1), partial sums into the unit's own slots.
template <typename T, int NC>
void backward_unit(const Inputs<T> &in, const Shape &s, const T *ckpt, int64_t u, int64_t k0, int64_t k1,
                   Work<T> &w, Grads<T> &g) {
  const int64_t LN = s.L * s.N;
  const int64_t b_first = block_at<T>(s, k0).b, b_last = block_at<T>(s, k1 - 1).b;
  T *edge = g.edge.data() + u * 4 * LN;  // [first dB, first dC, last dB, last dC]
  for (int64_t i = k0; i < k1; ++i) {
    const Block k = block_at<T>(s, i);
    T *dB = g.dBt + k.b * LN, *dC = g.dCt + k.b * LN;  // batch elements inside the unit belong to it alone
    if (k.b == b_first) {
      dB = edge;
      dC = edge + LN;
    } else if (k.b == b_last) {
      dB = edge + 2 * LN;
      dC = edge + 3 * LN;
    }
    backward_block<T, NC>(in, s, k, w, g, ckpt, dB, dC, g.dA.data() + u * s.dim * s.N, g.dD.data() + u * s.dim,
                          g.dbias.data() + u * s.dim);
  }
}

// Fold the per-unit partial sums in unit order.
template <typename T>
void fold_units(const Shape &s, int64_t units, Grads<T> &g, T *dA, T *dD, T *dbias) {
  const int64_t LN = s.L * s.N, blocks = block_count<T>(s);
  std::fill(dA, dA + s.dim * s.N, T(0));
  std::fill(dD, dD + s.dim, T(0));
  std::fill(dbias, dbias + s.dim, T(0));
  for (int64_t u = 0; u < units; ++u) {
    const int64_t bf = block_at<T>(s, blocks * u / units).b, bl = block_at<T>(s, blocks * (u + 1) / units - 1).b;
    const T *edge = g.edge.data() + u * 4 * LN;
    for (int64_t i = 0; i < LN; ++i) {
      g.dBt[bf * LN + i] += edge[i];
      g.dCt[bf * LN + i] += edge[LN + i];
      if (bl != bf) {
        g.dBt[bl * LN + i] += edge[2 * LN + i];
        g.dCt[bl * LN + i] += edge[3 * LN + i];
      }
    }
    for (int64_t i = 0; i < s.dim * s.N; ++i) dA[i] += g.dA[u * s.dim * s.N + i];
    for (int64_t i = 0; i < s.dim; ++i) {
      dD[i] += g.dD[u * s.dim + i];
      dbias[i] += g.dbias[u * s.dim + i];
    }
  }
}

template <typename T, int NC>
void backward_all(const Inputs<T> &in, const Shape &s, const T *ckpt, Grads<T> &g, T *dA, T *dD, T *dbias,
                  int nthreads) {
  const int64_t blocks = block_count<T>(s), units = std::min(blocks, kBackwardUnits), LN = s.L * s.N;
  g.dA.assign(units * s.dim * s.N, T(0));
  g.dD.assign(units * s.dim, T(0));
  g.dbias.assign(units * s.dim, T(0));
  g.edge.assign(units * 4 * LN, T(0));
  parallel_units(blocks, units, nthreads, [&](auto take) {
    Work<T> w(s);
    for (int64_t u, k0, k1; take(u, k0, k1);) backward_unit<T, NC>(in, s, ckpt, u, k0, k1, w, g);
  });
  fold_units(s, units, g, dA, dD, dbias);
}

template <typename T>
void forward_all(const Inputs<T> &in, const Shape &s, T *out, T *last, T *ckpt, int nthreads) {
  const int64_t blocks = block_count<T>(s);
  parallel_units(blocks, std::min(blocks, kForwardUnits), nthreads, [&](auto take) {
    Work<T> w(s);
    for (int64_t u, k0, k1; take(u, k0, k1);)
      for (int64_t i = k0; i < k1; ++i) {
        if (s.N == 16) forward_block<T, 16>(in, s, block_at<T>(s, i), w, out, last, ckpt);
        else forward_block<T, 0>(in, s, block_at<T>(s, i), w, out, last, ckpt);
      }
  });
}

template <typename T>
void backward_dispatch(const Inputs<T> &in, const Shape &s, const T *ckpt, Grads<T> &g, T *dA, T *dD, T *dbias,
                       int nthreads) {
  if (s.N == 16) backward_all<T, 16>(in, s, ckpt, g, dA, dD, dbias, nthreads);
  else backward_all<T, 0>(in, s, ckpt, g, dA, dD, dbias, nthreads);
}

// (batch, rows, cols) -> (batch, cols, rows): B and C to step-major and their gradients back. Done here because
// torch's copy of a transposed (batch, 16, L) tensor takes ~100 ns per element on these machines.
template <typename T>
void transpose_last2(const T *src, int64_t batch, int64_t rows, int64_t cols, T *dst) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) dst[(b * cols + c) * rows + r] = src[(b * rows + r) * cols + c];
}

template <typename T>
int scan_forward(Inputs<T> in, const T *B, const T *C, const Shape &s, T *out, T *last, T *ckpt, int nthreads) {
  if (s.seg < 1) return 1;
  std::vector<T> Bt(s.batch * s.L * s.N), Ct(Bt.size());
  transpose_last2(B, s.batch, s.N, s.L, Bt.data());
  transpose_last2(C, s.batch, s.N, s.L, Ct.data());
  in.Bt = Bt.data();
  in.Ct = Ct.data();
  prefer_huge_pages(out, sizeof(T) * s.batch * s.dim * s.L);
  forward_all<T>(in, s, out, last, ckpt, nthreads);
  return 0;
}

template <typename T>
int scan_backward(Inputs<T> in, const T *B, const T *C, const Shape &s, const T *ckpt, Grads<T> &g, T *dA, T *dB,
                  T *dC, T *dD, T *dbias, int nthreads) {
  if (s.seg < 1 || (s.L > s.seg && !ckpt)) return 1;
  const int64_t size = s.batch * s.L * s.N;
  std::vector<T> Bt(size), Ct(size), dBt(size, T(0)), dCt(size, T(0));
  transpose_last2(B, s.batch, s.N, s.L, Bt.data());
  transpose_last2(C, s.batch, s.N, s.L, Ct.data());
  in.Bt = Bt.data();
  in.Ct = Ct.data();
  g.dBt = dBt.data();
  g.dCt = dCt.data();
  for (T *p : {g.du, g.ddelta, g.dz}) prefer_huge_pages(p, sizeof(T) * s.batch * s.dim * s.L);
  backward_dispatch<T>(in, s, ckpt, g, dA, dD, dbias, nthreads);
  transpose_last2(dBt.data(), s.batch, s.L, s.N, dB);
  transpose_last2(dCt.data(), s.batch, s.L, s.N, dC);
  return 0;
}

}  // namespace

// B, C, dB, dC: (batch, N, L), like u; ckpt: null, or room for the checkpoints (filled by the forward pass, read
// by the backward pass; it must be given to the backward pass whenever L > seg). Nonzero return: bad arguments.
#define PKS4_SCAN_API(T, SUFFIX)                                                                             \
  extern "C" int pks4_scan_fwd_##SUFFIX(const T *u, const T *delta, const T *A, const T *B, const T *C,      \
                                        const T *D, const T *z, const T *bias, int softplus, int64_t batch,   \
                                        int64_t dim, int64_t L, int64_t N, int64_t seg, T *out, T *last,      \
                                        T *ckpt, int nthreads) {                                              \
    Inputs<T> in{u, delta, A, nullptr, nullptr, D, z, bias, softplus};                                      \
    return scan_forward<T>(in, B, C, Shape{batch, dim, L, N, seg}, out, last, ckpt, nthreads);               \
  }                                                                                                          \
  extern "C" int pks4_scan_bwd_##SUFFIX(const T *u, const T *delta, const T *A, const T *B, const T *C,      \
                                        const T *D, const T *z, const T *bias, int softplus, int64_t batch,   \
                                        int64_t dim, int64_t L, int64_t N, int64_t seg, const T *ckpt,        \
                                        const T *dout, const T *dlast, T *du, T *ddelta, T *dA, T *dB,        \
                                        T *dC, T *dD, T *dz, T *dbias, int nthreads) {                        \
    Inputs<T> in{u, delta, A, nullptr, nullptr, D, z, bias, softplus};                                      \
    Grads<T> g{dout, dlast, du, ddelta, dz, nullptr, nullptr, {}, {}, {}, {}};                               \
    return scan_backward<T>(in, B, C, Shape{batch, dim, L, N, seg}, ckpt, g, dA, dB, dC, dD, dbias, nthreads); \
  }

PKS4_SCAN_API(float, f32)
PKS4_SCAN_API(double, f64)
