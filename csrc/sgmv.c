/* libsgmv: inventory, loading the variants, and launching what csrc/planner.c decides. */
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"
#include "errors.h"
#include "sgmv_params.h"
#include "sgmv.h"
#include "variant.h"


/* ---- inventory ---------------------------------------------------------------------------- */

_Static_assert(SGMV_VERSION == SGMV_VERSION_MAJOR * 10000 + SGMV_VERSION_MINOR * 100 + SGMV_VERSION_PATCH,
               "sgmv.h: SGMV_VERSION must be MAJOR * 10000 + MINOR * 100 + PATCH");

SGMV_API int sgmv_version(void) { return SGMV_VERSION; }
#ifndef SGMV_BUILD_TRITON /* set by CMakeLists.txt; test builds of the C sources alone */
#define SGMV_BUILD_TRITON "unknown"
#endif
static char build_info_text[128];

static void make_build_info(void) {
  char fp8[64];
  sgmv_archs_with_rules(SGMV_OP_EXPAND, 1, fp8, sizeof fp8);
  snprintf(build_info_text, sizeof build_info_text, "triton=%s;fp8_archs=%s", SGMV_BUILD_TRITON, fp8);
}

SGMV_API const char *sgmv_build_info(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, make_build_info);
  return build_info_text;
}
SGMV_API const char *sgmv_archs(void) { return sgmv_archs_list; }
SGMV_API int sgmv_num_variants(void) { return sgmv_num_variants_total; }

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
  *cubin_arch = sgmv_cubin_arch(*compute_capability);
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
      cu->cuLibraryUnload(lib); /* the next call loads it afresh */
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

/* ---- the entry points ---------------------------------------------------------------------- */

/* The device and cubin family of the last context this thread launched in (cached_ctx_id). */
static _Thread_local CUdevice cached_dev;
static _Thread_local int cached_arch;

/* The stream's context, made current for the call if it is not (*pushed), its device and arch. */
static int enter_context(const sgmv_driver_t *cu, sgmv_stream_t stream, int *pushed, CUdevice *dev, int *arch) {
  CUcontext ctx = NULL, current = NULL;
  CUresult res = cu->cuStreamGetCtx((CUstream)stream, &ctx);
  *pushed = 0;
  if (res || !ctx) {
    const char *name = NULL;
    if (!res || cu->cuGetErrorName(res, &name) != 0 || !name) name = res ? "unknown CUDA error" : "no context";
    return sgmv_set_error(SGMV_ERROR_NO_DEVICE,
                          "sgmv: no CUDA context for the stream (cuStreamGetCtx: %s (%d)): "
                          "make a context current (e.g. cudaSetDevice) or pass a stream", name, res);
  }
  cu->cuCtxGetCurrent(&current);
  if (ctx != current) {
    if ((res = cu->cuCtxPushCurrent(ctx))) return sgmv_cuda_error(cu, res, "cuCtxPushCurrent");
    *pushed = 1;
  }
  unsigned long long id = 0;
  if ((res = cu->cuCtxGetId(ctx, &id))) return sgmv_cuda_error(cu, res, "cuCtxGetId");
  if (id != cached_ctx_id || !cached_arch) {
    cached_arch = 0;
    if ((res = cu->cuCtxGetDevice(dev))) return sgmv_cuda_error(cu, res, "cuCtxGetDevice");
    int cc, status = device_cc(cu, *dev, &cc);
    if (status) return status;
    if (!sgmv_cubin_arch(cc))
      return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH,
                            "sgmv: no cubin for compute capability %d.%d (this build holds sm %s)", cc / 10, cc % 10,
                            sgmv_archs_list);
    cached_arch = sgmv_cubin_arch(cc);
    cached_dev = *dev;
    cached_ctx_id = id;
  }
  *dev = cached_dev;
  *arch = cached_arch;
  return SGMV_SUCCESS;
}

