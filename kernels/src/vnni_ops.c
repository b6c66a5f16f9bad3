/* onnxruntime custom ops with AVX-512 VNNI int8 dot products: the library of the dsedge-kernels package (kernels/).
 * The runtime uses MoEInt4 for the expert partitions a memory budget leaves out (dsedge/runtime/streamed.py: run
 * from the bundle's file, no session created at a miss); MatMulInt4 and HeadMatMulU8 are prototypes (issue 12
 * item 6) that only the benchmarks swap in: `ort_probes.py moe-kernel` / `kernel-agreement` build this file
 * (gcc -O3 -march=native) and time it beside com.microsoft::QMoE and MatMulNBits over the same bytes;
 * `step_split.py --custom` swaps them into a real bundle.
 *
 *   com.dsedge::MoEInt4(x float [T, H], probs float [T, E], fc1 uint8 [E, 2I, H/2], s1 float [E, 2I, H/B],
 *                       fc2 uint8 [E, H, I/2], s2 float [E, H, I/B], weights float [T, E]) -> y float [T, H]
 *   attributes k, block_size (B), normalize_routing_weights: QMoE's meaning and QMoE's stored layout (gate and
 *   up rows interleaved, swiglu_fusion=1; codes q in 0..15, two per byte, low nibble first; w = (q - 8) · s).
 *
 *   com.dsedge::MatMulInt4(a float [..., K], b uint8 [N, K/B, B/2], scales float [N · K/B]) -> y [..., N]
 *   attributes K, N, block_size: MatMulNBits' symmetric 4-bit layout (no zero points); rows of a tiled.
 *
 *   com.dsedge::HeadMatMulU8(a float [B, Hd, T, K], w uint8 [Hd, K/4, N, 4], s float [Hd, N])
 *                            -> y float [B, Hd, T, N],  y = a · ((w − 128) · s) per head
 *   absorbed MLA's per-head products (w_uk, w_uv), activations quantized per row as the export does today; w
 *   holds the int8 weights plus 128, four consecutive k of one column per 32-bit lane (the VNNI layout).
 *
 * Why custom ops: QMoE reads 4 experts' bytes at about half the speed of one MatMulNBits pair, and
 * MatMulIntegerToFloat over a 3-D (per-head) B is not prepacked and runs at ~7 GB/s in the step
 * (benchmarks/README.md, session 18); with weights as graph inputs (an expert fed from the file) the stock ops
 * re-pack on every call. These kernels read a stored layout as it is, so an initializer and an input cost the
 * same. The dot product is the one llama.cpp's Q4_0 x Q8_0 and MLAS' int8-activation path use (activations
 * quantized to int8 per block, integer dot products, one float scale per block), here with vpdpbusd (unsigned
 * x signed bytes): for MoEInt4 the unsigned nibbles times signed activations, the zero point 8 taken out
 * afterwards as 8 · Σ activations of the block; for HeadMatMulU8 the weights plus 128 times signed activations,
 * 128 · Σ activations taken out. MoEInt4 needs H and I multiples of 128 (the activation layout's chunk) and of
 * B; its AVX-512 path takes B a multiple of 128, others run the scalar loop. HeadMatMulU8 needs K % 4 == 0 and
 * N % 16 == 0 on its AVX-512 path.
 *
 * ABI: ort_abi.h (the OrtApi slots and OrtCustomOp fields of onnxruntime_c_api.h; the attribute getter
 * KernelInfoGetAttribute_int64 is slot 86). Each op computes through KernelComputeV2: a shape it does not take,
 * a failed API call or an allocation that fails comes back to onnxruntime as an error status naming the op and
 * the reason, which the session's run raises (the runtime checks shapes before it uses an op, so this is what
 * a graph that slipped past it gets instead of a wrong result). */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(DSEDGE_KERNELS_SIMDE)
/* checking only: the AVX-512 path built on a CPU without it, through SIMDe's portable implementations of the
 * intrinsics (github.com/simd-everywhere/simde; benchmarks/ort_probes.py kernel-agreement with
 * DSEDGE_KERNEL_CFLAGS="-DDSEDGE_KERNELS_SIMDE -I<simde>"): right results, not speed */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
#define HAVE_VNNI 1
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1 /* MoEInt4's dot products only (dot4); everything else takes the plain C loops */
#endif

#include "ort_abi.h"

#define TILE_ROWS 16 /* activation vectors one call of against_rows takes (many-token paths) */

#ifndef AHEAD
#define AHEAD 4 /* row groups (of 4) the codes are prefetched ahead */
#endif

/* --- quantized activations ------------------------------------------------------------------------------- */
/* One vector of n activations, int8 per block of B: for each 128-value chunk its even-index values then its
 * odd-index ones (64 + 64 bytes), matching the low and high nibbles of 64 code bytes; per block the scale and
 * the zero-point term 8 · scale · Σ q. */
typedef struct {
  int8_t *q;
  float *scale, *zero;
} QVec;

/* Block b of v from the block's floats xb (symmetric, round to nearest even like MLAS' and llama.cpp's). */
static void quantize_block(const float *xb, int64_t block, int64_t b, QVec *v) {
  float amax = 0.f;
  int32_t sum = 0;
#ifdef HAVE_VNNI
  if (block % 128 == 0) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < block; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
    amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 1.f / (amax / 127.f) : 0.f); /* MLAS' rounding of 1/scale */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    __m512i total = _mm512_setzero_si512();
    for (int64_t i = 0; i < block; i += 32) { /* 32 floats → 16 even and 16 odd int8 */
      const __m512 lo = _mm512_loadu_ps(xb + i), hi = _mm512_loadu_ps(xb + i + 16);
      const __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), inv));
      const __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), inv));
      const int64_t at = b * block + i, chunk = at / 128, j = at % 128;
      _mm_storeu_si128((__m128i *)(v->q + chunk * 128 + j / 2), _mm512_cvtsepi32_epi8(qe));
      _mm_storeu_si128((__m128i *)(v->q + chunk * 128 + 64 + j / 2), _mm512_cvtsepi32_epi8(qo));
      total = _mm512_add_epi32(total, _mm512_add_epi32(qe, qo));
    }
    sum = _mm512_reduce_add_epi32(total);
  } else
