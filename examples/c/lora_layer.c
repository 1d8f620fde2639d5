/* A fused QKV LoRA layer from C99, as a serving runtime runs it for one step:
 *   y = x W0^T (the base GEMM), then y += B (scale * A x) for the q, k and v slices in one call,
 *   sgmv_layer_apply (the layer described once at model load, the step once per step).
 * Three adapters of ranks 8, 16 and 64 share a rank-64 stack (lora_ranks: the padding is never
 * read), each scaled by alpha / rank (lora_scales); base-model rows (index -1), one prefill and
 * several decode segments share the batch. Every element is checked against a host reference.
 * It loads the CUDA driver with dlopen: building it needs no CUDA toolkit, only sgmv.h and libsgmv.
 *   cmake -S . -B build -Dsgmv_DIR=$(sgmv --cmake-dir) && cmake --build build --target lora_layer
 *   or: export PKG_CONFIG_PATH=$(sgmv --pkgconfig-dir)
 *       gcc -std=c99 lora_layer.c $(pkg-config --cflags --libs sgmv) -ldl -lm -o lora_layer
 * Exit status: 0 ok; 1 a CUDA or sgmv error or a wrong result; 2 no GPU or driver (nothing run). */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sgmv.h"

/* ---- the few CUDA driver API declarations used (cuda.h's, without needing cuda.h) ---------- */

typedef int CUresult; /* 0: CUDA_SUCCESS */
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef unsigned long long CUdeviceptr;

static struct {
  CUresult (*Init)(unsigned flags);
  CUresult (*DeviceGet)(CUdevice *dev, int ordinal);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext *ctx, CUdevice dev);
  CUresult (*CtxSetCurrent)(CUcontext ctx);
  CUresult (*MemAlloc)(CUdeviceptr *ptr, size_t bytes);
  CUresult (*MemFree)(CUdeviceptr ptr);
  CUresult (*MemcpyHtoD)(CUdeviceptr dst, const void *src, size_t bytes);
  CUresult (*MemcpyDtoH)(void *dst, CUdeviceptr src, size_t bytes);
  CUresult (*CtxSynchronize)(void);
  CUresult (*GetErrorName)(CUresult error, const char **name);
} cu;

static const char *cu_name(CUresult r) {
  const char *name = NULL;
  if (cu.GetErrorName(r, &name) != 0 || name == NULL) return "an unknown CUDA error";
  return name;
}

