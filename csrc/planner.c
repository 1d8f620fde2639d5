/* The planner: every decision made before a launch, as pure functions of the arguments and a
 * cubin arch (no driver). sgmv_expand and sgmv_batch_plan_build launch what it decides; the
 * Triton JIT path asks it (sgmv_expand_config, sgmv_batch_plan_config) and launches the same. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"
#include "sgmv.h"
#include "variant.h"

#define INVALID(fn, ...) sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, fn ": " __VA_ARGS__)
/* 65535 column tiles of the narrowest tile the table may use (64; aot/generate.py checks). */
#define SGMV_MAX_HIDDEN (65535 * 64)
#define SGMV_MAX_RANK 256

/* ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b. */
static int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static int is_float(int t) { return t == SGMV_DTYPE_FLOAT16 || t == SGMV_DTYPE_BFLOAT16 || t == SGMV_DTYPE_FLOAT32; }
static int is_meta(int t) { return t == SGMV_DTYPE_INT32 || t == SGMV_DTYPE_INT64; }

static const char *dtype_name(int t) {
  static const char *names[] = {"float16", "bfloat16", "float32", "int32", "int64"};
  return t >= 0 && t <= SGMV_DTYPE_INT64 ? names[t] : "unknown";
}

/* ---- the arch family ----------------------------------------------------------------------- */

/* sm_80 code runs on every 8.x; Triton builds sm_90, sm_100 and sm_120 as arch-specific (sm_90a,
 * ...), which run on that exact capability only. */
SGMV_API int sgmv_cubin_arch(int cc) {
  int arch = cc / 10 == 8 ? 80 : cc;
  for (const char *p = sgmv_archs_list; *p;) {
    if (atoi(p) == arch) return arch;
    while (*p && *p != ',') p++;
    if (*p) p++;
  }
  return 0;
}

/* ---- argument structs of any size ---------------------------------------------------------- */

/* The size of version 0.1's sgmv_expand_args_t: the smallest a caller may pass. */
#define EXPAND_ARGS_V0_1 (offsetof(sgmv_expand_args_t, stream) + sizeof(sgmv_stream_t))

SGMV_API void sgmv_expand_args_init(sgmv_expand_args_t *args) {
  if (!args) return;
  memset(args, 0, sizeof *args);
  args->struct_size = sizeof *args;
}

int sgmv_expand_args_read(const sgmv_expand_args_t *a, sgmv_expand_args_t *out) {
  if (!a) return INVALID("sgmv_expand", "args is NULL");
  if (a->struct_size < EXPAND_ARGS_V0_1)
    return INVALID("sgmv_expand", "args->struct_size is %zu, smaller than any version of sgmv_expand_args_t: "
                   "initialise it with SGMV_EXPAND_ARGS_INIT", a->struct_size);
  if (a->struct_size > sizeof *out)
    return INVALID("sgmv_expand", "args->struct_size is %zu: the caller was built against a newer sgmv.h than "
                   "this libsgmv %d.%d.%d (struct size %zu); update libsgmv", a->struct_size, SGMV_VERSION_MAJOR,
                   SGMV_VERSION_MINOR, SGMV_VERSION_PATCH, sizeof *out);
  memset(out, 0, sizeof *out);
  memcpy(out, a, a->struct_size);
  out->struct_size = sizeof *out;
  return SGMV_SUCCESS;
}

/* ---- validation ---------------------------------------------------------------------------- */

/* Last element offset of a (rows, cols) view with row stride `stride` fits in int64. */
static int extent_fits(int64_t rows, int64_t cols, int64_t stride) {
  int64_t last;
  if (rows <= 0 || cols <= 0) return 1;
  return !__builtin_mul_overflow(rows - 1, stride, &last) && !__builtin_add_overflow(last, cols, &last);
}

/* The plan's layout (python/sgmv/kernels.py): a header, `capacity` row slots, an adapter per
 * sgmv_plan_align slots, and a table of 4 words per segment. Slots a plan of `bytes` bytes holds
 * for `batches` segments (a multiple of the alignment): */
static int64_t plan_capacity(size_t bytes, int64_t batches) {
  int64_t words = (int64_t)(bytes / 4) - sgmv_plan_header - 4 * batches;
  return words <= 0 ? 0 : words / (sgmv_plan_align + 1) * sgmv_plan_align;
}

