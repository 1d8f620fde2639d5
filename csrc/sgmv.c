/* libsgmv: argument validation, variant selection and the launch. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"
#include "sgmv.h"
#include "variant.h"

#define INVALID(...) sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "sgmv_expand: " __VA_ARGS__)
/* 65535 column tiles of the narrowest tile the table may use (64). */
#define SGMV_MAX_HIDDEN (65535 * 64)

/* ---- inventory ---------------------------------------------------------------------------- */

SGMV_API int sgmv_version(void) { return SGMV_VERSION; }
SGMV_API const char *sgmv_archs(void) { return sgmv_archs_list; }
SGMV_API int sgmv_num_variants(void) { return sgmv_num_variants_total; }

SGMV_API const char *sgmv_status_string(sgmv_status_t status) {
  switch (status) {
    case SGMV_SUCCESS: return "success";
    case SGMV_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case SGMV_ERROR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case SGMV_ERROR_NO_DRIVER: return "no CUDA driver";
    case SGMV_ERROR_NO_DEVICE: return "no CUDA device";
    case SGMV_ERROR_UNSUPPORTED_ARCH: return "unsupported GPU architecture";
    case SGMV_ERROR_CUDA: return "CUDA driver error";
    case SGMV_ERROR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

/* The cubin family for a compute capability: sm_80 code runs on every 8.x; Triton builds sm_90,
 * sm_100 and sm_120 as arch-specific (sm_90a, ...), which run on that exact capability only. */
static int cubin_arch_for(int cc) {
  int arch = cc / 10 == 8 ? 80 : cc;
  for (const char *p = sgmv_archs_list; *p;) {
    if (atoi(p) == arch) return arch;
    while (*p && *p != ',') p++;
    if (*p) p++;
  }
  return 0;
}

SGMV_API sgmv_status_t sgmv_device_count(int *count) {
  int status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!count) return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "sgmv_device_count: count is NULL");
  *count = 0;
  if (!cu) return status == SGMV_ERROR_NO_DEVICE ? SGMV_SUCCESS : (sgmv_status_t)status;
  CUresult res = cu->cuDeviceGetCount(count);
  return res ? (sgmv_status_t)sgmv_cuda_error(cu, res, "cuDeviceGetCount") : SGMV_SUCCESS;
}

static int device_cc(const sgmv_driver_t *cu, CUdevice dev, int *cc) {
  int major = 0, minor = 0;
  CUresult res = cu->cuDeviceGetAttribute(&major, CU_ATTR_CC_MAJOR, dev);
  if (!res) res = cu->cuDeviceGetAttribute(&minor, CU_ATTR_CC_MINOR, dev);
  if (res) return sgmv_cuda_error(cu, res, "cuDeviceGetAttribute");
  *cc = major * 10 + minor;
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_device_arch(int device, int *compute_capability, int *cubin_arch) {
  if (!compute_capability || !cubin_arch)
    return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "sgmv_device_arch: NULL output pointer");
  int status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!cu) return (sgmv_status_t)status;
  CUdevice dev;
  CUresult res = cu->cuDeviceGet(&dev, device);
  if (res) return (sgmv_status_t)sgmv_cuda_error(cu, res, "cuDeviceGet");
  status = device_cc(cu, dev, compute_capability);
  if (status) return (sgmv_status_t)status;
  *cubin_arch = cubin_arch_for(*compute_capability);
  return SGMV_SUCCESS;
}

/* ---- validation --------------------------------------------------------------------------- */

/* ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b. */
static int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

static int is_float(int t) { return t == SGMV_DTYPE_FLOAT16 || t == SGMV_DTYPE_BFLOAT16 || t == SGMV_DTYPE_FLOAT32; }

static const char *dtype_name(int t) {
  static const char *names[] = {"float16", "bfloat16", "float32", "int32", "int64"};
  return t >= 0 && t <= SGMV_DTYPE_INT64 ? names[t] : "unknown";
}