#endif
  {
    for (int64_t i = 0; i < block; ++i) amax = fmaxf(amax, fabsf(xb[i]));
    const float inv = amax > 0.f ? 1.f / (amax / 127.f) : 0.f;
    for (int64_t i = 0; i < block; ++i) {
      const int32_t q = (int32_t)lrintf(xb[i] * inv);
      const int64_t at = b * block + i, chunk = at / 128, j = at % 128; /* even j → first half, odd → second */
      v->q[chunk * 128 + (j % 2) * 64 + j / 2] = (int8_t)q;
      sum += q;
    }
  }
  v->scale[b] = amax / 127.f;
  v->zero[b] = 8.f * v->scale[b] * (float)sum;
}

/* Σ over blocks of factor · s · (scale · Σ q·code − zero) for 4 rows of codes (row_bytes apart, scales
 * ``blocks`` apart) against one quantized vector of n values, added to acc: float lanes on the AVX-512 path
 * (reduced by the caller once per row, after every expert), lane 0 otherwise; the zero-point terms go to zero[r]. */
typedef struct {
#ifdef HAVE_VNNI
  __m512 lanes[4];
#elif defined(HAVE_AVX2)
  __m256 lanes[4];
#endif
  float scalar[4], zero[4];
} Acc4;

static void dot4(const uint8_t *w, int64_t row_bytes, const float *s, int64_t n, int64_t block, const QVec *v,
                 float factor, Acc4 *acc) {
  const int64_t blocks = n / block;
  for (int r = 0; r < 4; ++r)
    for (int64_t b = 0; b < blocks; ++b) acc->zero[r] += factor * s[r * blocks + b] * v->zero[b];
#ifdef HAVE_VNNI
  if (block % 128 == 0) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i d[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
      for (int64_t c = b * block / 128; c < (b + 1) * block / 128; ++c) {
        const __m512i even = _mm512_loadu_si512(v->q + c * 128), odd = _mm512_loadu_si512(v->q + c * 128 + 64);
        for (int r = 0; r < 4; ++r) {
          /* the stream prefetcher stops at 4 KiB pages: fetch AHEAD row groups ahead by hand */
#if AHEAD
          _mm_prefetch((const char *)(w + (4 * AHEAD + r) * row_bytes + c * 64), _MM_HINT_T0);
#endif
          const __m512i codes = _mm512_loadu_si512(w + r * row_bytes + c * 64);
          d[r] = _mm512_dpbusd_epi32(d[r], _mm512_and_si512(codes, low), even);
          d[r] = _mm512_dpbusd_epi32(d[r], _mm512_and_si512(_mm512_srli_epi16(codes, 4), low), odd);
        }
      }
      const float vs = factor * v->scale[b];
      for (int r = 0; r < 4; ++r)
        acc->lanes[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(s[r * blocks + b] * vs),
                                        acc->lanes[r]);
    }
    return;
  }
#elif defined(HAVE_AVX2)
  if (block % 128 == 0) {
    /* llama.cpp's Q4_0 x Q8_0 AVX2 product: vpmaddubsw (unsigned nibbles x signed bytes, pairs summed into int16:
     * at most 2 · 15 · 128 in magnitude, no saturation), then vpmaddwd by ones into int32 lanes. */
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i d[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
      for (int64_t c = b * block / 128; c < (b + 1) * block / 128; ++c)
        for (int h = 0; h < 2; ++h) { /* the chunk's 64 code bytes as two halves of 32 */
          const __m256i even = _mm256_loadu_si256((const __m256i *)(v->q + c * 128 + h * 32));
          const __m256i odd = _mm256_loadu_si256((const __m256i *)(v->q + c * 128 + 64 + h * 32));
          for (int r = 0; r < 4; ++r) {
            const __m256i codes = _mm256_loadu_si256((const __m256i *)(w + r * row_bytes + c * 64 + h * 32));
            const __m256i lo = _mm256_and_si256(codes, low), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
            d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(pairs, ones));
          }
        }
      const float vs = factor * v->scale[b];
      for (int r = 0; r < 4; ++r)
        acc->lanes[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), _mm256_set1_ps(s[r * blocks + b] * vs),
                                        acc->lanes[r]);
    }
    return;
  }
#endif
  for (int r = 0; r < 4; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t d = 0;
      for (int64_t i = b * block; i < (b + 1) * block; ++i) {
        const uint8_t byte = w[r * row_bytes + i / 2];
        const int32_t q = (i % 2) ? byte >> 4 : byte & 0x0F;
        const int64_t chunk = i / 128, j = i % 128;
        d += q * v->q[chunk * 128 + (j % 2) * 64 + j / 2];
      }
      acc->scalar[r] += factor * s[r * blocks + b] * v->scale[b] * (float)d;
    }
}

static void acc4_init(Acc4 *acc) {
  memset(acc, 0, sizeof *acc);
#ifdef HAVE_VNNI
  for (int r = 0; r < 4; ++r) acc->lanes[r] = _mm512_setzero_ps();
#elif defined(HAVE_AVX2)
  for (int r = 0; r < 4; ++r) acc->lanes[r] = _mm256_setzero_ps();
#endif
}

static void acc4_store(const Acc4 *acc, float out[4]) {
  for (int r = 0; r < 4; ++r) {
    out[r] = acc->scalar[r] - acc->zero[r];
#ifdef HAVE_VNNI
    out[r] += _mm512_reduce_add_ps(acc->lanes[r]);
#elif defined(HAVE_AVX2)
    float lane[8];
    _mm256_storeu_ps(lane, acc->lanes[r]);
    out[r] += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
#endif
  }
}

/* silu(gate) · up over n interleaved (gate, up) pairs, SwiGLU with alpha 1, beta 0. */
static void swiglu(const float *gate_up, int64_t n, float *out) {
  int64_t i = 0;
#ifdef HAVE_VNNI
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (; i + 16 <= n; i += 16) {
    const __m512 lo = _mm512_loadu_ps(gate_up + 2 * i), hi = _mm512_loadu_ps(gate_up + 2 * i + 16);
    const __m512 g = _mm512_permutex2var_ps(lo, even, hi), u = _mm512_permutex2var_ps(lo, odd, hi);
    /* exp(−g) = 2^t, t = −g·log2 e split as n + f, |f| ≤ 1/2; 2^f by its degree-6 Taylor series (rel. error
     * < 2e-7), 2^n by vscalefps */
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_min_ps(g, _mm512_set1_ps(87.f)), _mm512_set1_ps(-87.f)),
                                   _mm512_set1_ps(-1.44269504f));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, whole), _mm512_set1_ps(0.693147181f));
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    const __m512 e = _mm512_scalef_ps(p, whole);
    _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  }
