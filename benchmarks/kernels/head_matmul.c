/* Prototype onnxruntime custom op for absorbed MLA's per-head products (issue 12, item 6): a benchmark, not
 * shipped. `mla_products_bench.py --variants custom-int8` builds it (gcc -O3 -mavx2 -mfma) and times it beside
 * the stock ops.
 *
 *   com.dsedge.bench::HeadMatMulInt8(A float [B, H, T, K], W int8 [H, K, N], S float [H, N]) -> Y [B, H, T, N]
 *   Y[b, h, t, n] = S[h, n] * sum_k A[b, h, t, k] * W[h, k, n]
 *
 * Why a custom op: MatMulNBits takes one 2-D matrix, not one per head, and DynamicQuantizeMatMul quantizes
 * the activations with one scale for every head (benchmarks/README.md). This kernel keeps the activations in
 * fp32 and reads each int8 weight once, a cache line (64 outputs) per k, with 8 AVX2 accumulators.
 *
 * The ABI is declared in ort_abi.h instead of including onnxruntime_c_api.h, which the onnxruntime wheel
 * does not ship. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "../../kernels/src/ort_abi.h" /* the ABI the shipped kernels (kernels/) use */
#ifndef CHUNKS
#define CHUNKS 4 /* ParallelFor work items per call: runs of tiles */
#endif

/* --- the kernel ----------------------------------------------------------------------------------------- */
typedef struct {
  const float *a, *s;
  const int8_t *w;
  float *y;
  int64_t batch, heads, rows, k, n, tiles_per_head, tiles;
  size_t chunks;
} Job;

#define TILE 64 /* outputs per tile: one 64-byte cache line of W per k */

static void tile_scalar(const float *a, const int8_t *w, const float *s, float *y, int64_t k, int64_t n,
                        int64_t n0, int64_t width) {
  float acc[TILE] = {0};
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < width; ++j) acc[j] += a[i] * (float)w[i * n + n0 + j];
  for (int64_t j = 0; j < width; ++j) y[n0 + j] = acc[j] * s[n0 + j];
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 widen8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static void tile_avx2(const float *a, const int8_t *w, const float *s, float *y, int64_t k, int64_t n, int64_t n0) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  const int8_t *row = w + n0;
  for (int64_t i = 0; i < k; ++i, row += n) {
    _mm_prefetch((const char *)(row + 8 * n), _MM_HINT_T0);
    const __m256 ai = _mm256_broadcast_ss(a + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(ai, widen8(row + 8 * j), acc[j]);
  }
  for (int j = 0; j < 8; ++j)
    _mm256_storeu_ps(y + n0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_loadu_ps(s + n0 + 8 * j)));
}
#endif

static void run_tile(const Job *job, int64_t tile) {
  const int64_t head = (tile / job->tiles_per_head) % job->heads;
  const int64_t row = tile / (job->tiles_per_head * job->heads);       /* over batch × rows */
  const int64_t b = row / job->rows, t = row % job->rows;
  const int64_t n0 = (tile % job->tiles_per_head) * TILE;
  const int64_t width = job->n - n0 < TILE ? job->n - n0 : TILE;
  const int64_t ht = (b * job->heads + head) * job->rows + t;
  const float *a = job->a + ht * job->k;
  const int8_t *w = job->w + head * job->k * job->n;
  const float *s = job->s + head * job->n;
  float *y = job->y + ht * job->n;
#if defined(__AVX2__) && defined(__FMA__)
  if (width == TILE) { tile_avx2(a, w, s, y, job->k, job->n, n0); return; }
#endif
  tile_scalar(a, w, s, y, job->k, job->n, n0, width);
}

static void run_chunk(void *usr, size_t chunk) { /* ParallelFor callback: a contiguous run of tiles */
  const Job *job = (const Job *)usr;
  const int64_t per = (job->tiles + (int64_t)job->chunks - 1) / (int64_t)job->chunks;
  const int64_t end = (int64_t)(chunk + 1) * per < job->tiles ? (int64_t)(chunk + 1) * per : job->tiles;
  for (int64_t tile = (int64_t)chunk * per; tile < end; ++tile) run_tile(job, tile);
}

static OrtStatus *compute(void *kernel, void *ctx) {
  (void)kernel;
  const void *in[3];
  void *data[3];
  TRY(inputs_of(ctx, 3, in, data));
  int64_t ad[4], wd[3];
  size_t an, wn;
  if (shape_of(in[0], ad, 4, &an) || shape_of(in[1], wd, 3, &wn) || an != 4 || wn != 3)
    return op_error(ORT_INVALID_ARGUMENT, "HeadMatMul", "needs A [batch, heads, rows, K] and B [heads, K, N]");
  int64_t yd[4] = {ad[0], ad[1], ad[2], wd[2]};
  Job job;
  job.a = data[0];
  job.w = data[1];
  job.s = data[2];
  TRY(output_of(ctx, yd, 4, &job.y));
  job.batch = ad[0]; job.heads = ad[1]; job.rows = ad[2]; job.k = ad[3]; job.n = wd[2];
  job.tiles_per_head = (job.n + TILE - 1) / TILE;
  job.tiles = job.batch * job.rows * job.heads * job.tiles_per_head;
  job.chunks = CHUNKS;
  const int spread = job.chunks > 1 && job.tiles > 1;
  OrtStatus *failed = spread ? FN(ParallelForFn, SLOT_PARALLEL_FOR)(ctx, run_chunk, job.chunks, 0, &job) : NULL;
  if (!spread || failed) { /* one chunk, or no pool for this call: every tile on this thread */
    drop_status(failed);
    for (int64_t tile = 0; tile < job.tiles; ++tile) run_tile(&job, tile);
  }
  return NULL;
}

/* --- registration --------------------------------------------------------------------------------------- */
static void *create_kernel(const OrtCustomOp *op, const void *api, const void *info) {
  (void)op; (void)api; (void)info;
  return (void *)1; /* stateless */
}
static const char *name(const OrtCustomOp *op) { (void)op; return "HeadMatMulInt8"; }
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? ORT_INT8 : ORT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 3; }
static void destroy(void *kernel) { (void)kernel; }

static OrtCustomOp g_op;

OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
  g_api = base->GetApi(API_VERSION);
  if (!g_api) return NULL;
  describe_op(&g_op, name, create_kernel, input_type, input_count, compute, destroy);
  OrtCustomOp *ops[] = {&g_op};
  return register_domain(options, "com.dsedge.bench", ops, 1);
}