/* Last element offset of a (rows, cols) view with row stride `stride` fits in int64. */
static int extent_fits(int64_t rows, int64_t cols, int64_t stride) {
  int64_t last;
  if (rows <= 0 || cols <= 0) return 1;
  return !__builtin_mul_overflow(rows - 1, stride, &last) && !__builtin_add_overflow(last, cols, &last);
}

/* Every check that needs no driver. Returns a status; *noop is set when there is nothing to do. */
static int validate(const sgmv_expand_args_t *a, int *noop) {
  if (!a) return INVALID("args is NULL");
  if (a->struct_size < sizeof(sgmv_expand_args_t))
    return INVALID("args->struct_size is %zu, expected %zu: set it to sizeof(sgmv_expand_args_t)",
                   a->struct_size, sizeof(sgmv_expand_args_t));
  if (!is_float(a->inputs_dtype) || !is_float(a->output_dtype) ||
      (a->weights_dtype != SGMV_DTYPE_FLOAT16 && a->weights_dtype != SGMV_DTYPE_BFLOAT16) ||
      (a->metadata_dtype != SGMV_DTYPE_INT32 && a->metadata_dtype != SGMV_DTYPE_INT64) ||
      (a->inputs_dtype != a->weights_dtype && a->inputs_dtype != SGMV_DTYPE_FLOAT32) ||
      (a->output_dtype != a->weights_dtype && a->output_dtype != SGMV_DTYPE_FLOAT32))
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE,
                          "sgmv_expand: unsupported dtypes (inputs %s, weights %s, output %s, metadata %s): "
                          "weights are float16 or bfloat16, inputs and output the weights' dtype or float32, "
                          "metadata int32 or int64",
                          dtype_name(a->inputs_dtype), dtype_name(a->weights_dtype), dtype_name(a->output_dtype),
                          dtype_name(a->metadata_dtype));
  /* Token and column counts bounded so that every grid dimension fits CUDA's limits. */
  if (a->total_tokens < 0 || a->total_tokens > INT32_MAX / 2)
    return INVALID("total_tokens must be in [0, 2^30), got %lld", (long long)a->total_tokens);
  if (a->hidden < 1 || a->hidden > SGMV_MAX_HIDDEN)
    return INVALID("hidden must be in [1, %d], got %lld", SGMV_MAX_HIDDEN, (long long)a->hidden);
  if (a->rank < 1 || a->rank > 256) return INVALID("rank must be in [1, 256], got %lld", (long long)a->rank);
  if (a->num_loras < 1 || a->num_loras > INT32_MAX)
    return INVALID("num_loras must be in [1, 2^31), got %lld", (long long)a->num_loras);
  if (a->batches < 0 || a->batches > INT32_MAX / 2)
    return INVALID("batches must be in [0, 2^30), got %lld", (long long)a->batches);
  if (a->max_seq_length < 0) return INVALID("max_seq_length must be >= 0, got %lld", (long long)a->max_seq_length);
  if (a->total_tokens > 1 && a->inputs_row_stride < a->rank)
    return INVALID("inputs_row_stride %lld is smaller than rank %lld", (long long)a->inputs_row_stride,
                   (long long)a->rank);
  if (a->hidden > 1 && a->weights_row_stride < a->rank)
    return INVALID("weights_row_stride %lld is smaller than rank %lld", (long long)a->weights_row_stride,
                   (long long)a->rank);
  if (a->total_tokens > 1 && a->output_row_stride < a->hidden)
    return INVALID("output_row_stride %lld is smaller than hidden %lld", (long long)a->output_row_stride,
                   (long long)a->hidden);
  if (a->inputs_row_stride < 0 || a->weights_row_stride < 0 || a->weights_lora_stride < 0 ||
      a->output_row_stride < 0)
    return INVALID("strides must be >= 0");
  if (!extent_fits(a->total_tokens, a->rank, a->inputs_row_stride) ||
      !extent_fits(a->total_tokens, a->hidden, a->output_row_stride) ||
      !extent_fits(a->hidden, a->rank, a->weights_row_stride) ||
      !extent_fits(a->num_loras, a->weights_lora_stride, a->weights_lora_stride))
    return INVALID("a stride is so large that element offsets overflow int64");
  int64_t one_lora = (a->hidden - 1) * a->weights_row_stride + a->rank;
  if (a->num_loras > 1 && a->weights_lora_stride < one_lora)
    return INVALID("weights_lora_stride %lld is smaller than one adapter's extent %lld",
                   (long long)a->weights_lora_stride, (long long)one_lora);
  *noop = a->batches == 0 || a->total_tokens == 0;
  if (*noop) return SGMV_SUCCESS;
  if (!a->inputs || !a->weights || !a->output) return INVALID("inputs, weights and output must not be NULL");
  if (!a->seq_start || !a->seq_len || !a->lora_indices)
    return INVALID("seq_start, seq_len and lora_indices must not be NULL");
  return SGMV_SUCCESS;
}