#endif
  for (; i < n; ++i) out[i] = gate_up[2 * i] / (1.f + expf(-gate_up[2 * i])) * gate_up[2 * i + 1];
}

static void dot4x2(const uint8_t *w, int64_t row_bytes, const float *s, int64_t n, int64_t block, const QVec *v0,
                   const QVec *v1, Acc4 *a0, Acc4 *a1);
static void against_rows(const uint8_t *w, int64_t row_bytes, const float *s, int64_t n, int64_t block,
                         const QVec *const *v, int64_t m, float (*out)[4]);

/* --- the layer --------------------------------------------------------------------------------------------- */
typedef struct {
  int64_t k, block, normalize;
} Kernel;

typedef struct {
  const uint8_t *fc1, *fc2;
  const float *s1, *s2;
  int64_t hidden, inter, active, block;
  int64_t experts[64];
  float weights[64];
  QVec x, h[64];
  float *gate_up, *y;
} Job;

/* One unit per (active expert, block of its SwiGLU output): the 2·B fc1 rows behind that block, 4 at a time,
 * then the block's SwiGLU and quantization, so fc2 needs no serial step between. */
static void fc1_unit(void *usr, size_t unit) {
  const Job *j = (const Job *)usr;
  const int64_t per_expert = j->inter / j->block, slot = (int64_t)unit / per_expert, b = (int64_t)unit % per_expert;
  const int64_t hb = j->hidden / j->block, first = 2 * b * j->block, e = j->experts[slot];
  float *gate_up = j->gate_up + slot * 2 * j->inter;
  for (int64_t row = first; row < first + 2 * j->block; row += 4) {
    const int64_t at = e * 2 * j->inter + row;
    Acc4 acc;
    acc4_init(&acc);
    dot4(j->fc1 + at * (j->hidden / 2), j->hidden / 2, j->s1 + at * hb, j->hidden, j->block, &j->x, 1.f, &acc);
    acc4_store(&acc, gate_up + row);
  }
  float act[1024]; /* B ≤ 1024 (checked in compute) */
  swiglu(gate_up + first, j->block, act);
  quantize_block(act, j->block, b, (QVec *)&j->h[slot]); /* writes block b only: units run concurrently */
}

#define FC2_UNITS 8 /* fc2 work items: runs of 4-row groups, each summed over every active expert */

static void fc2_unit(void *usr, size_t unit) {
  const Job *j = (const Job *)usr;
  const int64_t quads = j->hidden / 4, per = (quads + FC2_UNITS - 1) / FC2_UNITS, ib = j->inter / j->block;
  for (int64_t q = (int64_t)unit * per; q < quads && q < ((int64_t)unit + 1) * per; ++q) {
    Acc4 acc;
    acc4_init(&acc);
    for (int64_t slot = 0; slot < j->active; ++slot) {
      const int64_t at = j->experts[slot] * j->hidden + q * 4;
      dot4(j->fc2 + at * (j->inter / 2), j->inter / 2, j->s2 + at * ib, j->inter, j->block, &j->h[slot],
           j->weights[slot], &acc);
    }
    acc4_store(&acc, j->y + q * 4);
  }
}

/* Units spread over onnxruntime's intra-op pool. Each unit also counts whether a thread other than the caller ran
 * it: with DSEDGE_VNNI_STATS set, the totals go to stderr when the library unloads (is the second core used?). */
typedef struct {
  void (*fn)(void *, size_t);
  void *usr;
  pthread_t caller;
} Spread;

static atomic_long g_units, g_worker_units;
static int g_counting = -1; /* DSEDGE_VNNI_STATS read once; without it the units run uncounted */

static void spread_unit(void *usr, size_t unit) {
  const Spread *spread = (const Spread *)usr;
  atomic_fetch_add_explicit(&g_units, 1, memory_order_relaxed);
  if (!pthread_equal(pthread_self(), spread->caller))
    atomic_fetch_add_explicit(&g_worker_units, 1, memory_order_relaxed);
  spread->fn(spread->usr, unit);
}

static void parallel_for(void *ctx, void (*fn)(void *, size_t), size_t units, void *usr) {
  if (g_counting < 0) g_counting = getenv("DSEDGE_VNNI_STATS") != NULL;
  Spread spread = {fn, usr, pthread_self()};
  OrtStatus *failed = g_counting ? FN(ParallelForFn, SLOT_PARALLEL_FOR)(ctx, spread_unit, units, 0, &spread)
                                 : FN(ParallelForFn, SLOT_PARALLEL_FOR)(ctx, fn, units, 0, usr);
  if (failed) { /* no pool for this call: the same units on this thread */
    drop_status(failed);
    for (size_t u = 0; u < units; ++u) fn(usr, u);
  }
}

__attribute__((destructor)) static void report_spread(void) {
  if (g_counting > 0 && atomic_load(&g_units))
    fprintf(stderr, "vnni_ops: %ld of %ld units ran on a worker thread\n", atomic_load(&g_worker_units),
            atomic_load(&g_units));
}


/* Many tokens (prefill): routes grouped by expert, so each chosen expert's weights are read once for all its
 * tokens (4 tokens per unpacked code vector with AVX-512, 2 with AVX2: against_rows), instead of once per token. */
typedef struct {
  const uint8_t *fc1, *fc2;
  const float *s1, *s2;
  int64_t hidden, inter, block, n_active;
  const int64_t *active, *offset, *route_token; /* experts with routes; their routes [offset[a], offset[a+1]) */
  const float *route_weight;
  QVec *x, *h;                                   /* per token; per route */
  float *gate_up, *y;                            /* per route [2I]; per token [H] */
} Batch;

static void fc1_batch_unit(void *usr, size_t unit) {
  const Batch *j = (const Batch *)usr;
  const int64_t per_expert = j->inter / j->block, a = (int64_t)unit / per_expert, b = (int64_t)unit % per_expert;
  const int64_t hb = j->hidden / j->block, first = 2 * b * j->block, e = j->active[a], i2 = 2 * j->inter;
  const int64_t r0 = j->offset[a], r1 = j->offset[a + 1];
  const QVec *v[TILE_ROWS];
  float out[TILE_ROWS][4];
  for (int64_t row = first; row < first + 2 * j->block; row += 4) {
    const int64_t at = e * i2 + row;
    for (int64_t r = r0; r < r1; r += TILE_ROWS) { /* this expert's routes, TILE_ROWS at a time */
      const int64_t m = r + TILE_ROWS < r1 ? TILE_ROWS : r1 - r;
      for (int64_t t = 0; t < m; ++t) v[t] = &j->x[j->route_token[r + t]];
      against_rows(j->fc1 + at * (j->hidden / 2), j->hidden / 2, j->s1 + at * hb, j->hidden, j->block, v, m, out);
      for (int64_t t = 0; t < m; ++t) memcpy(j->gate_up + (r + t) * i2 + row, out[t], sizeof out[t]);
    }
  }
  float act[1024];
  for (int64_t r = r0; r < r1; ++r) {
    swiglu(j->gate_up + r * i2 + first, j->block, act);
    quantize_block(act, j->block, b, &j->h[r]);
  }
}