/* Launches the variant the planner chose, with the configuration it chose. */
static int launch(const sgmv_driver_t *cu, const sgmv_launch_t *l, CUdevice dev, void **params, sgmv_stream_t stream) {
  sgmv_variant_t *v = find_variant(&l->key);
  if (!v)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH, "%s: this build has no %s variant for sm_%d", l->config.kernel,
                          l->config.tile, l->key.arch);
  CUfunction func = NULL;
  int status = kernel_function(cu, v, dev, &func);
  if (status) return status;
  const uint32_t *g = l->config.grid;
  CUresult res = cu->cuLaunchKernel(func, g[0], g[1], g[2], 32u * v->num_warps, 1, 1, v->shared, (CUstream)stream,
                                    params, NULL);
  return res ? sgmv_cuda_error(cu, res, "cuLaunchKernel") : SGMV_SUCCESS;
}

/* The kernels' parameters, in their signatures' order (generated from kernels/sgmv.py). */
#define FIELD(name, type, is_ptr, ptype) type name;
typedef struct {
  SGMV_KERNEL_PARAMS(FIELD)
} kernel_params_t;
typedef struct {
  SGMV_PLAN_KERNEL_PARAMS(FIELD)
} plan_params_t;
#undef FIELD
#define ADDR(name, type, is_ptr, ptype) &p.name,

/* A build's first arch: where argument checks run before the driver is touched. */
static int any_arch(void) { return atoi(sgmv_archs_list); }

/* One kernel: how to fill its parameters for a step, and how to describe them. */
typedef struct {
  void (*fill)(const void *args, const sgmv_launch_t *l, int step, void *params);
  int (*describe)(const void *args, const sgmv_launch_t *l, const void *params, sgmv_kernel_launch_t *out);
} kernel_t;

/* Plan at the stream's arch, then for each step fill the kernel's parameters and launch. */
static int enter_and_launch(const sgmv_driver_t *cu, sgmv_stream_t stream, int (*decide)(const void *, int, sgmv_launch_t *),
                            const void *args, sgmv_launch_t *l, const kernel_t *k, void *p, void **params) {
  int pushed, arch = 0;
  CUdevice dev = 0;
  int status = enter_context(cu, stream, &pushed, &dev, &arch);
  if (!status) status = decide(args, arch, l);
  for (int step = 0; !status && step < l->config.steps; step++) {
    k->fill(args, l, step, p);
    status = launch(cu, l, dev, params, stream);
  }
  if (pushed) {
    CUcontext popped;
    cu->cuCtxPopCurrent(&popped);
  }
  return status;
}

static void fill_call(const void *args, const sgmv_launch_t *l, int step, void *params) {
  const sgmv_call_t *a = args;
  const sgmv_launch_config_t *c = &l->config;
  kernel_params_t *p = params;
  const sgmv_slice_t *w = a->w;
  /* Absent slices: slice 0's weights (never read: their column count is 0). */
  int s1 = a->num_slices > 1, s2 = a->num_slices > 2;
  p->x_ptr = a->x, p->w_ptr = w[0].weights, p->w1_ptr = w[s1].weights, p->w2_ptr = w[s2 ? 2 : 0].weights;
  p->out_ptr = a->out, p->seq_start_ptr = a->seq_start, p->seq_len_ptr = a->seq_len, p->lora_idx_ptr = a->lora_indices;
  p->plan_ptr = a->plan, p->ranks_ptr = a->ranks, p->scales_ptr = a->scales, p->work_ptr = a->work;
  p->batches = (int32_t)a->batches, p->num_loras = (int32_t)a->num_loras, p->total_tokens = a->total_tokens;
  p->N = (int32_t)w[0].rows, p->N1 = s1 ? (int32_t)w[1].rows : 0, p->N2 = s2 ? (int32_t)w[2].rows : 0;
  p->K = (int32_t)a->K, p->x_slice_step = c->x_slice_step, p->out_slice_step = a->out_slice_step;
  p->has_ranks = a->ranks != NULL, p->has_scales = a->scales != NULL, p->scaling = a->scaling;
  p->meta_shift = c->meta_shift, p->per_token = c->per_token, p->add_inputs = a->add_inputs, p->flat = c->flat;
  p->plan_capacity = c->plan_capacity, p->k_split = (int32_t)c->k_split, p->step = step;
  p->x_stride_m = a->x_stride, p->w_stride_l = w[0].lora_stride, p->w_stride_n = w[0].row_stride;
  p->w1_stride_l = w[s1].lora_stride, p->w1_stride_n = w[s1].row_stride;
  p->w2_stride_l = w[s2 ? 2 : 0].lora_stride, p->w2_stride_n = w[s2 ? 2 : 0].row_stride;
  p->out_stride_m = a->out_stride;
  const sgmv_scales_t *ws = a->ws;
  p->ws_ptr = ws[0].scales, p->ws1_ptr = ws[s1].scales, p->ws2_ptr = ws[s2 ? 2 : 0].scales;
  p->ws_stride_l = ws[0].lora_stride, p->ws_stride_n = ws[0].channel_stride;
  p->ws1_stride_l = ws[s1].lora_stride, p->ws1_stride_n = ws[s1].channel_stride;
  p->ws2_stride_l = ws[s2 ? 2 : 0].lora_stride, p->ws2_stride_n = ws[s2 ? 2 : 0].channel_stride;
}