/* ---- variants ------------------------------------------------------------------------------ */

static int key_cmp(const void *a, const void *b) {
  return memcmp(&((const sgmv_variant_t *)a)->key, &((const sgmv_variant_t *)b)->key, sizeof(sgmv_variant_key_t));
}

static pthread_once_t sort_once = PTHREAD_ONCE_INIT;
static void sort_variants(void) { qsort(sgmv_variants, sgmv_num_variants_total, sizeof *sgmv_variants, key_cmp); }

static sgmv_variant_t *find_variant(const sgmv_variant_key_t *key) {
  sgmv_variant_t probe;
  memset(&probe, 0, sizeof probe);
  probe.key = *key;
  pthread_once(&sort_once, sort_variants);
  return bsearch(&probe, sgmv_variants, sgmv_num_variants_total, sizeof *sgmv_variants, key_cmp);
}

/* The rules of aot/variants.py (select_tile), generated into sgmv_rules. */
static int select_tile(int arch, int64_t max_seq_length, int64_t rank, int aligned) {
  if (!aligned) return sgmv_unaligned_tile;
  for (int i = 0; i < sgmv_num_rules; i++) {
    const sgmv_rule_t *r = &sgmv_rules[i];
    if (r->arch == arch && (r->max_seq < 0 || max_seq_length <= r->max_seq) && (r->max_rank < 0 || rank <= r->max_rank))
      return r->tile;
  }
  return -1;
}

/* Aligned variants assume 16-byte aligned base pointers, and N and row strides multiples of
 * sgmv_align_elems: that is what lets them use 16-byte loads and stores (aot/generate.py). */
static int is_aligned(const sgmv_expand_args_t *a) {
  int64_t e = sgmv_align_elems;
  return ((uintptr_t)a->inputs | (uintptr_t)a->weights | (uintptr_t)a->output) % 16 == 0 && a->hidden % e == 0 &&
         a->inputs_row_stride % e == 0 && a->weights_lora_stride % e == 0 && a->weights_row_stride % e == 0 &&
         a->output_row_stride % e == 0;
}

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

/* The variant's CUkernel, loaded once for all contexts (cuLibraryLoadData), with its dynamic
 * shared-memory limit raised on `dev` when it needs more than the default 48 KB. */