static void fc2_batch_unit(void *usr, size_t unit) {
  const Batch *j = (const Batch *)usr;
  const int64_t quads = j->hidden / 4, per = (quads + FC2_UNITS - 1) / FC2_UNITS, ib = j->inter / j->block;
  const QVec *v[TILE_ROWS];
  float out[TILE_ROWS][4];
  for (int64_t q = (int64_t)unit * per; q < quads && q < ((int64_t)unit + 1) * per; ++q)
    for (int64_t a = 0; a < j->n_active; ++a) {
      const int64_t at = j->active[a] * j->hidden + q * 4;
      for (int64_t r = j->offset[a]; r < j->offset[a + 1]; r += TILE_ROWS) {
        const int64_t m = r + TILE_ROWS < j->offset[a + 1] ? TILE_ROWS : j->offset[a + 1] - r;
        for (int64_t t = 0; t < m; ++t) v[t] = &j->h[r + t];
        against_rows(j->fc2 + at * (j->inter / 2), j->inter / 2, j->s2 + at * ib, j->inter, j->block, v, m, out);
        for (int64_t t = 0; t < m; ++t)
          for (int i = 0; i < 4; ++i)
            j->y[j->route_token[r + t] * j->hidden + q * 4 + i] += j->route_weight[r + t] * out[t][i];
      }
    }
}

/* DeepSeek's choice as QMoE makes it: top-k of probs, weights gathered (normalised when asked), routes of
 * weight ≤ 1e-8 skipped. */
static void choose(const Kernel *kern, const float *probs, const float *weights, int64_t n_experts, Job *job) {
  int64_t picked[64];
  int64_t k = kern->k < n_experts ? kern->k : n_experts;
  float total = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    int64_t best = -1;
    for (int64_t e = 0; e < n_experts; ++e) {
      int taken = 0;
      for (int64_t t = 0; t < i; ++t) taken |= picked[t] == e;
      if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
    }
    picked[i] = best;
    total += weights[best];
  }
  job->active = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float wt = kern->normalize && total > 0.f ? weights[picked[i]] / total : weights[picked[i]];
    if (wt <= 1e-8f) continue;
    job->experts[job->active] = picked[i];
    job->weights[job->active++] = wt;
  }
}

/* Whether a tensor value holds exactly count elements. */
static int holds(const void *value, int64_t count) {
  int64_t dims[8];
  size_t n;
  if (shape_of(value, dims, 8, &n)) return 0;
  int64_t total = 1;
  for (size_t i = 0; i < n; ++i) total *= dims[i];
  return total == count;
}

/* Why MoEInt4's inputs do not fit its layout, or NULL: x [T, H], probs and weights [T, E], fc1 [E, 2I, H/2],
 * s1 [E, 2I, H/B], fc2 [E, H, I/2], s2 [E, H, I/B], with H and I multiples of 128 and of B, k ≤ 64 and
 * 0 < B ≤ 1024. */
static const char *moe_misfit(const Kernel *kern, const void *const *in, int64_t xd[2], int64_t wd[3]) {
  size_t xn, wn;
  if (kern->block <= 0 || kern->block > 1024) return "block_size must be in 1..1024";
  if (kern->k < 1 || kern->k > 64) return "k must be in 1..64";
  if (shape_of(in[0], xd, 2, &xn) || xn != 2) return "the input must be [tokens, hidden]";
  if (shape_of(in[2], wd, 3, &wn) || wn != 3) return "fc1 codes must be [experts, 2 * inter, hidden / 2]";
  const int64_t t = xd[0], h = xd[1], e = wd[0], inter = wd[1] / 2, b = kern->block;
  if (h % 128 || h % b || inter % 128 || inter % b)
    return "hidden and inter widths must be multiples of 128 and of block_size";
  if (wd[2] != h / 2 || !holds(in[3], e * 2 * inter * (h / b)) || !holds(in[4], e * h * inter / 2) ||
      !holds(in[5], e * h * (inter / b)))
    return "the codes and scales do not match the input's width and fc1's shape";
  if (!holds(in[1], t * e) || !holds(in[6], t * e)) return "router probabilities and weights must be [tokens, experts]";
  return NULL;
}