/* Slots a batch needs: its rows, each adapter's rounded up to a multiple of the alignment. */
static int64_t plan_slots(int64_t batches, int64_t total_tokens) {
  return (cdiv(total_tokens, sgmv_plan_align) + batches) * sgmv_plan_align;
}

SGMV_API size_t sgmv_batch_plan_bytes(int64_t max_batches, int64_t max_tokens) {
  if (max_batches < 0 || max_batches > INT32_MAX / 2 || max_tokens < 0 || max_tokens > INT32_MAX / 2) return 0;
  int64_t cap = plan_slots(max_batches, max_tokens);
  return (size_t)(sgmv_plan_header + cap + cap / sgmv_plan_align + 4 * max_batches) * 4;
}

static int check_counts(const char *fn, int64_t total_tokens, int64_t batches, int64_t num_loras) {
  /* Token and segment counts bounded so that every grid dimension fits CUDA's limits. */
  if (total_tokens < 0 || total_tokens > INT32_MAX / 2)
    return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: total_tokens must be in [0, 2^30), got %lld", fn,
                          (long long)total_tokens);
  if (num_loras < 1 || num_loras > INT32_MAX)
    return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: num_loras must be in [1, 2^31), got %lld", fn,
                          (long long)num_loras);
  if (batches < 0 || batches > INT32_MAX / 2)
    return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: batches must be in [0, 2^30), got %lld", fn,
                          (long long)batches);
  return SGMV_SUCCESS;
}

/* Every check of sgmv_expand's arguments. */
static int validate_expand(const sgmv_expand_args_t *a) {
  if (!is_float(a->inputs_dtype) || !is_float(a->output_dtype) ||
      (a->weights_dtype != SGMV_DTYPE_FLOAT16 && a->weights_dtype != SGMV_DTYPE_BFLOAT16) ||
      !is_meta(a->metadata_dtype) ||
      (a->inputs_dtype != a->weights_dtype && a->inputs_dtype != SGMV_DTYPE_FLOAT32) ||
      (a->output_dtype != a->weights_dtype && a->output_dtype != SGMV_DTYPE_FLOAT32))
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE,
                          "sgmv_expand: unsupported dtypes (inputs %s, weights %s, output %s, metadata %s): "
                          "weights are float16 or bfloat16, inputs and output the weights' dtype or float32, "
                          "metadata int32 or int64",
                          dtype_name(a->inputs_dtype), dtype_name(a->weights_dtype), dtype_name(a->output_dtype),
                          dtype_name(a->metadata_dtype));
  int status = check_counts("sgmv_expand", a->total_tokens, a->batches, a->num_loras);
  if (status) return status;
  if (a->hidden < 1 || a->hidden > SGMV_MAX_HIDDEN)
    return INVALID("sgmv_expand", "hidden must be in [1, %d], got %lld", SGMV_MAX_HIDDEN, (long long)a->hidden);
  if (a->rank < 1 || a->rank > SGMV_MAX_RANK)
    return INVALID("sgmv_expand", "rank must be in [1, %d], got %lld", SGMV_MAX_RANK, (long long)a->rank);
  if (a->max_seq_length < 0)
    return INVALID("sgmv_expand", "max_seq_length must be >= 0, got %lld", (long long)a->max_seq_length);
  if (a->total_tokens > 1 && a->inputs_row_stride < a->rank)
    return INVALID("sgmv_expand", "inputs_row_stride %lld is smaller than rank %lld", (long long)a->inputs_row_stride,
                   (long long)a->rank);
  if (a->hidden > 1 && a->weights_row_stride < a->rank)
    return INVALID("sgmv_expand", "weights_row_stride %lld is smaller than rank %lld",
                   (long long)a->weights_row_stride, (long long)a->rank);
  if (a->total_tokens > 1 && a->output_row_stride < a->hidden)
    return INVALID("sgmv_expand", "output_row_stride %lld is smaller than hidden %lld",
                   (long long)a->output_row_stride, (long long)a->hidden);
  if (a->inputs_row_stride < 0 || a->weights_row_stride < 0 || a->weights_lora_stride < 0 ||
      a->output_row_stride < 0)
    return INVALID("sgmv_expand", "strides must be >= 0");
  if (!extent_fits(a->total_tokens, a->rank, a->inputs_row_stride) ||
      !extent_fits(a->total_tokens, a->hidden, a->output_row_stride) ||
      !extent_fits(a->hidden, a->rank, a->weights_row_stride) ||
      !extent_fits(a->num_loras, a->weights_lora_stride, a->weights_lora_stride))
    return INVALID("sgmv_expand", "a stride is so large that element offsets overflow int64");
  int64_t one_lora = (a->hidden - 1) * a->weights_row_stride + a->rank;
  if (a->num_loras > 1 && a->weights_lora_stride < one_lora)
    return INVALID("sgmv_expand", "weights_lora_stride %lld is smaller than one adapter's extent %lld",
                   (long long)a->weights_lora_stride, (long long)one_lora);
  if (a->batch_plan) {
    if ((uintptr_t)a->batch_plan % 4) return INVALID("sgmv_expand", "batch_plan must be 4-byte aligned");
    if (plan_capacity(a->batch_plan_bytes, a->batches) < plan_slots(a->batches, a->total_tokens))
      return INVALID("sgmv_expand", "batch_plan_bytes %zu is smaller than sgmv_batch_plan_bytes(%lld, %lld) = %zu",
                     a->batch_plan_bytes, (long long)a->batches, (long long)a->total_tokens,
                     sgmv_batch_plan_bytes(a->batches, a->total_tokens));
  }
  if (a->batches == 0 || a->total_tokens == 0) return SGMV_SUCCESS; /* nothing to do: pointers unused */
  if (!a->inputs || !a->weights || !a->output)
    return INVALID("sgmv_expand", "inputs, weights and output must not be NULL");
  if (!a->batch_plan && (!a->seq_start || !a->seq_len || !a->lora_indices))
    return INVALID("sgmv_expand", "seq_start, seq_len and lora_indices must not be NULL");
  return SGMV_SUCCESS;
}