/* A plan build: its arguments, and whether the metadata is a token mapping (a step's). */
typedef struct {
  const sgmv_batch_plan_args_t *args;
  int per_token;
} plan_call_t;

static void fill_plan(const void *args, const sgmv_launch_t *l, int step, void *params) {
  const sgmv_batch_plan_args_t *a = ((const plan_call_t *)args)->args;
  plan_params_t *p = params;
  p->plan_ptr = a->plan, p->seq_start_ptr = a->seq_start.data, p->seq_len_ptr = a->seq_len.data;
  p->lora_idx_ptr = a->lora_indices.data, p->batches = (int32_t)a->batches, p->num_loras = (int32_t)a->num_loras;
  p->total_tokens = a->total_tokens, p->meta_shift = l->config.meta_shift, p->per_token = l->config.per_token;
  p->plan_capacity = l->config.plan_capacity;
  p->step = step;
}

/* ---- the launch description ---------------------------------------------------------------- */

/* One parameter as sgmv_kernel_arg_t: a pointer's element dtype from its type (the call's
 * inputs, weights or output dtype where the type names a role), a scalar's value. */
static void describe_param(sgmv_kernel_launch_t *out, const char *name, const void *value, int is_ptr, int type,
                           const int role_dtype[3]) {
  static const int fixed[] = {SGMV_DTYPE_INT32, SGMV_DTYPE_INT64, SGMV_DTYPE_FLOAT32};
  sgmv_kernel_arg_t *a = &out->args[out->num_args++];
  memset(a, 0, sizeof *a);
  a->name = name;
  a->dtype = type >= SGMV_PARAM_INPUTS ? role_dtype[type - SGMV_PARAM_INPUTS] : fixed[type];
  if (is_ptr) {
    a->kind = SGMV_ARG_POINTER;
    a->value = (int64_t)(uintptr_t) * (const void *const *)value;
  } else if (type == SGMV_PARAM_FP32) {
    a->kind = SGMV_ARG_FLOAT;
    a->fvalue = *(const float *)value;
  } else {
    a->kind = SGMV_ARG_INT;
    a->value = type == SGMV_PARAM_I64 ? *(const int64_t *)value : *(const int32_t *)value;
  }
}

/* A constexpr's value: the launch configuration's field of that name. */
static int describe_constexpr(sgmv_kernel_launch_t *out, const char *name, const sgmv_launch_config_t *c) {
  static const struct {
    const char *name;
    size_t offset;
  } fields[] = {
      {"BLOCK_M", offsetof(sgmv_launch_config_t, block_m)}, {"BLOCK_N", offsetof(sgmv_launch_config_t, block_n)},
      {"BLOCK_K", offsetof(sgmv_launch_config_t, block_k)}, {"PATH", offsetof(sgmv_launch_config_t, path)},
      {"EVEN_K", offsetof(sgmv_launch_config_t, even_k)},   {"SHRINK", offsetof(sgmv_launch_config_t, op)},
      {"SEGS", offsetof(sgmv_launch_config_t, block_b)},    {"SCAN", offsetof(sgmv_launch_config_t, scan)},
      {"ROWS", offsetof(sgmv_launch_config_t, rows)},       {"ALIGNED", offsetof(sgmv_launch_config_t, aligned)},
  };
  for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
    if (!strcmp(fields[i].name, name)) {
      sgmv_kernel_arg_t *a = &out->args[out->num_args++];
      memset(a, 0, sizeof *a);
      a->name = name, a->kind = SGMV_ARG_CONSTEXPR, a->dtype = -1;
      a->value = *(const int32_t *)((const char *)c + fields[i].offset);
      return SGMV_SUCCESS;
    }
  return sgmv_set_error(SGMV_ERROR_INTERNAL, "%s: the kernel's constexpr %s has no launch configuration field",
                        c->kernel, name);
}