/* T > 1 tokens: every token's choice, routes grouped by expert (a counting sort), then the two batched phases. */
static OrtStatus *compute_batch(const Kernel *kern, void *ctx, Job *one, const float *x, const float *probs,
                                const float *weights, int64_t n_experts, int64_t tokens, float *y) {
  const int64_t h = one->hidden, inter = one->inter, block = one->block, k = kern->k;
  int64_t *count = calloc((size_t)n_experts + 1, sizeof(int64_t)), *token_of = malloc(sizeof(int64_t) * tokens * k);
  int64_t *expert_of = malloc(sizeof(int64_t) * tokens * k);
  float *weight_of = malloc(sizeof(float) * tokens * k);
  if (!count || !token_of || !expert_of || !weight_of) {
    free(weight_of); free(expert_of); free(token_of); free(count);
    return op_error(ORT_FAIL, "MoEInt4", "out of memory");
  }
  int64_t routes = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    choose(kern, probs + t * n_experts, weights + t * n_experts, n_experts, one);
    for (int64_t s = 0; s < one->active; ++s, ++routes) {
      token_of[routes] = t;
      expert_of[routes] = one->experts[s];
      weight_of[routes] = one->weights[s];
      ++count[one->experts[s]];
    }
  }
  int64_t *active = malloc(sizeof(int64_t) * (n_experts + 1)), *offset = malloc(sizeof(int64_t) * (n_experts + 2));
  int64_t *slot_of = malloc(sizeof(int64_t) * n_experts), n_active = 0;
  if (!active || !offset || !slot_of) {
    free(slot_of); free(offset); free(active); free(weight_of); free(expert_of); free(token_of); free(count);
    return op_error(ORT_FAIL, "MoEInt4", "out of memory");
  }
  offset[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e)
    if (count[e]) { slot_of[e] = n_active; active[n_active] = e; offset[n_active + 1] = offset[n_active] + count[e];
                    ++n_active; }
  int64_t *fill = calloc((size_t)n_active + 1, sizeof(int64_t)), *route_token = malloc(sizeof(int64_t) * (routes + 1));
  float *route_weight = malloc(sizeof(float) * (routes + 1));
  const int64_t hb = h / block, ib = inter / block;
  QVec *xs = malloc(sizeof(QVec) * tokens), *hs = malloc(sizeof(QVec) * (routes + 1));
  int8_t *xq = malloc((size_t)(tokens * h)), *hq = malloc((size_t)((routes + 1) * inter));
  float *xf = malloc(sizeof(float) * tokens * 2 * hb), *hf = malloc(sizeof(float) * (routes + 1) * 2 * ib);
  float *gate_up = malloc(sizeof(float) * (routes + 1) * 2 * inter);
  const int allocated = fill && route_token && route_weight && xs && hs && xq && hq && xf && hf && gate_up;
  for (int64_t r = 0; allocated && r < routes; ++r) {
    const int64_t a = slot_of[expert_of[r]], at = offset[a] + fill[a]++;
    route_token[at] = token_of[r];
    route_weight[at] = weight_of[r];
  }
  for (int64_t t = 0; allocated && t < tokens; ++t) {
    xs[t] = (QVec){xq + t * h, xf + t * 2 * hb, xf + t * 2 * hb + hb};
    for (int64_t b = 0; b < hb; ++b) quantize_block(x + t * h + b * block, block, b, &xs[t]);
  }
  for (int64_t r = 0; allocated && r < routes; ++r) hs[r] = (QVec){hq + r * inter, hf + r * 2 * ib, hf + r * 2 * ib + ib};
  if (allocated) memset(y, 0, sizeof(float) * (size_t)(tokens * h));
  Batch batch = {.fc1 = one->fc1, .fc2 = one->fc2, .s1 = one->s1, .s2 = one->s2, .hidden = h, .inter = inter,
                 .block = block, .n_active = n_active, .active = active, .offset = offset,
                 .route_token = route_token, .route_weight = route_weight, .x = xs, .h = hs, .gate_up = gate_up,
                 .y = y};
  if (allocated && n_active) {
    parallel_for(ctx, fc1_batch_unit, (size_t)(n_active * ib), &batch);
    parallel_for(ctx, fc2_batch_unit, FC2_UNITS, &batch);
  }
  free(gate_up); free(hf); free(xf); free(hq); free(xq); free(hs); free(xs); free(route_weight); free(route_token);
  free(fill); free(slot_of); free(offset); free(active); free(weight_of); free(expert_of); free(token_of); free(count);
  return allocated ? NULL : op_error(ORT_FAIL, "MoEInt4", "out of memory");
}

static OrtStatus *compute(void *kernel, void *ctx) {
  const Kernel *kern = (const Kernel *)kernel;
  if (!kern) return op_error(ORT_FAIL, "MoEInt4", "out of memory (kernel state)");
  const void *in[7];
  void *data[7];
  TRY(inputs_of(ctx, 7, in, data));
  int64_t xd[2], wd[3];
  const char *misfit = moe_misfit(kern, in, xd, wd);
  if (misfit) return op_error(ORT_INVALID_ARGUMENT, "MoEInt4", misfit);
  float *y;
  TRY(output_of(ctx, xd, 2, &y));
  const float *x = data[0], *probs = data[1], *weights = data[6];
  Job job = {.fc1 = data[2], .s1 = data[3], .fc2 = data[4], .s2 = data[5], .hidden = xd[1], .inter = wd[1] / 2,
             .block = kern->block};
  const int64_t n_experts = wd[0], h = job.hidden, i2 = 2 * job.inter;
  if (xd[0] > 1) return compute_batch(kern, ctx, &job, x, probs, weights, n_experts, xd[0], y);
  choose(kern, probs, weights, n_experts, &job);
  job.y = y;
  if (!job.active) { memset(y, 0, sizeof(float) * (size_t)h); return NULL; }
  /* one allocation per call: the quantized input, the k fc1 outputs and the k quantized SwiGLU outputs */
  const size_t bytes = (size_t)(h + kern->k * job.inter) + sizeof(float) * (size_t)(2 * (h / job.block) +
                       kern->k * (i2 + 2 * (job.inter / job.block)));
  char *arena = malloc(bytes + 64);
  if (!arena) return op_error(ORT_FAIL, "MoEInt4", "out of memory");
  float *floats = (float *)arena;
  job.x.scale = floats; floats += h / job.block;
  job.x.zero = floats; floats += h / job.block;
  job.gate_up = floats; floats += kern->k * i2;
  for (int64_t s = 0; s < kern->k; ++s) {
    job.h[s].scale = floats; floats += job.inter / job.block;
    job.h[s].zero = floats; floats += job.inter / job.block;
  }
  int8_t *ints = (int8_t *)floats;
  job.x.q = ints; ints += h;
  for (int64_t s = 0; s < kern->k; ++s) { job.h[s].q = ints; ints += job.inter; }
  for (int64_t b = 0; b < h / job.block; ++b) quantize_block(x + b * job.block, job.block, b, &job.x);
  parallel_for(ctx, fc1_unit, (size_t)(job.active * (job.inter / job.block)), &job);
  parallel_for(ctx, fc2_unit, FC2_UNITS, &job);
  free(arena);
  return NULL;
}

/* --- dense int4 products ----------------------------------------------------------------------------------- */
/* MatMulNBits' symmetric 4-bit layout (B uint8 [N, K/B, B/2], scales [N · K/B], zero point 8). Many rows of A
 * (prefill) are tiled: a work unit keeps its run of weight rows in cache while blocks of TILE_ROWS activation
 * rows pass over them, 4 (AVX-512) or 2 (AVX2) rows per pass: each unpacked code vector serves them all. */
typedef struct {
  const uint8_t *w;
  const float *s;
  float *y;
  int64_t k, n, block, rows;
  QVec *a; /* one per row of A */
} DenseJob;

#define DENSE_UNITS 16 /* ParallelFor work items: runs of 4-row groups */