/* ---- tensors ------------------------------------------------------------------------------- */

static const char *const tensor_names[] = {"inputs", "weights", "output", "seq_start", "seq_len", "lora_indices"};

/* Metadata tensors: 1-D, contiguous, one integer dtype, at least batches entries. */
static int check_metadata(const char *fn, const sgmv_tensor_t *m[3], const char *const names[3], int64_t batches) {
  for (int i = 0; i < 3; i++) {
    if (!is_meta(m[i]->dtype))
      return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: %s must be int32 or int64, got %s", fn, names[i],
                            dtype_name(m[i]->dtype));
    if (m[i]->ndim != 1 || (m[i]->shape[0] > 1 && m[i]->strides[0] != 1))
      return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: %s must be a contiguous 1-D tensor", fn, names[i]);
    if (m[i]->shape[0] < batches)
      return sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, "%s: %s has %lld entries, fewer than batches = %lld", fn,
                            names[i], (long long)m[i]->shape[0], (long long)batches);
  }
  if (m[0]->dtype != m[1]->dtype || m[1]->dtype != m[2]->dtype)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: %s, %s and %s must share one dtype, got %s, %s, %s", fn,
                          names[0], names[1], names[2], dtype_name(m[0]->dtype), dtype_name(m[1]->dtype),
                          dtype_name(m[2]->dtype));
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_expand_args_from_tensors(const sgmv_expand_tensors_t *t, sgmv_expand_args_t *a) {
  if (!t || !a) return (sgmv_status_t)INVALID("sgmv_expand", "NULL argument");
  if (t->struct_size != sizeof *t)
    return (sgmv_status_t)INVALID("sgmv_expand", "tensors->struct_size is %zu, expected %zu", t->struct_size,
                                  sizeof *t);
  const sgmv_tensor_t *all[6] = {&t->inputs, &t->weights, &t->output, &t->seq_start, &t->seq_len, &t->lora_indices};
  for (int i = 0; i < 6; i++)
    if (all[i]->ndim < 1 || all[i]->ndim > 4)
      return (sgmv_status_t)INVALID("sgmv_expand", "%s must have 1 to 4 dimensions, got %d", tensor_names[i],
                                    all[i]->ndim);
  const sgmv_tensor_t *x = &t->inputs, *w = &t->weights, *out = &t->output;
  if (x->ndim != 2) return (sgmv_status_t)INVALID("sgmv_expand", "inputs must be 2-D (total_tokens, rank)");
  if (out->ndim != 2) return (sgmv_status_t)INVALID("sgmv_expand", "output must be 2-D (total_tokens, hidden)");
  /* weights (num_loras, hidden, rank) or (num_loras, 1, hidden, rank) */
  int d = w->ndim == 4 ? 1 : 0;
  if (!(w->ndim == 3 || (w->ndim == 4 && w->shape[1] == 1)))
    return (sgmv_status_t)INVALID("sgmv_expand", "weights must be (num_loras, hidden, rank) or "
                                  "(num_loras, 1, hidden, rank)");
  int64_t num_loras = w->shape[0], hidden = w->shape[1 + d], rank = w->shape[2 + d];
  if (x->shape[1] != rank)
    return (sgmv_status_t)INVALID("sgmv_expand", "inputs has rank %lld but weights have rank %lld",
                                  (long long)x->shape[1], (long long)rank);
  if (out->shape[0] != x->shape[0] || out->shape[1] != hidden)
    return (sgmv_status_t)INVALID("sgmv_expand", "output must be (total_tokens, hidden) = (%lld, %lld), got (%lld, %lld)",
                                  (long long)x->shape[0], (long long)hidden, (long long)out->shape[0],
                                  (long long)out->shape[1]);
  if ((x->strides[1] != 1 && rank > 1) || (w->strides[w->ndim - 1] != 1 && rank > 1) ||
      (out->strides[1] != 1 && hidden > 1))
    return (sgmv_status_t)INVALID("sgmv_expand", "inputs, weights and output must have unit stride in their last "
                                  "dimension");
  const sgmv_tensor_t *meta[3] = {&t->seq_start, &t->seq_len, &t->lora_indices};
  int status = check_metadata("sgmv_expand", meta, tensor_names + 3, t->batches);
  if (status) return (sgmv_status_t)status;
  memset(a, 0, sizeof *a);
  a->struct_size = sizeof *a;
  a->inputs = x->data, a->inputs_dtype = x->dtype, a->inputs_row_stride = x->strides[0];
  a->weights = w->data, a->weights_dtype = w->dtype, a->weights_lora_stride = w->strides[0];
  a->weights_row_stride = w->strides[1 + d];
  a->output = (void *)out->data, a->output_dtype = out->dtype, a->output_row_stride = out->strides[0];
  a->total_tokens = x->shape[0], a->hidden = hidden, a->rank = rank, a->num_loras = num_loras;
  a->seq_start = t->seq_start.data, a->seq_len = t->seq_len.data, a->lora_indices = t->lora_indices.data;
  a->metadata_dtype = t->seq_start.dtype, a->batches = t->batches, a->max_seq_length = t->max_seq_length;
  a->add_inputs = t->add_inputs, a->stream = t->stream;
  a->batch_plan = t->batch_plan, a->batch_plan_bytes = t->batch_plan_bytes;
  return SGMV_SUCCESS;
}