#define DESCRIBE_PARAM(name, type, is_ptr, ptype) describe_param(out, #name, &p->name, is_ptr, ptype, dtypes);
#define DESCRIBE_CONSTEXPR(name) \
  if (!status) status = describe_constexpr(out, #name, &l->config);

static int describe_call(const void *args, const sgmv_launch_t *l, const void *params, sgmv_kernel_launch_t *out) {
  const sgmv_call_t *a = args;
  const kernel_params_t *p = params;
  const int dtypes[3] = {a->x_dtype, a->w_dtype, a->out_dtype};
  int status = SGMV_SUCCESS;
  SGMV_KERNEL_PARAMS(DESCRIBE_PARAM)
  SGMV_KERNEL_CONSTEXPRS(DESCRIBE_CONSTEXPR)
  return status;
}

static int describe_plan(const void *args, const sgmv_launch_t *l, const void *params, sgmv_kernel_launch_t *out) {
  const plan_params_t *p = params;
  const int dtypes[3] = {-1, -1, -1};
  int status = SGMV_SUCCESS;
  (void)args;
  SGMV_PLAN_KERNEL_PARAMS(DESCRIBE_PARAM)
  SGMV_PLAN_KERNEL_CONSTEXPRS(DESCRIBE_CONSTEXPR)
  return status;
}

static const kernel_t call_kernel = {fill_call, describe_call}, plan_kernel = {fill_plan, describe_plan};

/* Every step of a decided launch, described into out->launches. */
static int describe(const void *args, const sgmv_launch_t *l, const kernel_t *k, void *p, sgmv_launches_t *out) {
  int status = SGMV_SUCCESS;
  const sgmv_variant_t *v = l->config.noop ? NULL : find_variant(&l->key);
  for (int step = 0; !l->config.noop && !status && step < l->config.steps; step++) {
    if (out->num_launches == SGMV_MAX_LAUNCHES)
      return sgmv_set_error(SGMV_ERROR_INTERNAL, "sgmv: more than SGMV_MAX_LAUNCHES launches");
    sgmv_kernel_launch_t *d = &out->launches[out->num_launches++];
    memset(d, 0, sizeof *d);
    k->fill(args, l, step, p);
    d->kernel = l->config.kernel;
    d->variant = v && strcmp(l->config.tile, "requested") ? v->name : "";
    memcpy(d->grid, l->config.grid, sizeof d->grid);
    d->num_warps = l->config.num_warps, d->num_stages = l->config.num_stages;
    status = k->describe(args, l, p, d);
  }
  return status;
}

static int start_description(sgmv_launches_t *out, const char *fn) {
  if (!out) return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
  if (out->struct_size != sizeof *out)
    return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT,
                          "%s: out->struct_size is %zu, expected %zu: initialise it with SGMV_LAUNCHES_INIT", fn,
                          out->struct_size, sizeof *out);
  out->num_launches = 0;
  return SGMV_SUCCESS;
}

static sgmv_status_t call_launches(int (*to_call)(const void *, sgmv_call_t *), const void *args, int arch,
                                   const sgmv_launch_config_t *want, sgmv_launches_t *out, const char *fn) {
  sgmv_call_t call;
  sgmv_launch_t l;
  kernel_params_t p;
  int status = start_description(out, fn);
  if (!status) status = to_call(args, &call);
  if (!status) status = sgmv_decide(&call, arch, want && want->block_m > 0 ? want : NULL, &l);
  if (!status) status = describe(&call, &l, &call_kernel, &p, out);
  return (sgmv_status_t)status;
}

static int expand_call(const void *a, sgmv_call_t *c) { return sgmv_expand_call(a, c); }
static int shrink_call(const void *a, sgmv_call_t *c) { return sgmv_shrink_call(a, c); }