/* dot4 for two activation vectors at once, into a0 and a1. */
static void dot4x2(const uint8_t *w, int64_t row_bytes, const float *s, int64_t n, int64_t block, const QVec *v0,
                   const QVec *v1, Acc4 *a0, Acc4 *a1) {
#ifdef HAVE_VNNI
  if (block % 128 == 0) {
    const int64_t blocks = n / block;
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int r = 0; r < 4; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        a0->zero[r] += s[r * blocks + b] * v0->zero[b];
        a1->zero[r] += s[r * blocks + b] * v1->zero[b];
      }
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i d0[4], d1[4];
      for (int r = 0; r < 4; ++r) d0[r] = d1[r] = _mm512_setzero_si512();
      for (int64_t c = b * block / 128; c < (b + 1) * block / 128; ++c) {
        const __m512i e0 = _mm512_loadu_si512(v0->q + c * 128), o0 = _mm512_loadu_si512(v0->q + c * 128 + 64);
        const __m512i e1 = _mm512_loadu_si512(v1->q + c * 128), o1 = _mm512_loadu_si512(v1->q + c * 128 + 64);
        for (int r = 0; r < 4; ++r) {
          const __m512i codes = _mm512_loadu_si512(w + r * row_bytes + c * 64);
          const __m512i lo = _mm512_and_si512(codes, low), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
          d0[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d0[r], lo, e0), hi, o0);
          d1[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d1[r], lo, e1), hi, o1);
        }
      }
      for (int r = 0; r < 4; ++r) {
        const float sw = s[r * blocks + b];
        a0->lanes[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0[r]), _mm512_set1_ps(sw * v0->scale[b]), a0->lanes[r]);
        a1->lanes[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1[r]), _mm512_set1_ps(sw * v1->scale[b]), a1->lanes[r]);
      }
    }
    return;
  }
#endif
  dot4(w, row_bytes, s, n, block, v0, 1.f, a0);
  dot4(w, row_bytes, s, n, block, v1, 1.f, a1);
}

#ifdef HAVE_VNNI
/* 4 rows of codes against 4 quantized vectors: out[t][r] = Σ_b s[r, b] · (scale_t[b] · Σ q · code − zero_t[b]).
 * The many-token path's register tile: each unpacked code vector serves 4 vectors (16 int32 accumulators; the
 * activations are read from L1 as vpdpbusd's memory operand), and per block the 4 rows' lanes of one vector are
 * summed into one register, [r0 r1 r2 r3] in each 128-bit lane (6 shuffles and 3 adds, exact in int32), so the
 * float step (convert, scale, accumulate) runs once per vector and block instead of once per row, vector and
 * block, where it cost as much as the dot products themselves (session 21's profile of dot4x2). */
static void tile4x4(const uint8_t *w, int64_t row_bytes, const float *s, int64_t blocks, int64_t block,
                    const QVec *const v[4], float out[4][4]) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[4];
  __m128 zero[4];
  for (int t = 0; t < 4; ++t) {
    acc[t] = _mm512_setzero_ps();
    zero[t] = _mm_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i d[4][4];
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < 4; ++t) d[r][t] = _mm512_setzero_si512();
    for (int64_t c = b * block / 128; c < (b + 1) * block / 128; ++c)
      for (int r = 0; r < 4; ++r) {
        const __m512i codes = _mm512_loadu_si512(w + r * row_bytes + c * 64);
        const __m512i lo = _mm512_and_si512(codes, low), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
        for (int t = 0; t < 4; ++t) {
          d[r][t] = _mm512_dpbusd_epi32(d[r][t], lo, _mm512_loadu_si512(v[t]->q + c * 128));
          d[r][t] = _mm512_dpbusd_epi32(d[r][t], hi, _mm512_loadu_si512(v[t]->q + c * 128 + 64));
        }
      }
    const __m128 sw = _mm_setr_ps(s[b], s[blocks + b], s[2 * blocks + b], s[3 * blocks + b]);
    const __m512 sw4 = _mm512_broadcast_f32x4(sw);
    for (int t = 0; t < 4; ++t) {
      const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0][t], d[1][t]),
                                          _mm512_unpackhi_epi32(d[0][t], d[1][t]));
      const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2][t], d[3][t]),
                                          _mm512_unpackhi_epi32(d[2][t], d[3][t]));
      const __m512i rows = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rows), _mm512_mul_ps(sw4, _mm512_set1_ps(v[t]->scale[b])), acc[t]);
      zero[t] = _mm_fmadd_ps(sw, _mm_set1_ps(v[t]->zero[b]), zero[t]);
    }
  }
  for (int t = 0; t < 4; ++t) { /* the four 128-bit lanes of acc[t] summed: one float per row */
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(acc[t]), _mm512_extractf32x8_ps(acc[t], 1));
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    _mm_storeu_ps(out[t], _mm_sub_ps(four, zero[t]));
  }
}
#endif

#ifdef HAVE_AVX2
/* The AVX2 register tile: 4 rows of codes against 2 quantized vectors, out[t][r] as tile4x4 gives it. Each
 * unpacked half-chunk of codes serves both vectors (llama.cpp's vpmaddubsw / vpmaddwd product, as in dot4), and
 * per block two rounds of vphaddd sum the 4 rows' lanes of one vector into [r0 r1 r2 r3] per 128-bit lane, so
 * the float step runs once per vector and block (8 accumulators: 16 ymm registers hold no more). */
static void tile4x2(const uint8_t *w, int64_t row_bytes, const float *s, int64_t blocks, int64_t block,
                    const QVec *const v[2], float out[2][4]) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m128 zero[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i d[4][2];
    for (int r = 0; r < 4; ++r) d[r][0] = d[r][1] = _mm256_setzero_si256();
    for (int64_t c = b * block / 128; c < (b + 1) * block / 128; ++c)
      for (int h = 0; h < 2; ++h) /* the chunk's 64 code bytes as two halves of 32 */
        for (int r = 0; r < 4; ++r) {
          const __m256i codes = _mm256_loadu_si256((const __m256i *)(w + r * row_bytes + c * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(codes, low), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
          for (int t = 0; t < 2; ++t) {
            const __m256i even = _mm256_loadu_si256((const __m256i *)(v[t]->q + c * 128 + h * 32));
            const __m256i odd = _mm256_loadu_si256((const __m256i *)(v[t]->q + c * 128 + 64 + h * 32));
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
            d[r][t] = _mm256_add_epi32(d[r][t], _mm256_madd_epi16(pairs, ones));
          }
        }
    const __m128 sw = _mm_setr_ps(s[b], s[blocks + b], s[2 * blocks + b], s[3 * blocks + b]);
    const __m256 sw2 = _mm256_set_m128(sw, sw);
    for (int t = 0; t < 2; ++t) {
      const __m256i rows = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0][t], d[1][t]), _mm256_hadd_epi32(d[2][t], d[3][t]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows), _mm256_mul_ps(sw2, _mm256_set1_ps(v[t]->scale[b])), acc[t]);
      zero[t] = _mm_fmadd_ps(sw, _mm_set1_ps(v[t]->zero[b]), zero[t]);
    }
  }
  for (int t = 0; t < 2; ++t) /* the two 128-bit lanes of acc[t] summed: one float per row */
    _mm_storeu_ps(out[t], _mm_sub_ps(_mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1)),
                                     zero[t]));
}
#endif