#define CU_CHECK(call)                                                              \
  do {                                                                              \
    CUresult r_ = (call);                                                           \
    if (r_ != 0) {                                                                  \
      fprintf(stderr, "lora_layer: %s failed: %s\n", #call, cu_name(r_));          \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

#define SGMV_CHECK(call)                                                                            \
  do {                                                                                              \
    sgmv_status_t s_ = (call);                                                                      \
    if (s_ != SGMV_SUCCESS) {                                                                       \
      fprintf(stderr, "lora_layer: %s failed: %s: %s\n", #call, sgmv_status_string(s_), sgmv_last_error()); \
      exit(1);                                                                                      \
    }                                                                                               \
  } while (0)

/* No GPU is not an error of this program: one line, exit 2. */
static void no_gpu(const char *why, const char *detail) {
  fprintf(stderr, "lora_layer: needs an NVIDIA GPU and its driver: %s%s%s (nothing was run)\n", why,
          detail ? ": " : "", detail ? detail : "");
  exit(2);
}

/* Loads libcuda.so.1 and makes device 0's primary context current (libsgmv launches in the
 * current context, as a runtime's own CUDA setup leaves it). */
static void cuda_start(void) {
  static const struct {
    const char *name;
    void *slot;
  } fns[] = {
      {"cuInit", &cu.Init},
      {"cuDeviceGet", &cu.DeviceGet},
      {"cuDevicePrimaryCtxRetain", &cu.DevicePrimaryCtxRetain},
      {"cuCtxSetCurrent", &cu.CtxSetCurrent},
      {"cuMemAlloc_v2", &cu.MemAlloc},
      {"cuMemFree_v2", &cu.MemFree},
      {"cuMemcpyHtoD_v2", &cu.MemcpyHtoD},
      {"cuMemcpyDtoH_v2", &cu.MemcpyDtoH},
      {"cuCtxSynchronize", &cu.CtxSynchronize},
      {"cuGetErrorName", &cu.GetErrorName},
  };
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) no_gpu("the CUDA driver could not be loaded", dlerror());
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    void *sym = dlsym(lib, fns[i].name);
    if (sym == NULL) no_gpu("libcuda.so.1 is too old: it lacks", fns[i].name);
    memcpy(fns[i].slot, &sym, sizeof sym); /* POSIX: a function's address fits a void * */
  }
  CUresult r = cu.Init(0);
  if (r != 0) no_gpu("cuInit failed", cu_name(r));
  CUdevice dev;
  CUcontext ctx;
  r = cu.DeviceGet(&dev, 0);
  if (r != 0) no_gpu("no device 0", cu_name(r));
  CU_CHECK(cu.DevicePrimaryCtxRetain(&ctx, dev));
  CU_CHECK(cu.CtxSetCurrent(ctx));
}

static CUdeviceptr upload(const void *host, size_t bytes) {
  CUdeviceptr p;
  CU_CHECK(cu.MemAlloc(&p, bytes));
  CU_CHECK(cu.MemcpyHtoD(p, host, bytes));
  return p;
}

#define DEV(p) ((void *)(uintptr_t)(p))

/* ---- host data --------------------------------------------------------------------------- */

/* bf16 is the top half of an fp32; round to nearest even (the values here are finite). */
static uint16_t to_bf16(double d) {
  float f = (float)d;
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static double urand(void) { return (double)rand() / RAND_MAX * 2.0 - 1.0; }

/* Layer: hidden H in; slices q, k, v of NQ, NKV, NKV output columns (grouped-query attention);
 * L adapters in stacks of rank R. Batch: T tokens in B segments. */
enum { H = 256, NQ = 256, NKV = 64, NOUT = NQ + 2 * NKV, S = 3, R = 64, L = 3, B = 9 };
static const int64_t slice_cols[S] = {NQ, NKV, NKV};
static const int64_t slice_col0[S] = {0, NQ, NQ + NKV}; /* first output column of each slice */
static const int32_t ranks[L] = {8, 16, 64};
static const double alpha[L] = {16, 16, 32};

/* Eight decode tokens (two of them base-model rows, index -1) and one 37-token prefill. */
static const int32_t seg_len[B] = {1, 1, 1, 1, 1, 1, 1, 1, 37};
static const int32_t seg_idx[B] = {0, -1, 2, 0, 1, -1, 2, 0, 1};
enum { T = 8 + 37, MAX_SEQ = 37 };

static uint16_t x[T * H], w0[NOUT * H], y_base[T * NOUT], y[T * NOUT];
static uint16_t lora_a[S * L * R * H]; /* slice s: (L, R, H) from s * L * R * H */
static uint16_t lora_b[L * NOUT * R];  /* slice s: (L, slice_cols[s], R) from L * slice_col0[s] * R */
static double s_ref[T * S * R];

int main(void) {
  cuda_start();

  int32_t seg_start[B], row_lora[T];
  float scales[L];
  for (int b = 0, m = 0; b < B; m += seg_len[b], b++) {
    seg_start[b] = m;
    for (int i = 0; i < seg_len[b]; i++) row_lora[m + i] = seg_idx[b];
  }
  for (int a = 0; a < L; a++) scales[a] = (float)(alpha[a] / ranks[a]);

  /* Random data (never zeros); rank r >= ranks[a] of adapter a is zero padding. */
  srand(1);
  for (int i = 0; i < T * H; i++) x[i] = to_bf16(urand());
  for (int i = 0; i < NOUT * H; i++) w0[i] = to_bf16(urand() / 16);
  for (int s = 0; s < S; s++)
    for (int a = 0; a < L; a++)
      for (int r = 0; r < R; r++)
        for (int k = 0; k < H; k++)
          lora_a[(((size_t)s * L + a) * R + r) * H + k] = r < ranks[a] ? to_bf16(urand() / 16) : 0;
  for (int s = 0; s < S; s++)
    for (int a = 0; a < L; a++)
      for (int n = 0; n < slice_cols[s]; n++)
        for (int r = 0; r < R; r++)
          lora_b[((L * slice_col0[s] + (size_t)a * slice_cols[s]) + n) * R + r] =
              r < ranks[a] ? to_bf16(urand() / 4) : 0;

  /* The base layer. A runtime runs its own GEMM (cuBLAS, in bf16) here; this example computes
   * y_base = x W0^T on the host and uploads it, as the output the LoRA calls add to. */
  for (int m = 0; m < T; m++)
    for (int n = 0; n < NOUT; n++) {
      double acc = 0;
      for (int k = 0; k < H; k++) acc += from_bf16(x[m * H + k]) * from_bf16(w0[n * H + k]);
      y_base[m * NOUT + n] = to_bf16(acc);
    }

  CUdeviceptr d_x = upload(x, sizeof x), d_y = upload(y_base, sizeof y_base);
  CUdeviceptr d_a = upload(lora_a, sizeof lora_a), d_b = upload(lora_b, sizeof lora_b);
  CUdeviceptr d_ranks = upload(ranks, sizeof ranks), d_scales = upload(scales, sizeof scales);
  CUdeviceptr d_start = upload(seg_start, sizeof seg_start), d_len = upload(seg_len, sizeof seg_len);
  CUdeviceptr d_idx = upload(seg_idx, sizeof seg_idx);

  /* At model load: the layer's A and B stacks of each slice, described once. A runtime keeps the
   * sgmv_layer_t of every adapted projection. */
  sgmv_layer_args_t la = SGMV_LAYER_ARGS_INIT;
  la.num_slices = S;
  for (int s = 0; s < S; s++) {
    sgmv_tensor_t a = {DEV(d_a + (CUdeviceptr)s * L * R * H * 2), SGMV_DTYPE_BFLOAT16, 3, {L, R, H},
                       {(int64_t)R * H, H, 1}};
    sgmv_tensor_t b = {DEV(d_b + (CUdeviceptr)L * slice_col0[s] * R * 2), SGMV_DTYPE_BFLOAT16, 3,
                       {L, slice_cols[s], R}, {slice_cols[s] * R, R, 1}};
    la.lora_a[s] = a;
    la.lora_b[s] = b;
  }
  const sgmv_tensor_t lora_ranks = {DEV(d_ranks), SGMV_DTYPE_INT32, 1, {L}, {1}};
  const sgmv_tensor_t lora_scales = {DEV(d_scales), SGMV_DTYPE_FLOAT32, 1, {L}, {1}};
  la.lora_ranks = lora_ranks;
  la.lora_scales = lora_scales;
  sgmv_layer_t *qkv = NULL;
  SGMV_CHECK(sgmv_layer_create(&la, &qkv));

  /* Once per step: the metadata and a scratch buffer (the batch plan, each call's intermediate
   * and the split-K workspace), sized by the library for the step's widest layer. */
  size_t scratch_bytes = sgmv_step_scratch_bytes(B, T, S * R);
  CUdeviceptr d_scratch;
  CU_CHECK(cu.MemAlloc(&d_scratch, scratch_bytes));
  sgmv_step_args_t sa = SGMV_STEP_ARGS_INIT;
  const sgmv_tensor_t meta = {.dtype = SGMV_DTYPE_INT32, .ndim = 1, .shape = {B}, .strides = {1}};
  sa.seq_start = sa.seq_len = sa.lora_indices = meta;
  sa.seq_start.data = DEV(d_start);
  sa.seq_len.data = DEV(d_len);
  sa.lora_indices.data = DEV(d_idx);
  sa.batches = B;
  sa.max_seq_length = MAX_SEQ;
  sa.total_tokens = T;
  sa.num_loras = L;
  sa.scratch = DEV(d_scratch);
  sa.scratch_bytes = scratch_bytes;
  sgmv_step_t *step = NULL;
  SGMV_CHECK(sgmv_step_create(&sa, &step));
  SGMV_CHECK(sgmv_step_plan(step, NULL)); /* the rows grouped by adapter, on the device */

  /* The layer: y += the LoRA delta of the three slices, one call (the shrink, then the expand). */
  const sgmv_tensor_t in = {DEV(d_x), SGMV_DTYPE_BFLOAT16, 2, {T, H}, {H, 1}};
  const sgmv_tensor_t out = {DEV(d_y), SGMV_DTYPE_BFLOAT16, 2, {T, NOUT}, {NOUT, 1}};
  SGMV_CHECK(sgmv_layer_apply(qkv, step, &in, &out, 1, NULL));

  CU_CHECK(cu.CtxSynchronize()); /* the launches are asynchronous */
  CU_CHECK(cu.MemcpyDtoH(y, d_y, sizeof y));
  sgmv_step_destroy(step);
  sgmv_layer_destroy(qkv);

  /* Reference in double from the same bf16 values. An element's error is measured against the
   * sum of the magnitudes of its terms (cancellation makes |ref| a poor scale): the shrink
   * accumulates in fp32 and keeps its result in bf16, and expand rounds its result to bf16 (2^-8
   * each, at most 2^-7 together). The tolerance is twice the bound or more. */
  const double y_tol = 1.0 / 64;
  double y_err = 0;
  long bad = 0, base_rows = 0;
  for (int m = 0; m < T; m++) {
    int a = row_lora[m];
    if (a < 0) { /* a base-model row: nothing written in either output */
      base_rows++;
      if (memcmp(&y[m * NOUT], &y_base[m * NOUT], sizeof y_base[0] * NOUT) != 0) {
        fprintf(stderr, "lora_layer: FAILED: base-model row %d differs from the base output\n", m);
        bad++;
      }
      continue;
    }
    for (int s = 0; s < S; s++)
      for (int r = 0; r < R; r++) {
        const uint16_t *arow = &lora_a[(((size_t)s * L + a) * R + r) * H];
        double ref = 0;
        for (int k = 0; r < ranks[a] && k < H; k++) ref += scales[a] * from_bf16(x[m * H + k]) * from_bf16(arow[k]);
        s_ref[m * S * R + s * R + r] = ref;
      }
    for (int s = 0; s < S; s++)
      for (int n = 0; n < slice_cols[s]; n++) {
        int col = (int)(slice_col0[s] + n);
        const uint16_t *brow = &lora_b[(L * slice_col0[s] + (size_t)a * slice_cols[s] + n) * R];
        double ref = from_bf16(y_base[m * NOUT + col]), mag = fabs(ref);
        for (int r = 0; r < ranks[a]; r++) {
          double t = s_ref[m * S * R + s * R + r] * from_bf16(brow[r]);
          ref += t;
          mag += fabs(t);
        }
        double got = from_bf16(y[m * NOUT + col]), err = fabs(got - ref) / mag;
        if (!(err <= y_tol) && bad++ < 10) /* !(<=) also catches NaN */
          fprintf(stderr, "lora_layer: FAILED: y row %d column %d: %.6g, expected %.6g\n", m, col, got, ref);
        if (!(err <= y_err)) y_err = err;
      }
  }

  CUdeviceptr all[] = {d_x, d_y, d_a, d_b, d_ranks, d_scales, d_start, d_len, d_idx, d_scratch};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (all[i]) CU_CHECK(cu.MemFree(all[i]));

  printf("lora_layer: %d tokens (%ld base-model rows), ranks 8/16/64, q/k/v %d/%d/%d columns; step scratch "
         "%zu bytes; relative error of y %.2g\n", T, base_rows, NQ, NKV, NKV, scratch_bytes, y_err);
  if (bad) {
    fprintf(stderr, "lora_layer: FAILED: %ld wrong elements or rows\n", bad);
    return 1;
  }
  printf("lora_layer: ok\n");
  return 0;
}