static int load_kernel(const sgmv_driver_t *cu, sgmv_variant_t *v, CUdevice dev, CUkernel *out) {
  CUkernel k = __atomic_load_n((CUkernel *)&v->kernel, __ATOMIC_ACQUIRE);
  uint64_t bit = dev < 64 ? 1ull << dev : 0;
  int need_smem = v->shared > 48 * 1024 && !(__atomic_load_n(&v->smem_devices, __ATOMIC_ACQUIRE) & bit);
  if (k && !need_smem) {
    *out = k;
    return SGMV_SUCCESS;
  }
  int status = SGMV_SUCCESS;
  CUresult res = 0;
  pthread_mutex_lock(&load_lock);
  if (!v->kernel) {
    CUlibrary lib = NULL;
    res = cu->cuLibraryLoadData(&lib, v->cubin, NULL, NULL, 0, NULL, NULL, 0);
    if (res) {
      status = sgmv_cuda_error(cu, res, "cuLibraryLoadData");
      goto done;
    }
    res = cu->cuLibraryGetKernel(&k, lib, v->kernel_name);
    if (res) {
      status = sgmv_cuda_error(cu, res, "cuLibraryGetKernel");
      goto done;
    }
    v->library = lib;
    __atomic_store_n((CUkernel *)&v->kernel, k, __ATOMIC_RELEASE);
  }
  k = (CUkernel)v->kernel;
  if (need_smem && !(v->smem_devices & bit)) {
    res = cu->cuKernelSetAttribute(CU_FUNC_ATTR_MAX_DYN_SMEM, v->shared, k, dev);
    if (res) {
      status = sgmv_cuda_error(cu, res, "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
      goto done;
    }
    __atomic_fetch_or(&v->smem_devices, bit, __ATOMIC_RELEASE);
  }
  *out = k;
done:
  pthread_mutex_unlock(&load_lock);
  return status;
}

/* The variant's CUfunction in the current context (whose id is cached_ctx_id), from a small
 * per-thread cache: launching a CUfunction costs the driver less than launching the CUkernel. */
static _Thread_local struct {
  const sgmv_variant_t *v;
  unsigned long long ctx_id;
  CUfunction f;
} func_cache[64];
static _Thread_local unsigned long long cached_ctx_id;

static int kernel_function(const sgmv_driver_t *cu, sgmv_variant_t *v, CUdevice dev, CUfunction *out) {
  size_t slot = (size_t)(v - sgmv_variants) % 64;
  if (func_cache[slot].v == v && func_cache[slot].ctx_id == cached_ctx_id) {
    *out = func_cache[slot].f;
    return SGMV_SUCCESS;
  }
  CUkernel kernel = NULL;
  int status = load_kernel(cu, v, dev, &kernel);
  if (status) return status;
  CUresult res = cu->cuKernelGetFunction(out, kernel);
  if (res) return sgmv_cuda_error(cu, res, "cuKernelGetFunction");
  func_cache[slot].v = v;
  func_cache[slot].ctx_id = cached_ctx_id;
  func_cache[slot].f = *out;
  return SGMV_SUCCESS;
}

/* ---- the entry point ----------------------------------------------------------------------- */

/* The device and cubin family of the last context this thread launched in (cached_ctx_id). */
static _Thread_local CUdevice cached_dev;
static _Thread_local int cached_arch;

static int context_arch(const sgmv_driver_t *cu, CUcontext ctx, CUdevice *dev, int *arch) {
  unsigned long long id = 0;
  CUresult res = cu->cuCtxGetId(ctx, &id);
  if (res) return sgmv_cuda_error(cu, res, "cuCtxGetId");
  if (id != cached_ctx_id || !cached_arch) {
    res = cu->cuCtxGetDevice(dev);
    if (res) return sgmv_cuda_error(cu, res, "cuCtxGetDevice");
    int cc, status = device_cc(cu, *dev, &cc);
    if (status) return status;
    cached_arch = cubin_arch_for(cc);
    cached_dev = *dev;
    cached_ctx_id = id;
    if (!cached_arch)
      return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH,
                            "sgmv_expand: no cubin for compute capability %d.%d (this build holds sm %s)",
                            cc / 10, cc % 10, sgmv_archs_list);
  }
  *dev = cached_dev;
  *arch = cached_arch;
  return SGMV_SUCCESS;
}