/* out[t][r]: 4 rows of codes against m ≤ TILE_ROWS vectors, 4 at a time where the tile runs, then 2, then 1. */
static void against_rows(const uint8_t *w, int64_t row_bytes, const float *s, int64_t n, int64_t block,
                         const QVec *const *v, int64_t m, float (*out)[4]) {
  int64_t t = 0;
#ifdef HAVE_VNNI
  if (block % 128 == 0)
    for (; t + 4 <= m; t += 4) tile4x4(w, row_bytes, s, n / block, block, v + t, out + t);
#elif defined(HAVE_AVX2)
  if (block % 128 == 0)
    for (; t + 2 <= m; t += 2) tile4x2(w, row_bytes, s, n / block, block, v + t, out + t);
#endif
  for (; t < m; t += 2) {
    Acc4 acc0, acc1;
    acc4_init(&acc0);
    if (t + 1 < m) {
      acc4_init(&acc1);
      dot4x2(w, row_bytes, s, n, block, v[t], v[t + 1], &acc0, &acc1);
      acc4_store(&acc1, out[t + 1]);
    } else {
      dot4(w, row_bytes, s, n, block, v[t], 1.f, &acc0);
    }
    acc4_store(&acc0, out[t]);
  }
}

static void dense_unit(void *usr, size_t unit) {
  const DenseJob *j = (const DenseJob *)usr;
  const int64_t quads = j->n / 4, per = (quads + DENSE_UNITS - 1) / DENSE_UNITS, kb = j->k / j->block;
  const int64_t first = (int64_t)unit * per, last = first + per < quads ? first + per : quads;
  const QVec *v[TILE_ROWS];
  float out[TILE_ROWS][4];
  for (int64_t r0 = 0; r0 < j->rows; r0 += TILE_ROWS) {
    const int64_t m = r0 + TILE_ROWS < j->rows ? TILE_ROWS : j->rows - r0;
    for (int64_t t = 0; t < m; ++t) v[t] = &j->a[r0 + t];
    for (int64_t q = first; q < last; ++q) {
      against_rows(j->w + q * 4 * (j->k / 2), j->k / 2, j->s + q * 4 * kb, j->k, j->block, v, m, out);
      for (int64_t t = 0; t < m; ++t) memcpy(j->y + (r0 + t) * j->n + q * 4, out[t], sizeof out[t]);
    }
  }
}

typedef struct {
  int64_t k, n, block;
} DenseKernel;

/* Why MatMulInt4's inputs do not fit, or NULL: a partial last block, a K the activation layout does not tile,
 * N not in 4-row groups, or weights of another size. */
static const char *dense_misfit(const DenseKernel *kern, const void *const *in, int64_t *ad, size_t *an) {
  if (kern->block <= 0 || kern->k % kern->block) return "K must be a whole number of blocks";
  if (kern->k % 128 || kern->n % 4) return "K must be a multiple of 128 and N of 4";
  if (shape_of(in[0], ad, 8, an) || *an < 1 || ad[*an - 1] != kern->k) return "A's last dimension must be K";
  if (!holds(in[1], kern->n * kern->k / 2) || !holds(in[2], kern->n * (kern->k / kern->block)))
    return "B and the scales must hold N x K 4-bit codes and one scale per block";
  return NULL;
}

static OrtStatus *dense_compute(void *kernel, void *ctx) {
  const DenseKernel *kern = (const DenseKernel *)kernel;
  if (!kern) return op_error(ORT_FAIL, "MatMulInt4", "out of memory (kernel state)");
  const void *in[3];
  void *data[3];
  TRY(inputs_of(ctx, 3, in, data));
  int64_t ad[8];
  size_t an;
  const char *misfit = dense_misfit(kern, in, ad, &an);
  if (misfit) return op_error(ORT_INVALID_ARGUMENT, "MatMulInt4", misfit);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < an; ++i) rows *= ad[i];
  ad[an - 1] = kern->n;
  DenseJob job = {.w = data[1], .s = data[2], .k = kern->k, .n = kern->n, .block = kern->block, .rows = rows};
  const float *a = data[0];
  TRY(output_of(ctx, ad, an, &job.y));
  const int64_t kb = job.k / job.block;
  /* every row quantized first: per row K int8 and kb scales and zero-point terms */
  char *arena = malloc((size_t)rows * ((size_t)job.k + 2 * sizeof(float) * (size_t)kb) + 64);
  job.a = malloc(sizeof(QVec) * (size_t)rows);
  if (!arena || !job.a) {
    free(job.a); free(arena);
    return op_error(ORT_FAIL, "MatMulInt4", "out of memory");
  }
  float *floats = (float *)arena;
  int8_t *ints = (int8_t *)(floats + 2 * kb * rows);
  for (int64_t r = 0; r < rows; ++r) {
    job.a[r] = (QVec){ints + r * job.k, floats + 2 * kb * r, floats + 2 * kb * r + kb};
    for (int64_t b = 0; b < kb; ++b) quantize_block(a + r * job.k + b * job.block, job.block, b, &job.a[r]);
  }
  parallel_for(ctx, dense_unit, DENSE_UNITS, &job);
  free(job.a);
  free(arena);
  return NULL;
}

/* --- per-head products ------------------------------------------------------------------------------------ */
typedef struct {
  const float *a, *s;
  const uint8_t *w;
  float *y;
  int64_t batch, heads, rows, k, n;
} HeadJob;

#define HEAD_TILES 16 /* 16 columns per zmm of int32 lanes: up to 256 columns a pass, accumulators in registers */