/* ---- tiles and grids ----------------------------------------------------------------------- */

/* Aligned variants assume 16-byte aligned base pointers, and N and row strides multiples of
 * sgmv_align_elems: that is what lets them use 16-byte loads and stores (aot/generate.py). */
static int is_aligned(const sgmv_expand_args_t *a) {
  int64_t e = sgmv_align_elems;
  return ((uintptr_t)a->inputs | (uintptr_t)a->weights | (uintptr_t)a->output) % 16 == 0 && a->hidden % e == 0 &&
         a->inputs_row_stride % e == 0 && a->weights_lora_stride % e == 0 && a->weights_row_stride % e == 0 &&
         a->output_row_stride % e == 0;
}

/* The tile rules of aot/tiles.json; returns the tile index, or -1 if the arch has none. */
static int select_tile(const sgmv_expand_args_t *a, int arch, int grouped, int *short_path) {
  *short_path = 0;
  if (!is_aligned(a)) return sgmv_unaligned_tile;
  if (grouped) {
    int64_t rows = cdiv(a->total_tokens, min64(a->batches, a->num_loras));
    for (int i = 0; i < sgmv_num_grouped_rules; i++) {
      const sgmv_grouped_rule_t *r = &sgmv_grouped_rules[i];
      if (r->arch == arch && (r->max_rows < 0 || rows <= r->max_rows) && (r->max_rank < 0 || a->rank <= r->max_rank))
        return r->tile;
    }
    return -1;
  }
  for (int i = 0; i < sgmv_num_rules; i++) {
    const sgmv_rule_t *r = &sgmv_rules[i];
    if (r->arch == arch && (r->max_seq < 0 || a->max_seq_length <= r->max_seq) &&
        (r->max_rank < 0 || a->rank <= r->max_rank)) {
      *short_path = r->short_path;
      return r->tile;
    }
  }
  return -1;
}