SGMV_API sgmv_status_t sgmv_expand_launches(const sgmv_expand_args_t *args, int cubin_arch,
                                            const sgmv_launch_config_t *want, sgmv_launches_t *out) {
  return call_launches(expand_call, args, cubin_arch, want, out, "sgmv_expand_launches");
}

SGMV_API sgmv_status_t sgmv_shrink_launches(const sgmv_shrink_args_t *args, int cubin_arch,
                                            const sgmv_launch_config_t *want, sgmv_launches_t *out) {
  return call_launches(shrink_call, args, cubin_arch, want, out, "sgmv_shrink_launches");
}

static sgmv_status_t plan_launches(plan_call_t c, int cubin_arch, sgmv_launches_t *out, const char *fn) {
  sgmv_launch_t l;
  plan_params_t p;
  int status = start_description(out, fn);
  if (!status) status = sgmv_decide_batch_plan(c.args, c.per_token, cubin_arch, &l);
  if (!status) status = describe(&c, &l, &plan_kernel, &p, out);
  return (sgmv_status_t)status;
}

SGMV_API sgmv_status_t sgmv_batch_plan_launches(const sgmv_batch_plan_args_t *args, int cubin_arch,
                                                sgmv_launches_t *out) {
  return plan_launches((plan_call_t){args, 0}, cubin_arch, out, "sgmv_batch_plan_launches");
}

/* ---- the entry points' launches ------------------------------------------------------------ */

static int decide_call(const void *a, int arch, sgmv_launch_t *l) { return sgmv_decide(a, arch, NULL, l); }
static int decide_plan(const void *c, int arch, sgmv_launch_t *l) {
  const plan_call_t *p = c;
  return sgmv_decide_batch_plan(p->args, p->per_token, arch, l);
}

/* Checks the call and plans it for the build's first arch before the driver is touched, then
 * plans it again for the stream's device and launches. */
static sgmv_status_t launch_call(const sgmv_call_t *call) {
  sgmv_launch_t l;
  int status = sgmv_decide(call, sgmv_first_arch(call), NULL, &l);
  if (status || l.config.noop) return (sgmv_status_t)status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!cu) return (sgmv_status_t)status;
  kernel_params_t p;
  void *scratch = NULL, *profile_scratch = NULL; /* Triton's two trailing pointers (unused) */
  void *params[] = {SGMV_KERNEL_PARAMS(ADDR) & scratch, &profile_scratch};
  return (sgmv_status_t)enter_and_launch(cu, call->stream, decide_call, call, &l, &call_kernel, &p, params);
}

SGMV_API sgmv_status_t sgmv_expand(const sgmv_expand_args_t *args) {
  sgmv_call_t call;
  int status = sgmv_expand_call(args, &call);
  return status ? (sgmv_status_t)status : launch_call(&call);
}

SGMV_API sgmv_status_t sgmv_shrink(const sgmv_shrink_args_t *args) {
  sgmv_call_t call;
  int status = sgmv_shrink_call(args, &call);
  return status ? (sgmv_status_t)status : launch_call(&call);
}

SGMV_API sgmv_status_t sgmv_expand_tensors(const sgmv_expand_tensors_t *tensors) {
  sgmv_expand_args_t a;
  sgmv_status_t status = sgmv_expand_args_from_tensors(tensors, &a);
  return status ? status : sgmv_expand(&a);
}

SGMV_API sgmv_status_t sgmv_shrink_tensors(const sgmv_shrink_tensors_t *tensors) {
  sgmv_shrink_args_t a;
  sgmv_status_t status = sgmv_shrink_args_from_tensors(tensors, &a);
  return status ? status : sgmv_shrink(&a);
}

/* Checks and plans the build for the build's first arch before the driver is touched, then plans it
 * again for the stream's device and launches (sgmv_batch_plan_build, sgmv_step_plan). */
static sgmv_status_t launch_plan(plan_call_t c) {
  sgmv_launch_t l;
  int status = decide_plan(&c, any_arch(), &l);
  if (status) return (sgmv_status_t)status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!cu) return (sgmv_status_t)status;
  plan_params_t p;
  void *scratch = NULL, *profile_scratch = NULL;
  void *params[] = {SGMV_PLAN_KERNEL_PARAMS(ADDR) & scratch, &profile_scratch};
  return (sgmv_status_t)enter_and_launch(cu, c.args->stream, decide_plan, &c, &l, &plan_kernel, &p, params);
}

