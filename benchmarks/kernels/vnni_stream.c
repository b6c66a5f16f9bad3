/* One thread of MoEInt4's two phases over experts in DRAM, without onnxruntime: what the codes' software
 * prefetch buys (benchmarks/README.md, session 19). Builds vnni_ops.c in; AHEAD sets the prefetch distance in
 * row groups (0: none):
 *
 *   for a in 0 4; do gcc -O3 -march=native -DAHEAD=$a -o /tmp/vnni_stream benchmarks/kernels/vnni_stream.c -lm \
 *     && /tmp/vnni_stream; done
 *
 * 8 layers of ds3bench's routed experts (hidden 1024, 32 experts of 512, int4 blocks of 128: 204 MiB, well past the
 * L3), 4 experts a token, the next layer's every token: each phase reads its experts' codes once, from DRAM. */
#include <stdio.h>
#include <time.h>

#include "vnni_ops.c"

#define LAYERS 8

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(void) {
  const int64_t hidden = 1024, inter = 512, experts = 32 * LAYERS, block = 128, active = 4;
  uint8_t *fc1 = malloc((size_t)(experts * 2 * inter * hidden / 2)), *fc2 = malloc((size_t)(experts * hidden * inter / 2));
  float *s1 = malloc(sizeof(float) * (size_t)(experts * 2 * inter * hidden / block));
  float *s2 = malloc(sizeof(float) * (size_t)(experts * hidden * inter / block));
  for (int64_t i = 0; i < experts * 2 * inter * hidden / 2; ++i) fc1[i] = (uint8_t)rand();
  for (int64_t i = 0; i < experts * hidden * inter / 2; ++i) fc2[i] = (uint8_t)rand();
  for (int64_t i = 0; i < experts * 2 * inter * hidden / block; ++i) s1[i] = 1e-3f;
  for (int64_t i = 0; i < experts * hidden * inter / block; ++i) s2[i] = 1e-3f;
  static float x[1024], y[1024], xs[8], xz[8], hs[4][4], hz[4][4], gate_up[4 * 1024];
  static int8_t xq[1024], hq[4][512];
  for (int i = 0; i < hidden; ++i) x[i] = (float)(rand() % 1000) / 500.f - 1.f;
  Job job = {.fc1 = fc1, .s1 = s1, .fc2 = fc2, .s2 = s2, .hidden = hidden, .inter = inter, .block = block,
             .active = active, .x = {xq, xs, xz}, .gate_up = gate_up, .y = y};
  for (int s = 0; s < active; ++s) job.h[s] = (QVec){hq[s], hs[s], hz[s]};
  double t1 = 0, t2 = 0;
  const int warm = 100, runs = 2000;
  for (int r = 0; r < warm + runs; ++r) {
    for (int s = 0; s < active; ++s) {
      job.experts[s] = (r % LAYERS) * 32 + (r * 7 + s * 5) % 32;
      job.weights[s] = 0.25f;
    }
    for (int64_t b = 0; b < hidden / block; ++b) quantize_block(x + b * block, block, b, &job.x);
    const double a = now_us();
    for (size_t u = 0; u < (size_t)(active * (inter / block)); ++u) fc1_unit(&job, u);
    const double b = now_us();
    for (size_t u = 0; u < FC2_UNITS; ++u) fc2_unit(&job, u);
    const double c = now_us();
    if (r >= warm) { t1 += b - a; t2 += c - b; }
  }
  const double fc1_bytes = active * 2 * inter * hidden * (0.5 + 4.0 / block), fc2_bytes = fc1_bytes / 2;
  printf("AHEAD=%d: fc1 + SwiGLU %.1f us (%.1f GB/s), fc2 %.1f us (%.1f GB/s), one thread\n", AHEAD, t1 / runs,
         fc1_bytes / (t1 / runs) / 1e3, t2 / runs, fc2_bytes / (t2 / runs) / 1e3);
  return 0;
}