static int launch(const sgmv_driver_t *cu, const sgmv_expand_args_t *a, CUdevice dev, int arch) {
  int aligned = is_aligned(a);
  int tile_id = select_tile(arch, a->max_seq_length, a->rank, aligned);
  if (tile_id < 0) return sgmv_set_error(SGMV_ERROR_INTERNAL, "sgmv_expand: no tile rule for sm_%d", arch);
  const sgmv_tile_t *tile = &sgmv_tiles[tile_id];
  sgmv_variant_key_t key = {arch, tile_id, a->inputs_dtype, a->weights_dtype, a->output_dtype,
                            a->rank % tile->block_k == 0, a->add_inputs != 0};
  sgmv_variant_t *v = find_variant(&key);
  if (!v)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH, "sgmv_expand: this build has no %s variant for sm_%d",
                          tile->name, arch);
  CUfunction func = NULL;
  int status = kernel_function(cu, v, dev, &func);
  if (status) return status;

  int64_t n_tiles = cdiv(a->hidden, tile->block_n);
  if (n_tiles > 65535) /* cannot happen while every tile is at least 64 wide (SGMV_MAX_HIDDEN) */
    return sgmv_set_error(SGMV_ERROR_INTERNAL, "sgmv_expand: hidden %lld needs %lld column tiles of %d",
                          (long long)a->hidden, (long long)n_tiles, tile->block_n);
  /* The grid of aot/variants.py (grid). */
  unsigned grid_x, grid_z = 1;
  if (tile->short_segments) {
    int64_t groups = cdiv(a->batches, tile->block_m);
    int64_t slots = sgmv_short_programs / (groups * n_tiles);
    slots = slots < 1 ? 1 : slots > a->num_loras ? a->num_loras : slots;
    grid_x = (unsigned)groups;
    grid_z = (unsigned)(slots > 65535 ? 65535 : slots);
  } else {
    /* By segment unless most of that grid would idle; the flat grid is always wider than batches,
     * which is how the kernel tells the two apart. */
    int64_t flat = cdiv(a->total_tokens, tile->block_m) + a->batches; /* < 2^31: validate() bounds both */
    int64_t row_tiles = cdiv(a->max_seq_length, tile->block_m);
    row_tiles = row_tiles < 1 ? 1 : row_tiles > 65535 ? 65535 : row_tiles;
    if (a->batches * row_tiles <= 2 * flat) {
      grid_x = (unsigned)a->batches;
      grid_z = (unsigned)row_tiles;
    } else {
      grid_x = (unsigned)flat;
    }
  }

  /* Parameter order of sgmv_expand_kernel, then Triton's two scratch pointers (unused). */
  int32_t batches = (int32_t)a->batches, num_loras = (int32_t)a->num_loras, n = (int32_t)a->hidden,
          k = (int32_t)a->rank, meta_shift = a->metadata_dtype == SGMV_DTYPE_INT64;
  int64_t total_tokens = a->total_tokens, xs = a->inputs_row_stride, wl = a->weights_lora_stride,
          wn = a->weights_row_stride, os = a->output_row_stride;
  const void *x = a->inputs, *w = a->weights, *out = a->output, *start = a->seq_start, *len = a->seq_len,
             *idx = a->lora_indices;
  void *scratch = NULL, *profile_scratch = NULL;
  void *params[] = {&x,  &w,  &out, &start, &len, &idx, &batches,  &num_loras,      &total_tokens,
                    &n,  &k,  &meta_shift, &xs, &wl, &wn, &os, &scratch, &profile_scratch};
  CUresult res = cu->cuLaunchKernel(func, grid_x, (unsigned)n_tiles, grid_z,
                                    32u * v->num_warps, 1, 1, v->shared, (CUstream)a->stream, params, NULL);
  return res ? sgmv_cuda_error(cu, res, "cuLaunchKernel") : SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_expand(const sgmv_expand_args_t *args) {
  int noop = 0, status = validate(args, &noop);
  if (status || noop) return (sgmv_status_t)status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!cu) return (sgmv_status_t)status;

  /* Launch in the stream's context, making it current for the call if it is not. */
  CUcontext ctx = NULL, current = NULL;
  CUresult res = cu->cuStreamGetCtx((CUstream)args->stream, &ctx);
  if (res || !ctx)
    return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_NO_DEVICE,
                                         "sgmv_expand: no CUDA context for the stream (cuStreamGetCtx returned %d): "
                                         "make a context current (e.g. cudaSetDevice) or pass a stream",
                                         res);
  cu->cuCtxGetCurrent(&current);
  if (ctx != current && (res = cu->cuCtxPushCurrent(ctx)))
    return (sgmv_status_t)sgmv_cuda_error(cu, res, "cuCtxPushCurrent");
  CUdevice dev = 0;
  int arch = 0;
  status = context_arch(cu, ctx, &dev, &arch);
  if (!status) status = launch(cu, args, dev, arch);
  if (ctx != current) cu->cuCtxPopCurrent(&ctx);
  return (sgmv_status_t)status;
}