/* One row of activations (quantized to int8 here) against one head's weights, up to 256 columns a pass. */
static void head_row(const HeadJob *j, const float *a, const uint8_t *w, const float *s, float *y) {
  int8_t q[4096];
  float amax = 0.f;
  for (int64_t i = 0; i < j->k; ++i) amax = fmaxf(amax, fabsf(a[i]));
  const float scale = amax / 127.f, inv = amax > 0.f ? 1.f / scale : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < j->k; ++i) { q[i] = (int8_t)lrintf(a[i] * inv); sum += q[i]; }
#ifdef HAVE_VNNI
  if (j->n % 16 == 0) {
    for (int64_t n0 = 0; n0 < j->n; n0 += 16 * HEAD_TILES) {
      const int64_t tiles = (j->n - n0) / 16 < HEAD_TILES ? (j->n - n0) / 16 : HEAD_TILES;
      __m512i acc[HEAD_TILES];
      for (int t = 0; t < HEAD_TILES; ++t) acc[t] = _mm512_setzero_si512();
      for (int64_t k4 = 0; k4 < j->k / 4; ++k4) {
        int32_t four;
        memcpy(&four, q + 4 * k4, 4); /* 4 consecutive activations, one per byte of a lane */
        const __m512i qa = _mm512_set1_epi32(four);
        const uint8_t *row = w + (k4 * j->n + n0) * 4;
        _mm_prefetch((const char *)(row + 8 * j->n * 4), _MM_HINT_T0);
        for (int t = 0; t < HEAD_TILES; ++t)
          if (t < tiles) acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_loadu_si512(row + 64 * t), qa);
      }
      const __m512i zero = _mm512_set1_epi32(128 * sum);
      for (int t = 0; t < tiles; ++t) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], zero));
        _mm512_storeu_ps(y + n0 + 16 * t,
                         _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(scale)), _mm512_loadu_ps(s + n0 + 16 * t)));
      }
    }
    return;
  }
#endif
  for (int64_t n = 0; n < j->n; ++n) {
    int32_t d = 0;
    for (int64_t i = 0; i < j->k; ++i) d += q[i] * ((int32_t)w[((i / 4) * j->n + n) * 4 + i % 4] - 128);
    y[n] = scale * s[n] * (float)d;
  }
}

static void head_unit(void *usr, size_t unit) { /* one head: every (batch, row) of it */
  const HeadJob *j = (const HeadJob *)usr;
  const int64_t h = (int64_t)unit;
  for (int64_t b = 0; b < j->batch; ++b)
    for (int64_t t = 0; t < j->rows; ++t) {
      const int64_t row = (b * j->heads + h) * j->rows + t;
      head_row(j, j->a + row * j->k, j->w + h * j->k * j->n, j->s + h * j->n, j->y + row * j->n);
    }
}

static OrtStatus *head_compute(void *kernel, void *ctx) {
  (void)kernel;
  const void *in[3];
  void *data[3];
  TRY(inputs_of(ctx, 3, in, data));
  int64_t ad[4], wd[4], sd[2];
  size_t an, wn, sn;
  if (shape_of(in[0], ad, 4, &an) || shape_of(in[1], wd, 4, &wn) || shape_of(in[2], sd, 2, &sn) || an != 4 ||
      wn != 4 || sn != 2 || ad[3] > 4096 || ad[3] != 4 * wd[1] || ad[1] != wd[0] || wd[3] != 4 || sd[0] != wd[0] ||
      sd[1] != wd[2])
    return op_error(ORT_INVALID_ARGUMENT, "HeadMatMulU8",
                    "needs A [batch, heads, rows, K <= 4096], B [heads, K/4, N, 4] and scales [heads, N]");
  int64_t yd[4] = {ad[0], ad[1], ad[2], wd[2]};
  HeadJob job = {.a = data[0], .w = data[1], .s = data[2], .batch = ad[0], .heads = ad[1], .rows = ad[2],
                 .k = ad[3], .n = wd[2]};
  TRY(output_of(ctx, yd, 4, &job.y));
  parallel_for(ctx, head_unit, (size_t)job.heads, &job);
  return NULL;
}

/* --- registration ------------------------------------------------------------------------------------------ */
static void *create_kernel(const OrtCustomOp *op, const void *api, const void *info) {
  (void)op; (void)api;
  Kernel *kern = calloc(1, sizeof *kern); /* a missing attribute stays 0: refused in compute (normalize: off) */
  if (!kern) return NULL;
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "k", &kern->k));
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "block_size", &kern->block));
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "normalize_routing_weights", &kern->normalize));
  return kern;
}
static void *create_dense_kernel(const OrtCustomOp *op, const void *api, const void *info) {
  (void)op; (void)api;
  DenseKernel *kern = calloc(1, sizeof *kern); /* a missing attribute stays 0: refused in compute */
  if (!kern) return NULL;
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "K", &kern->k));
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "N", &kern->n));
  drop_status(FN(AttrInt64Fn, SLOT_ATTR_INT64)(info, "block_size", &kern->block));
  return kern;
}
static void *create_head_kernel(const OrtCustomOp *op, const void *api, const void *info) {
  (void)op; (void)api; (void)info;
  return (void *)1; /* stateless */
}
static const char *name(const OrtCustomOp *op) { (void)op; return "MoEInt4"; }
static const char *head_name(const OrtCustomOp *op) { (void)op; return "HeadMatMulU8"; }
static const char *dense_name(const OrtCustomOp *op) { (void)op; return "MatMulInt4"; }
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 2 || i == 4 ? ORT_UINT8 : ORT_FLOAT; }
static int weights_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? ORT_UINT8 : ORT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 7; }
static size_t three_inputs(const OrtCustomOp *op) { (void)op; return 3; }
static void destroy(void *kernel) { free(kernel); }
static void head_destroy(void *kernel) { (void)kernel; }

static OrtCustomOp g_moe, g_head, g_dense;

OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
  g_api = base->GetApi(API_VERSION);
  if (!g_api) return NULL;
  describe_op(&g_moe, name, create_kernel, input_type, input_count, compute, destroy);
  describe_op(&g_head, head_name, create_head_kernel, weights_input_type, three_inputs, head_compute, head_destroy);
  describe_op(&g_dense, dense_name, create_dense_kernel, weights_input_type, three_inputs, dense_compute, destroy);
  OrtCustomOp *ops[] = {&g_moe, &g_head, &g_dense};
  return register_domain(options, "com.dsedge", ops, 3);
}