static int check_arch(const char *fn, int arch) {
  if (arch <= 0 || sgmv_cubin_arch(arch) != arch)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH, "%s: no cubins for sm_%d (this build holds sm %s)", fn, arch,
                          sgmv_archs_list);
  return SGMV_SUCCESS;
}

int sgmv_decide_expand(const sgmv_expand_args_t *a, int arch, const sgmv_launch_config_t *want, sgmv_launch_t *out) {
  int status = validate_expand(a);
  if (status) return status;
  memset(out, 0, sizeof *out);
  sgmv_launch_config_t *c = &out->config;
  c->struct_size = sizeof *c;
  c->steps = 1;
  c->kernel = "sgmv_expand_kernel";
  c->meta_shift = a->metadata_dtype == SGMV_DTYPE_INT64;
  c->noop = a->batches == 0 || a->total_tokens == 0;
  if (c->noop) return SGMV_SUCCESS;
  if ((status = check_arch("sgmv_expand", arch))) return status;
  /* With a plan, adapter-grouped tiles, except for long segments of one length (uniform
   * prefill), which tile densely by segment already and gain nothing from the plan's gather. */
  int uniform = a->max_seq_length >= 256 && a->max_seq_length <= (a->total_tokens + a->total_tokens / 4) / a->batches;
  int grouped = a->batch_plan && !uniform;
  int short_path, tile_id = select_tile(a, arch, grouped, &short_path);
  if (tile_id < 0) return sgmv_set_error(SGMV_ERROR_INTERNAL, "sgmv_expand: no tile rule for sm_%d", arch);
  const sgmv_tile_t *t = &sgmv_tiles[tile_id];
  sgmv_tile_t asked;
  if (want) { /* a tuner's tile (sgmv_expand_config): the rules' path and grid for it */
    if (want->block_m < 1 || want->block_m > 256 || want->block_n < 64 || want->block_n > 1024 || want->block_k < 1 ||
        want->num_warps < 1 || want->num_stages < 1 || (grouped && sgmv_plan_align % want->block_m))
      return INVALID("sgmv_expand_config", "the requested tile %dx%dx%d (warps %d, stages %d) is out of range (with a plan, "
                     "block_m must divide %d)",
                     want->block_m, want->block_n, want->block_k, want->num_warps, want->num_stages,
                     sgmv_plan_align);
    asked = (sgmv_tile_t){"requested", want->block_m, want->block_n, want->block_k, want->num_warps, want->num_stages};
    t = &asked;
    short_path = !grouped && want->path == SGMV_PATH_SHORT;
  }
  c->tile = t->name;
  c->block_m = t->block_m, c->block_n = t->block_n, c->block_k = t->block_k;
  c->num_warps = t->num_warps, c->num_stages = t->num_stages;
  c->even_k = a->rank % t->block_k == 0;
  int64_t n_tiles = cdiv(a->hidden, t->block_n); /* <= 65535: SGMV_MAX_HIDDEN, tiles >= 64 wide */
  int64_t x, z = 1;
  if (grouped) {
    /* Tiles of the plan's slots: every adapter's rows padded to a multiple of the alignment. */
    c->path = SGMV_PATH_GROUPED;
    c->plan_capacity = plan_capacity(a->batch_plan_bytes, a->batches);
    int64_t slots = (cdiv(a->total_tokens, sgmv_plan_align) + min64(a->batches, a->num_loras)) * sgmv_plan_align;
    x = cdiv(min64(slots, c->plan_capacity), t->block_m);
  } else if (short_path) {
    c->path = SGMV_PATH_SHORT;
    x = cdiv(a->batches, t->block_m);
    /* Adapter slots: enough programs to fill the GPU, never more slots than adapters. */
    z = sgmv_short_programs / (x * n_tiles);
    z = z < 1 ? 1 : z > a->num_loras ? a->num_loras : z > 65535 ? 65535 : z;
  } else {
    /* By segment unless most of that grid would idle (a long segment beside many short ones). */
    int64_t flat = cdiv(a->total_tokens, t->block_m) + a->batches; /* < 2^31: validate bounds both */
    int64_t row_tiles = cdiv(a->max_seq_length, t->block_m);
    row_tiles = row_tiles < 1 ? 1 : row_tiles > 65535 ? 65535 : row_tiles;
    c->path = SGMV_PATH_ROWS;
    c->flat = a->batches * row_tiles > 2 * flat;
    if (c->flat) x = flat;
    else x = a->batches, z = row_tiles;
  }
  c->grid[0] = (uint32_t)x, c->grid[1] = (uint32_t)n_tiles, c->grid[2] = (uint32_t)z;
  out->key = (sgmv_variant_key_t){arch, SGMV_KERNEL_EXPAND, tile_id, c->path, a->inputs_dtype, a->weights_dtype,
                                  a->output_dtype, c->even_k};
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_expand_config(const sgmv_expand_args_t *args, int cubin_arch, sgmv_launch_config_t *config) {
  sgmv_expand_args_t a;
  sgmv_launch_t launch;
  if (!config) return (sgmv_status_t)INVALID("sgmv_expand_config", "config is NULL");
  sgmv_launch_config_t want = *config;
  int status = sgmv_expand_args_read(args, &a);
  if (!status) status = sgmv_decide_expand(&a, cubin_arch, want.block_m > 0 ? &want : NULL, &launch);
  if (!status) *config = launch.config;
  return (sgmv_status_t)status;
}

/* ---- the batch plan ------------------------------------------------------------------------ */

int sgmv_decide_batch_plan(const sgmv_batch_plan_args_t *a, int arch, sgmv_launch_t *out) {
  if (!a) return INVALID("sgmv_batch_plan_build", "args is NULL");
  if (a->struct_size != sizeof *a)
    return INVALID("sgmv_batch_plan_build", "args->struct_size is %zu, expected %zu: initialise it with "
                   "SGMV_BATCH_PLAN_ARGS_INIT", a->struct_size, sizeof *a);
  const sgmv_tensor_t *meta[3] = {&a->seq_start, &a->seq_len, &a->lora_indices};
  int status = check_metadata("sgmv_batch_plan_build", meta, tensor_names + 3, a->batches);
  if (status) return status;
  if ((status = check_counts("sgmv_batch_plan_build", a->total_tokens, a->batches, a->num_loras))) return status;
  if (!a->plan || (uintptr_t)a->plan % 4) return INVALID("sgmv_batch_plan_build", "plan must be a 4-byte aligned pointer");
  if (plan_capacity(a->plan_bytes, a->batches) < plan_slots(a->batches, a->total_tokens))
    return INVALID("sgmv_batch_plan_build", "plan_bytes %zu is smaller than sgmv_batch_plan_bytes(%lld, %lld) = %zu",
                   a->plan_bytes, (long long)a->batches, (long long)a->total_tokens,
                   sgmv_batch_plan_bytes(a->batches, a->total_tokens));
  if (a->batches && (!a->seq_start.data || !a->seq_len.data || !a->lora_indices.data))
    return INVALID("sgmv_batch_plan_build", "seq_start, seq_len and lora_indices must not be NULL");
  if ((status = check_arch("sgmv_batch_plan_build", arch))) return status;
  memset(out, 0, sizeof *out);
  sgmv_launch_config_t *c = &out->config;
  c->struct_size = sizeof *c;
  c->kernel = "sgmv_plan_kernel";
  c->meta_shift = a->seq_start.dtype == SGMV_DTYPE_INT64;
  c->plan_capacity = plan_capacity(a->plan_bytes, a->batches);
  /* Always launched, even for an empty batch: the plan must say it holds no rows. Two launches
   * (steps); programs of SEGS segments each, and enough per segment group to split long
   * segments' rows. */
  const sgmv_plan_size_t *size = &sgmv_plan_size;
  int64_t y = cdiv(a->total_tokens, 4096);
  c->tile = "plan";
  c->steps = 2;
  c->block_b = size->segs, c->scan = size->scan, c->rows = size->rows;
  c->num_warps = size->num_warps, c->num_stages = 1;
  c->grid[0] = (uint32_t)(a->batches ? cdiv(a->batches, size->segs) : 1);
  c->grid[1] = (uint32_t)(y < 1 ? 1 : y > 64 ? 64 : y);
  c->grid[2] = 1;
  out->key = (sgmv_variant_key_t){arch, SGMV_KERNEL_PLAN, 0, 0, 0, 0, 0, 0};
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_batch_plan_config(const sgmv_batch_plan_args_t *args, int cubin_arch,
                                              sgmv_launch_config_t *config) {
  sgmv_launch_t launch;
  if (!config) return (sgmv_status_t)INVALID("sgmv_batch_plan_config", "config is NULL");
  int status = sgmv_decide_batch_plan(args, cubin_arch, &launch);
  if (!status) *config = launch.config;
  return (sgmv_status_t)status;
}