SGMV_API sgmv_status_t sgmv_batch_plan_build(const sgmv_batch_plan_args_t *a) {
  return launch_plan((plan_call_t){a, 0}); /* (sgmv_decide_batch_plan refuses a NULL a) */
}

/* ---- the layer call ------------------------------------------------------------------------ */

SGMV_API sgmv_status_t sgmv_step_plan(const sgmv_step_t *step, sgmv_stream_t stream) {
  sgmv_batch_plan_args_t a;
  plan_call_t c = {&a, 0};
  int status = sgmv_step_plan_args(step, stream, &a, &c.per_token);
  return status ? (sgmv_status_t)status : launch_plan(c);
}

SGMV_API sgmv_status_t sgmv_step_plan_launches(const sgmv_step_t *step, int cubin_arch, sgmv_launches_t *out) {
  sgmv_batch_plan_args_t a;
  plan_call_t c = {&a, 0};
  int status = sgmv_step_plan_args(step, NULL, &a, &c.per_token);
  return status ? (sgmv_status_t)status : plan_launches(c, cubin_arch, out, "sgmv_step_plan_launches");
}

/* The layer call's two launches on arch: the shrink into the step's scratch, then the expand that
 * reads it, in stream order (a programmatic dependent launch of the expand was measured slower:
 * benchmarks/NOTES.md round 9). */
static int layer_launches(const sgmv_call_t c[2], int arch, sgmv_launch_t l[2]) {
  int status = SGMV_SUCCESS;
  for (int i = 0; i < 2 && !status; i++) status = sgmv_decide(&c[i], arch, NULL, &l[i]);
  return status;
}

SGMV_API sgmv_status_t sgmv_layer_apply(const sgmv_layer_t *layer, const sgmv_step_t *step,
                                        const sgmv_tensor_t *inputs, const sgmv_tensor_t *output, int32_t add_inputs,
                                        sgmv_stream_t stream) {
  sgmv_call_t c[2];
  sgmv_launch_t l[2];
  int status = sgmv_layer_calls(layer, step, inputs, output, add_inputs, stream, c);
  if (status || !c[0].total_tokens || !c[0].batches) return (sgmv_status_t)status;
  const sgmv_driver_t *cu = sgmv_driver(&status);
  if (!cu) return (sgmv_status_t)status;
  kernel_params_t p;
  void *scratch = NULL, *profile_scratch = NULL;
  void *params[] = {SGMV_KERNEL_PARAMS(ADDR) & scratch, &profile_scratch};
  /* Both planned at the stream's arch before the first launch (a failure launches nothing), then
   * launched in stream order in one context entry. */
  int pushed, arch = 0;
  CUdevice dev = 0;
  status = enter_context(cu, stream, &pushed, &dev, &arch);
  if (!status) status = layer_launches(c, arch, l);
  for (int i = 0; i < 2 && !status; i++)
    for (int step = 0; !status && step < l[i].config.steps; step++) {
      fill_call(&c[i], &l[i], step, &p);
      status = launch(cu, &l[i], dev, params, stream);
    }
  if (pushed) {
    CUcontext popped;
    cu->cuCtxPopCurrent(&popped);
  }
  return (sgmv_status_t)status;
}

SGMV_API sgmv_status_t sgmv_layer_apply_launches(const sgmv_layer_t *layer, const sgmv_step_t *step,
                                                 const sgmv_tensor_t *inputs, const sgmv_tensor_t *output,
                                                 int32_t add_inputs, int cubin_arch, sgmv_launches_t *out) {
  sgmv_call_t c[2];
  sgmv_launch_t l[2];
  kernel_params_t p;
  int status = start_description(out, "sgmv_layer_apply_launches");
  if (!status) status = sgmv_layer_calls(layer, step, inputs, output, add_inputs, NULL, c);
  if (!status) status = layer_launches(c, cubin_arch, l);
  for (int i = 0; i < 2 && !status; i++) status = describe(&c[i], &l[i], &call_kernel, &p, out);
  return (sgmv_status_t)status;
}
