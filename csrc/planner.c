/* The planner: every decision made before a launch, as pure functions of the arguments and a
 * cubin arch (no driver). sgmv_expand, sgmv_shrink and sgmv_batch_plan_build launch what it
 * decides; the Triton JIT path asks it (sgmv_expand_config, sgmv_shrink_config,
 * sgmv_batch_plan_config) and launches the same. Expand and shrink are both one call of
 * sgmv_kernel (sgmv_call_t): the checks below turn either into one. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "sgmv.h"
#include "variant.h"

#define INVALID(...) sgmv_set_error(SGMV_ERROR_INVALID_ARGUMENT, __VA_ARGS__)
/* CUDA's limit on grid dimensions 1 and 2. */
#define GRID_MAX 65535
/* Column tiles of expand's narrowest tile (aot/variants.py MIN_EXPAND_BLOCK_N) fit the grid. */
#define SGMV_MAX_HIDDEN (GRID_MAX * SGMV_MIN_EXPAND_BLOCK_N)
#define SGMV_MAX_RANK 256
#define SGMV_MAX_SHRINK_HIDDEN (1 << 20)

/* ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b. */
static int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static const char *const tensor_names[] = {"inputs", "weights", "output", "seq_start", "seq_len", "lora_indices"};

_Static_assert(SGMV_PATH_ROWS == SGMV_KERNEL_PATH_ROWS && SGMV_PATH_SHORT == SGMV_KERNEL_PATH_SHORT &&
                   SGMV_PATH_GROUPED == SGMV_KERNEL_PATH_GROUPED,
               "sgmv.h's sgmv_path_t must have kernels/sgmv.py's PATH_* values");

static int is_meta(int t) { return t == SGMV_DTYPE_INT32 || t == SGMV_DTYPE_INT64; }

static const char *dtype_name(int t) {
  static const char *names[] = {"float16", "bfloat16", "float32", "int32", "int64", "float8_e4m3fn"};
  return t >= 0 && t <= SGMV_DTYPE_FLOAT8_E4M3FN ? names[t] : "unknown";
}

static int dtype_size(int t) {
  static const int sizes[] = {2, 2, 4, 4, 8, 1};
  return t >= 0 && t <= SGMV_DTYPE_FLOAT8_E4M3FN ? sizes[t] : 1;
}

/* Weights of this dtype come with scales, and have rules (and variants) of their own. */
static int is_fp8(int t) { return t == SGMV_DTYPE_FLOAT8_E4M3FN; }

/* Whether the rules of op for weights of class fp8 cover arch (an arch without them has no variants). */
static int has_rules(int op, int arch, int fp8) {
  for (int i = 0; i < sgmv_num_rules; i++)
    if (sgmv_rules[i].op == op && sgmv_rules[i].arch == arch && sgmv_rules[i].fp8 == fp8) return 1;
  return 0;
}

/* The arch at *p in the build's list ("80,90,..."), and *p moved past it. */
static int next_arch(const char **p) {
  int arch = atoi(*p);
  while (**p && **p != ',') (*p)++;
  if (**p) (*p)++;
  return arch;
}

/* The build's archs that have variants for op's weights of class fp8, as "90,100" ("none" if none). */
void sgmv_archs_with_rules(int op, int fp8, char *list, size_t size) {
  size_t n = 0;
  list[0] = 0;
  for (const char *p = sgmv_archs_list; *p;) {
    int arch = next_arch(&p);
    if (has_rules(op, arch, fp8) && n < size) n += (size_t)snprintf(list + n, size - n, "%s%d", n ? "," : "", arch);
  }
  if (!n) snprintf(list, size, "none");
}

int sgmv_first_arch(const sgmv_call_t *c) {
  for (const char *p = sgmv_archs_list; *p;) {
    int arch = next_arch(&p);
    if (has_rules(c->op, arch, is_fp8(c->w_dtype))) return arch;
  }
  return atoi(sgmv_archs_list);
}

/* (op, inputs, weights, output) the variants serve: aot/variants.py DTYPES, generated. */
static const int dtype_matrix[][4] = {
#define ROW(op, x, w, out) {op, x, w, out},
    SGMV_DTYPE_MATRIX(ROW)
#undef ROW
};

/* ---- the arch family ----------------------------------------------------------------------- */

/* sm_80 code runs on every 8.x; Triton builds sm_90, sm_100 and sm_120 as arch-specific (sm_90a,
 * ...), which run on that exact capability only. */
SGMV_API int sgmv_cubin_arch(int cc) {
  int arch = cc / 10 == 8 ? 80 : cc;
  for (const char *p = sgmv_archs_list; *p;)
    if (next_arch(&p) == arch) return arch;
  return 0;
}

/* ---- argument structs of any size ---------------------------------------------------------- */

/* Sizes of earlier versions' structs: the smallest a caller may pass. */
#define EXPAND_ARGS_V0_1 (offsetof(sgmv_expand_args_t, stream) + sizeof(sgmv_stream_t))
#define EXPAND_TENSORS_V0_2 (offsetof(sgmv_expand_tensors_t, batch_plan_bytes) + sizeof(size_t))
#define SHRINK_ARGS_V0_3 (offsetof(sgmv_shrink_args_t, stream) + sizeof(sgmv_stream_t))
#define SHRINK_TENSORS_V0_3 (offsetof(sgmv_shrink_tensors_t, workspace_bytes) + sizeof(size_t))
#define LAYER_ARGS_V0_4 (offsetof(sgmv_layer_args_t, scaling) + sizeof(float))

SGMV_API void sgmv_expand_args_init(sgmv_expand_args_t *args) {
  if (!args) return;
  memset(args, 0, sizeof *args);
  args->struct_size = sizeof *args;
}

SGMV_API void sgmv_shrink_args_init(sgmv_shrink_args_t *args) {
  if (!args) return;
  memset(args, 0, sizeof *args);
  args->struct_size = sizeof *args;
  args->scaling = 1.0f;
}

/* Copies a caller's struct of size in [oldest, size] into out (fields it lacks zeroed). */
static int read_struct(const char *fn, const char *type, const void *in, size_t in_size, size_t oldest, void *out,
                       size_t size) {
  char init[64];
  snprintf(init, sizeof init, "%s", type + 5); /* sgmv_expand_args_t -> SGMV_EXPAND_ARGS_INIT */
  for (char *p = init; *p; p++) *p = *p == '_' && p[1] == 't' && !p[2] ? 0 : *p >= 'a' && *p <= 'z' ? *p - 32 : *p;
  if (!in) return INVALID("%s: args is NULL", fn);
  if (in_size < oldest)
    return INVALID("%s: args->struct_size is %zu, smaller than any version of %s: initialise it with SGMV_%s_INIT",
                   fn, in_size, type, init);
  if (in_size > size)
    return INVALID("%s: args->struct_size is %zu: the caller was built against a newer sgmv.h than this libsgmv %d.%d.%d "
                   "(struct size %zu); update libsgmv", fn, in_size, SGMV_VERSION_MAJOR, SGMV_VERSION_MINOR,
                   SGMV_VERSION_PATCH, size);
  memset(out, 0, size);
  memcpy(out, in, in_size);
  *(size_t *)out = size;
  return SGMV_SUCCESS;
}

/* ---- validation ---------------------------------------------------------------------------- */

/* Last element offset of a (rows, cols) view with row stride `stride` fits in int64. */
static int extent_fits(int64_t rows, int64_t cols, int64_t stride) {
  int64_t last;
  if (rows <= 0 || cols <= 0) return 1;
  return !__builtin_mul_overflow(rows - 1, stride, &last) && !__builtin_add_overflow(last, cols, &last);
}

/* The plan's layout in int32 words (kernels/sgmv.py, generated): a header, `capacity` row slots,
 * an adapter per SGMV_PLAN_ALIGN slots, and a table of SGMV_PLAN_TABLE words per segment. Slots a
 * plan of `bytes` bytes holds for `batches` segments (a multiple of the alignment): */
static int64_t plan_capacity(size_t bytes, int64_t batches) {
  int64_t words = (int64_t)(bytes / 4) - SGMV_PLAN_HEADER - SGMV_PLAN_TABLE * batches;
  return words <= 0 ? 0 : words / (SGMV_PLAN_ALIGN + 1) * SGMV_PLAN_ALIGN;
}

/* Slots a batch needs: its rows, each adapter's rounded up to a multiple of the alignment. */
static int64_t plan_slots(int64_t batches, int64_t total_tokens) {
  return (cdiv(total_tokens, SGMV_PLAN_ALIGN) + batches) * SGMV_PLAN_ALIGN;
}

SGMV_API size_t sgmv_batch_plan_bytes(int64_t max_batches, int64_t max_tokens) {
  if (max_batches < 0 || max_batches > INT32_MAX / 2 || max_tokens < 0 || max_tokens > INT32_MAX / 2) return 0;
  int64_t cap = plan_slots(max_batches, max_tokens);
  return (size_t)(SGMV_PLAN_HEADER + cap + cap / SGMV_PLAN_ALIGN + SGMV_PLAN_TABLE * max_batches) * 4;
}

/* The split rule's workspace: fp32 partial sums of every split program. */
SGMV_API size_t sgmv_shrink_workspace_bytes(int64_t max_tokens, int64_t output_columns) {
  if (max_tokens < 1 || max_tokens > INT32_MAX / 2 || output_columns < 1 ||
      output_columns > SGMV_MAX_SLICES * SGMV_MAX_RANK)
    return 0;
  return (size_t)sgmv_split_rule.max_split * (size_t)min64(max_tokens, sgmv_split_rule.max_tokens) *
         (size_t)output_columns * 4;
}

SGMV_API size_t sgmv_shrink_call_workspace_bytes(int64_t total_tokens, int64_t output_columns) {
  return total_tokens > sgmv_split_rule.max_tokens ? 0 : sgmv_shrink_workspace_bytes(total_tokens, output_columns);
}

static int check_counts(const char *fn, int64_t total_tokens, int64_t batches, int64_t num_loras) {
  /* Token and segment counts bounded so that every grid dimension fits CUDA's limits. */
  if (total_tokens < 0 || total_tokens > INT32_MAX / 2)
    return INVALID("%s: args->total_tokens must be in [0, 2^30), got %lld", fn, (long long)total_tokens);
  if (num_loras < 1 || num_loras > INT32_MAX)
    return INVALID("%s: args->num_loras must be in [1, 2^31), got %lld", fn, (long long)num_loras);
  if (batches < 0 || batches > INT32_MAX / 2)
    return INVALID("%s: args->batches must be in [0, 2^30), got %lld", fn, (long long)batches);
  return SGMV_SUCCESS;
}

/* Dtypes: a combination of the matrix, metadata int32 or int64. */
static int check_dtypes(const char *fn, int op, int x, int w, int out, int meta) {
  if (!is_meta(meta))
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: args->metadata_dtype is %s: metadata are int32 or int64",
                          fn, dtype_name(meta));
  /* What is served: with these weights, the (inputs, output) pairs; else the weights' dtypes. */
  char served[320] = "";
  size_t n = 0;
  int known = 0;
  for (size_t i = 0; i < sizeof dtype_matrix / sizeof *dtype_matrix; i++) {
    const int *r = dtype_matrix[i];
    if (r[0] != op) continue;
    if (r[1] == x && r[2] == w && r[3] == out) return SGMV_SUCCESS;
    known |= r[2] == w;
  }
  int listed = -1; /* the weights dtype listed last: the matrix keeps each one's rows together */
  for (size_t i = 0; i < sizeof dtype_matrix / sizeof *dtype_matrix; i++) {
    const int *r = dtype_matrix[i];
    if (r[0] != op || (known ? r[2] != w : r[2] == listed) || n >= sizeof served) continue;
    listed = r[2];
    n += known ? (size_t)snprintf(served + n, sizeof served - n, "%s(%s, %s)", n ? ", " : "", dtype_name(r[1]),
                                  dtype_name(r[3]))
               : (size_t)snprintf(served + n, sizeof served - n, "%s%s", n ? ", " : "", dtype_name(r[2]));
  }
  if (known)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE,
                          "%s: unsupported dtypes (args->inputs_dtype %s, args->weights_dtype %s, args->output_dtype "
                          "%s): served with %s weights (inputs, output): %s",
                          fn, dtype_name(x), dtype_name(w), dtype_name(out), dtype_name(w), served);
  return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE,
                        "%s: unsupported dtypes (args->inputs_dtype %s, args->weights_dtype %s, args->output_dtype %s): "
                        "served weights: %s",
                        fn, dtype_name(x), dtype_name(w), dtype_name(out), served);
}

/* Required pointers, every NULL one named. The weights are always read; the other data only by a
 * call with rows to compute (an empty tensor's data may be NULL); the metadata not with a plan. */
static int check_null(const char *fn, int work, int num_slices, const void *const ptrs[8], const void *plan) {
  static const char *const names[8] = {"inputs", "weights", "slices[0].weights", "slices[1].weights", "output",
                                       "seq_start", "seq_len", "lora_indices"};
  num_slices = num_slices >= 0 && num_slices <= SGMV_MAX_SLICES ? num_slices : 1; /* a bad count: checked next */
  const int needed[8] = {work, 1, num_slices > 1, num_slices > 2, work, work && !plan, work && !plan, work && !plan};
  char list[160] = "";
  size_t n = 0;
  int count = 0;
  for (int i = 0; i < 8; i++)
    if (needed[i] && !ptrs[i] && n < sizeof list) {
      n += (size_t)snprintf(list + n, sizeof list - n, "%sargs->%s", count ? ", " : "", names[i]);
      count++;
    }
  return count ? INVALID("%s: %s %s NULL", fn, list, count > 1 ? "are" : "is") : SGMV_SUCCESS;
}

/* A pointer whose address is not a multiple of `bytes` (its element size, or what the kernel assumes). */
static int check_aligned(const char *fn, const char *name, const void *p, int bytes, const char *what) {
  if ((uintptr_t)p % (uintptr_t)bytes)
    return INVALID("%s: args->%s is not aligned to %s (%d bytes)", fn, name, what, bytes);
  return SGMV_SUCCESS;
}

/* A (rows, slices, cols) view of `name` with row stride rs and slice stride ss (one slice: ss
 * unused): the slices side by side in each row (cols <= ss, (slices - 1) * ss + cols <= rs) or in
 * planes (cols <= rs, (rows - 1) * rs + cols <= ss), its last offset within int64. */
static int check_view(const char *fn, const char *name, int64_t rows, int slices, int64_t cols, int64_t rs, int64_t ss,
                      const char *cols_name) {
  const char *slice_field = name[0] == 'i' ? "inputs_slice_stride" : "output_slice_stride";
  int64_t last, plane;
  if (__builtin_mul_overflow((int64_t)(slices - 1), ss, &last) || __builtin_add_overflow(last, cols, &last))
    return INVALID("%s: args->%s %lld is so large that element offsets overflow int64", fn, slice_field,
                   (long long)ss);
  if (slices > 1 && ss < cols)
    return INVALID("%s: args->%s %lld is smaller than rank %lld", fn, slice_field, (long long)ss, (long long)cols);
  int planes = slices > 1 && rows > 1 && ss > rs && !__builtin_mul_overflow(rows - 1, rs, &plane) &&
               plane <= INT64_MAX - cols && ss >= plane + cols;
  if (rows > 1 && rs < (planes ? cols : last))
    return INVALID("%s: args->%s_row_stride %lld is smaller than %s %lld", fn, name, (long long)rs,
                   planes ? "rank" : cols_name, (long long)(planes ? cols : last));
  if (rs < 0) return INVALID("%s: args->%s_row_stride must be >= 0, got %lld", fn, name, (long long)rs);
  if (!extent_fits(rows, last, rs))
    return INVALID("%s: args->%s_row_stride %lld is so large that element offsets overflow int64", fn, name,
                   (long long)rs);
  return SGMV_SUCCESS;
}

/* The checks expand and shrink share, on the call they were turned into. K is rank (expand) or
 * hidden (shrink); each slice's weights are (num_loras, N, K). */
static int check_call(const char *fn, const sgmv_call_t *c) {
  int status = check_counts(fn, c->total_tokens, c->batches, c->num_loras);
  if (status) return status;
  if (c->max_seq_length < 0)
    return INVALID("%s: args->max_seq_length must be >= 0, got %lld", fn, (long long)c->max_seq_length);
  int expand = c->op == SGMV_OP_EXPAND;
  int64_t rank = expand ? c->K : c->w[0].rows;
  const char *x_cols = !expand ? "hidden" : c->num_slices > 1 ? "num_slices * rank" : "rank";
  int status_x = check_view(fn, "inputs", c->total_tokens, expand ? c->num_slices : 1, expand ? rank : c->K,
                            c->x_stride, c->x_slice_step, x_cols);
  if (status_x) return status_x;
  if (expand) { /* slices of different widths, side by side */
    if (c->total_tokens > 1 && c->out_stride < c->out_cols)
      return INVALID("%s: args->output_row_stride %lld is smaller than hidden %lld", fn, (long long)c->out_stride,
                     (long long)c->out_cols);
    if (c->out_stride < 0)
      return INVALID("%s: args->output_row_stride must be >= 0, got %lld", fn, (long long)c->out_stride);
    if (!extent_fits(c->total_tokens, c->out_cols, c->out_stride))
      return INVALID("%s: args->output_row_stride %lld is so large that element offsets overflow int64", fn,
                     (long long)c->out_stride);
  } else if ((status_x = check_view(fn, "output", c->total_tokens, c->num_slices, rank, c->out_stride,
                                    c->out_slice_step, "num_slices * rank")))
    return status_x;
  for (int s = 0; s < c->num_slices; s++) {
    const sgmv_slice_t *w = &c->w[s];
    char row[32], lora[32];
    snprintf(row, sizeof row, s ? "slices[%d].row_stride" : "weights_row_stride", s - 1);
    snprintf(lora, sizeof lora, s ? "slices[%d].lora_stride" : "weights_lora_stride", s - 1);
    if (w->row_stride < 0) return INVALID("%s: args->%s must be >= 0, got %lld", fn, row, (long long)w->row_stride);
    if (w->lora_stride < 0) return INVALID("%s: args->%s must be >= 0, got %lld", fn, lora, (long long)w->lora_stride);
    if (w->rows > 1 && w->row_stride < c->K)
      return INVALID("%s: args->%s %lld is smaller than %s %lld", fn, row, (long long)w->row_stride,
                     c->op == SGMV_OP_EXPAND ? "rank" : "hidden", (long long)c->K);
    if (!extent_fits(w->rows, c->K, w->row_stride))
      return INVALID("%s: args->%s %lld is so large that element offsets overflow int64", fn, row,
                     (long long)w->row_stride);
    if (!extent_fits(c->num_loras, w->lora_stride, w->lora_stride))
      return INVALID("%s: args->%s %lld is so large that element offsets overflow int64", fn, lora,
                     (long long)w->lora_stride);
    int64_t one_lora = (w->rows - 1) * w->row_stride + c->K;
    if (c->num_loras > 1 && w->lora_stride < one_lora)
      return INVALID("%s: args->%s %lld is smaller than one adapter's extent %lld", fn, lora, (long long)w->lora_stride,
                     (long long)one_lora);
  }
  /* fp8 weights: every slice's scales, within int64; other weights: none. */
  for (int s = 0; s < c->num_slices; s++) {
    const sgmv_scales_t *ws = &c->ws[s];
    char name[40];
    snprintf(name, sizeof name, "weight_scales[%d]", s);
    if (!is_fp8(c->w_dtype) && ws->scales)
      return INVALID("%s: args->%s.scales is set, but the weights are %s: scales are for %s weights only", fn, name,
                     dtype_name(c->w_dtype), dtype_name(SGMV_DTYPE_FLOAT8_E4M3FN));
    if (!is_fp8(c->w_dtype)) continue;
    if (!ws->scales)
      return INVALID("%s: args->%s.scales is NULL: %s weights need scales for every slice", fn, name,
                     dtype_name(c->w_dtype));
    if (ws->lora_stride < 0 || ws->channel_stride < 0)
      return INVALID("%s: args->%s's strides must be >= 0, got %lld and %lld", fn, name, (long long)ws->lora_stride,
                     (long long)ws->channel_stride);
    if (!extent_fits(c->num_loras, 1, ws->lora_stride) || !extent_fits(c->w[s].rows, 1, ws->channel_stride) ||
        (c->num_loras - 1) * ws->lora_stride > INT64_MAX - (c->w[s].rows - 1) * ws->channel_stride)
      return INVALID("%s: args->%s's strides are so large that offsets overflow int64", fn, name);
    int status_s = check_aligned(fn, name, ws->scales, 4, "its element size");
    if (status_s) return status_s;
  }
  /* Every pointer at a multiple of its element size; the workspace as the aligned variants assume. */
  char name[32];
  int misaligned = check_aligned(fn, "inputs", c->x, dtype_size(c->x_dtype), "its element size");
  for (int s = 0; !misaligned && s < c->num_slices; s++) {
    snprintf(name, sizeof name, s ? "slices[%d].weights" : "weights", s - 1);
    misaligned = check_aligned(fn, name, c->w[s].weights, dtype_size(c->w_dtype), "its element size");
  }
  const void *meta[3] = {c->seq_start, c->seq_len, c->lora_indices};
  for (int i = 0; !misaligned && i < 3; i++)
    misaligned = check_aligned(fn, tensor_names[3 + i], meta[i], dtype_size(c->metadata_dtype), "its element size");
  if (!misaligned) misaligned = check_aligned(fn, "output", c->out, dtype_size(c->out_dtype), "its element size");
  if (!misaligned) misaligned = check_aligned(fn, "lora_ranks", c->ranks, 4, "its element size");
  if (!misaligned) misaligned = check_aligned(fn, "lora_scales", c->scales, 4, "its element size");
  if (!misaligned) misaligned = check_aligned(fn, "batch_plan", c->plan, 4, "its element size");
  if (!misaligned) misaligned = check_aligned(fn, "workspace", c->work, SGMV_ALIGN_BYTES, "what the kernels assume");
  if (misaligned) return misaligned;
  if (c->plan && plan_capacity(c->plan_bytes, c->batches) < plan_slots(c->batches, c->total_tokens))
    return INVALID("%s: args->batch_plan_bytes %zu is smaller than sgmv_batch_plan_bytes(%lld, %lld) = %zu", fn,
                   c->plan_bytes, (long long)c->batches, (long long)c->total_tokens,
                   sgmv_batch_plan_bytes(c->batches, c->total_tokens));
  return SGMV_SUCCESS;
}

static int check_slices(const char *fn, int32_t num_slices) {
  if (num_slices < 0 || num_slices > SGMV_MAX_SLICES)
    return INVALID("%s: args->num_slices must be in [0, %d], got %d", fn, SGMV_MAX_SLICES, num_slices);
  return SGMV_SUCCESS;
}

/* What both ops check first: the pointers they need, dtypes, the slice count, the rank. The
 * fields are the same in sgmv_expand_args_t and sgmv_shrink_args_t. */
#define CHECK_OP(fn, op, a)                                                                                         \
  do {                                                                                                              \
    const void *ptrs_[8] = {(a).inputs, (a).weights, (a).slices[0].weights, (a).slices[1].weights, (a).output,    \
                            (a).seq_start, (a).seq_len, (a).lora_indices};                                        \
    int status_ = check_null(fn, (a).batches > 0 && (a).total_tokens > 0, (a).num_slices, ptrs_, (a).batch_plan);  \
    if (!status_) status_ = check_dtypes(fn, op, (a).inputs_dtype, (a).weights_dtype, (a).output_dtype,           \
                                         (a).metadata_dtype);                                                     \
    if (!status_) status_ = check_slices(fn, (a).num_slices);                                                     \
    if (!status_ && ((a).rank < 1 || (a).rank > SGMV_MAX_RANK))                                                   \
      status_ = INVALID("%s: args->rank must be in [1, %d], got %lld", fn, SGMV_MAX_RANK, (long long)(a).rank);   \
    if (status_) return status_;                                                                                  \
  } while (0)

int sgmv_expand_call(const sgmv_expand_args_t *args, sgmv_call_t *c) {
  const char *fn = "sgmv_expand";
  sgmv_expand_args_t a;
  int status = read_struct(fn, "sgmv_expand_args_t", args, args ? args->struct_size : 0, EXPAND_ARGS_V0_1, &a,
                           sizeof a);
  if (status) return status;
  CHECK_OP(fn, SGMV_OP_EXPAND, a);
  memset(c, 0, sizeof *c);
  c->op = SGMV_OP_EXPAND;
  c->num_slices = a.num_slices > 1 ? a.num_slices : 1;
  c->w[0] = (sgmv_slice_t){a.weights, a.weights_lora_stride, a.weights_row_stride, a.hidden};
  for (int s = 1; s < c->num_slices; s++) c->w[s] = a.slices[s - 1];
  for (int s = 0; s < c->num_slices; s++) c->ws[s] = a.weight_scales[s];
  for (int s = 0; s < c->num_slices; s++) {
    if (c->w[s].rows < 1 || c->w[s].rows > SGMV_MAX_HIDDEN)
      return s ? INVALID("%s: args->slices[%d].rows (hidden) must be in [1, %d], got %lld", fn, s - 1,
                         SGMV_MAX_HIDDEN, (long long)c->w[s].rows)
               : INVALID("%s: args->hidden must be in [1, %d], got %lld", fn, SGMV_MAX_HIDDEN, (long long)c->w[s].rows);
    c->out_cols += c->w[s].rows;
  }
  /* Column tiles of every slice together fit the grid (expand tiles are >= SGMV_MIN_EXPAND_BLOCK_N wide). */
  if (c->out_cols > SGMV_MAX_HIDDEN - SGMV_MIN_EXPAND_BLOCK_N * (c->num_slices - 1))
    return INVALID("%s: args->hidden and args->slices[].rows add up to %lld, more than %d", fn, (long long)c->out_cols,
                   SGMV_MAX_HIDDEN - SGMV_MIN_EXPAND_BLOCK_N * (c->num_slices - 1));
  c->x = a.inputs, c->x_dtype = a.inputs_dtype, c->x_stride = a.inputs_row_stride;
  c->x_slice_step = c->num_slices > 1 ? (a.inputs_slice_stride ? a.inputs_slice_stride : a.rank) : 0;
  c->w_dtype = a.weights_dtype;
  c->out = a.output, c->out_dtype = a.output_dtype, c->out_stride = a.output_row_stride;
  c->total_tokens = a.total_tokens, c->K = a.rank, c->num_loras = a.num_loras;
  c->seq_start = a.seq_start, c->seq_len = a.seq_len, c->lora_indices = a.lora_indices;
  c->metadata_dtype = a.metadata_dtype, c->batches = a.batches, c->max_seq_length = a.max_seq_length;
  c->add_inputs = a.add_inputs != 0, c->scaling = 1.0f, c->ranks = a.lora_ranks;
  c->plan = a.batch_plan, c->plan_bytes = a.batch_plan_bytes, c->stream = a.stream;
  return check_call(fn, c);
}

int sgmv_shrink_call(const sgmv_shrink_args_t *args, sgmv_call_t *c) {
  const char *fn = "sgmv_shrink";
  sgmv_shrink_args_t a;
  int status = read_struct(fn, "sgmv_shrink_args_t", args, args ? args->struct_size : 0, SHRINK_ARGS_V0_3, &a,
                           sizeof a);
  if (status) return status;
  CHECK_OP(fn, SGMV_OP_SHRINK, a);
  if (a.hidden < 1 || a.hidden > SGMV_MAX_SHRINK_HIDDEN)
    return INVALID("%s: args->hidden must be in [1, %d], got %lld", fn, SGMV_MAX_SHRINK_HIDDEN, (long long)a.hidden);
  memset(c, 0, sizeof *c);
  c->op = SGMV_OP_SHRINK;
  c->num_slices = a.num_slices > 1 ? a.num_slices : 1;
  c->w[0] = (sgmv_slice_t){a.weights, a.weights_lora_stride, a.weights_row_stride, a.rank};
  for (int s = 1; s < c->num_slices; s++) {
    c->w[s] = a.slices[s - 1];
    if (c->w[s].rows != a.rank)
      return INVALID("%s: args->slices[%d].rows is %lld, but every slice has args->rank = %lld", fn, s - 1,
                     (long long)c->w[s].rows, (long long)a.rank);
  }
  c->out_cols = c->num_slices * a.rank;
  for (int s = 0; s < c->num_slices; s++) c->ws[s] = a.weight_scales[s];
  c->x = a.inputs, c->x_dtype = a.inputs_dtype, c->x_stride = a.inputs_row_stride, c->x_slice_step = 0;
  c->w_dtype = a.weights_dtype;
  c->out = a.output, c->out_dtype = a.output_dtype, c->out_stride = a.output_row_stride;
  c->out_slice_step = c->num_slices > 1 ? (a.output_slice_stride ? a.output_slice_stride : a.rank) : 0;
  c->total_tokens = a.total_tokens, c->K = a.hidden, c->num_loras = a.num_loras;
  c->seq_start = a.seq_start, c->seq_len = a.seq_len, c->lora_indices = a.lora_indices;
  c->metadata_dtype = a.metadata_dtype, c->batches = a.batches, c->max_seq_length = a.max_seq_length;
  c->scaling = a.scaling, c->ranks = a.lora_ranks, c->scales = a.lora_scales;
  c->plan = a.batch_plan, c->plan_bytes = a.batch_plan_bytes;
  c->work = a.workspace, c->work_bytes = a.workspace ? a.workspace_bytes : 0, c->stream = a.stream;
  return check_call(fn, c);
}

/* ---- tensors ------------------------------------------------------------------------------- */

/* Metadata tensors: 1-D, contiguous, one integer dtype, at least batches entries. */
static int check_metadata(const char *fn, const char *st, const sgmv_tensor_t *m[3], const char *const names[3],
                          int64_t batches) {
  for (int i = 0; i < 3; i++) {
    if (!is_meta(m[i]->dtype))
      return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: %s->%s must be int32 or int64, got %s", fn, st, names[i],
                            dtype_name(m[i]->dtype));
    if (m[i]->ndim != 1 || (m[i]->shape[0] > 1 && m[i]->strides[0] != 1))
      return INVALID("%s: %s->%s must be a contiguous 1-D tensor", fn, st, names[i]);
    if (m[i]->shape[0] < batches)
      return INVALID("%s: %s->%s has %lld entries, fewer than batches = %lld", fn, st, names[i], (long long)m[i]->shape[0],
                     (long long)batches);
  }
  if (m[0]->dtype != m[1]->dtype || m[1]->dtype != m[2]->dtype)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: %s->%s, %s and %s must share one dtype, got %s, %s, %s",
                          fn, st, names[0], names[1], names[2], dtype_name(m[0]->dtype), dtype_name(m[1]->dtype),
                          dtype_name(m[2]->dtype));
  return SGMV_SUCCESS;
}

/* An optional per-adapter array (data NULL: none): 1-D, contiguous, dtype, >= num_loras entries. */
static int check_per_adapter(const char *fn, const char *name, const sgmv_tensor_t *t, int dtype, int64_t num_loras) {
  if (!t->data) return SGMV_SUCCESS;
  if ((int)t->dtype != dtype)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: tensors->%s must be %s, got %s", fn, name, dtype_name(dtype),
                          dtype_name(t->dtype));
  if (t->ndim != 1 || (t->shape[0] > 1 && t->strides[0] != 1) || t->shape[0] < num_loras)
    return INVALID("%s: tensors->%s must be a contiguous 1-D tensor of >= num_loras = %lld entries", fn, name,
                   (long long)num_loras);
  return SGMV_SUCCESS;
}

/* fp8 weights' scales of one slice (data NULL: none): float32, (num_loras,) or (num_loras, 1) per
 * adapter, (num_loras, rows) per adapter and output channel. */
static int scales_tensor(const char *fn, const char *st, const char *name, const sgmv_tensor_t *t, int64_t loras,
                         int64_t rows, sgmv_scales_t *out) {
  memset(out, 0, sizeof *out);
  if (!t->data) return SGMV_SUCCESS;
  if ((int)t->dtype != SGMV_DTYPE_FLOAT32)
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: %s->%s must be float32, got %s", fn, st, name,
                          dtype_name(t->dtype));
  int per_channel = t->ndim == 2 && t->shape[1] == rows && rows > 1;
  if (!(t->ndim == 1 || (t->ndim == 2 && (t->shape[1] == 1 || t->shape[1] == rows))) || t->shape[0] != loras)
    return INVALID("%s: %s->%s must be (num_loras,), (num_loras, 1) or (num_loras, %lld) with num_loras %lld, got "
                   "%d-D (%lld, %lld)", fn, st, name, (long long)rows, (long long)loras, t->ndim, (long long)t->shape[0],
                   (long long)(t->ndim > 1 ? t->shape[1] : 0));
  *out = (sgmv_scales_t){t->data, t->shape[0] > 1 ? t->strides[0] : 0, per_channel ? t->strides[1] : 0};
  return SGMV_SUCCESS;
}

/* Every slice's scales (rows[s]: its output channels), into out (unused slices: none). */
static int scales_tensors(const char *fn, const char *st, const char *field, const sgmv_tensor_t t[SGMV_MAX_SLICES],
                          int n, int64_t loras, const int64_t *rows, sgmv_scales_t out[SGMV_MAX_SLICES]) {
  memset(out, 0, SGMV_MAX_SLICES * sizeof *out);
  for (int s = 0; s < SGMV_MAX_SLICES; s++) {
    char name[40];
    snprintf(name, sizeof name, "%s[%d]", field, s);
    if (s >= n && t[s].data)
      return INVALID("%s: %s->%s is given, but the call has %d slice%s", fn, st, name, n, n > 1 ? "s" : "");
    int status = s < n ? scales_tensor(fn, st, name, &t[s], loras, rows[s], &out[s]) : SGMV_SUCCESS;
    if (status) return status;
  }
  return SGMV_SUCCESS;
}

/* A weight stack (num_loras, rows, cols) or (num_loras, 1, rows, cols), unit stride along cols. */
static int weight_stack(const char *fn, const char *name, const sgmv_tensor_t *w, int64_t *loras, int64_t *rows,
                        int64_t *cols, sgmv_slice_t *slice) {
  int d = w->ndim == 4 ? 1 : 0;
  if (!(w->ndim == 3 || (w->ndim == 4 && w->shape[1] == 1)))
    return INVALID("%s: tensors->%s must be (num_loras, %s) or (num_loras, 1, %s)", fn, name, fn[5] == 'e' ? "hidden, rank" :
                   "rank, hidden", fn[5] == 'e' ? "hidden, rank" : "rank, hidden");
  *loras = w->shape[0], *rows = w->shape[1 + d], *cols = w->shape[2 + d];
  if (w->strides[w->ndim - 1] != 1 && *cols > 1)
    return INVALID("%s: tensors->%s must have unit stride in its last dimension", fn, name);
  *slice = (sgmv_slice_t){w->data, w->strides[0], w->strides[1 + d], *rows};
  return SGMV_SUCCESS;
}

/* The checks of both ops' tensors: dims, the 2-D inputs and output, the weight stacks (one per
 * slice: same dtype, adapters and cols), metadata. */
static int check_tensors(const char *fn, const sgmv_tensor_t *const all[6], const sgmv_tensor_t *more, int32_t num_slices,
                         int64_t batches, sgmv_slice_t slices[SGMV_MAX_SLICES], int64_t *loras, int64_t *rows,
                         int64_t *cols) {
  for (int i = 0; i < 6; i++)
    if (all[i]->ndim < 1 || all[i]->ndim > 4)
      return INVALID("%s: tensors->%s must have 1 to 4 dimensions, got %d", fn, tensor_names[i], all[i]->ndim);
  int status = check_slices(fn, num_slices);
  if (status) return status;
  const sgmv_tensor_t *x = all[0], *out = all[2];
  int expand = fn[5] == 'e';
  /* The sliced side (expand's inputs, shrink's output) may be planes (num_slices, total_tokens, rank). */
  if (x->ndim != 2 && !(expand && x->ndim == 3))
    return INVALID("%s: tensors->inputs must be 2-D (total_tokens, columns)%s", fn,
                   expand ? " or 3-D (num_slices, total_tokens, rank)" : "");
  if (out->ndim != 2 && !(!expand && out->ndim == 3))
    return INVALID("%s: tensors->output must be 2-D (total_tokens, columns)%s", fn,
                   expand ? "" : " or 3-D (num_slices, total_tokens, rank)");
  if (x->strides[x->ndim - 1] != 1 && x->shape[x->ndim - 1] > 1)
    return INVALID("%s: tensors->inputs must have unit stride in its last dimension", fn);
  if (out->strides[out->ndim - 1] != 1 && out->shape[out->ndim - 1] > 1)
    return INVALID("%s: tensors->output must have unit stride in its last dimension", fn);
  int n = num_slices > 1 ? num_slices : 1;
  for (int s = 0; s < n; s++) {
    const sgmv_tensor_t *w = s ? &more[s - 1] : all[1];
    int64_t l = 0, r = 0, k = 0;
    char name[32];
    snprintf(name, sizeof name, s ? "slice_weights[%d]" : "weights", s - 1);
    if (s && (w->ndim < 1 || w->ndim > 4)) return INVALID("%s: tensors->%s must have 1 to 4 dimensions", fn, name);
    if ((status = weight_stack(fn, name, w, &l, &r, &k, &slices[s]))) return status;
    if (s && w->dtype != all[1]->dtype)
      return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: tensors->%s must have weights' dtype %s, got %s", fn, name,
                            dtype_name(all[1]->dtype), dtype_name(w->dtype));
    if (s && (l != loras[0] || k != cols[0]))
      return INVALID("%s: tensors->%s must match weights' dtype, adapters and %s (%s, %lld, %lld), got (%s, %lld, %lld)", fn,
                     name, fn[5] == 'e' ? "rank" : "hidden", dtype_name(all[1]->dtype), (long long)loras[0],
                     (long long)cols[0], dtype_name(w->dtype), (long long)l, (long long)k);
    if (!s) loras[0] = l, cols[0] = k;
    rows[s] = r;
  }
  const sgmv_tensor_t *meta[3] = {all[3], all[4], all[5]};
  return check_metadata(fn, "tensors", meta, tensor_names + 3, batches);
}

SGMV_API sgmv_status_t sgmv_expand_args_from_tensors(const sgmv_expand_tensors_t *tensors, sgmv_expand_args_t *a) {
  const char *fn = "sgmv_expand";
  sgmv_expand_tensors_t t;
  if (!tensors || !a) return (sgmv_status_t)INVALID("%s: tensors or args is NULL", fn);
  int status = read_struct(fn, "sgmv_expand_tensors_t", tensors, tensors->struct_size, EXPAND_TENSORS_V0_2, &t,
                           sizeof t);
  if (status) return (sgmv_status_t)status;
  const sgmv_tensor_t *all[6] = {&t.inputs, &t.weights, &t.output, &t.seq_start, &t.seq_len, &t.lora_indices};
  sgmv_slice_t slices[SGMV_MAX_SLICES];
  int64_t loras, rows[SGMV_MAX_SLICES], rank, hidden = 0;
  if ((status = check_tensors(fn, all, t.slice_weights, t.num_slices, t.batches, slices, &loras, rows, &rank)))
    return (sgmv_status_t)status;
  int n = t.num_slices > 1 ? t.num_slices : 1, planes = t.inputs.ndim == 3;
  for (int s = 0; s < n; s++) hidden += rows[s];
  int64_t tokens = t.inputs.shape[planes];
  if (planes && (t.inputs.shape[0] != n || t.inputs.shape[2] != rank))
    return (sgmv_status_t)INVALID("%s: tensors->inputs must be (num_slices, total_tokens, rank) = (%d, %lld, %lld), got "
                                  "(%lld, %lld, %lld)", fn, n, (long long)tokens, (long long)rank,
                                  (long long)t.inputs.shape[0], (long long)tokens, (long long)t.inputs.shape[2]);
  if (!planes && t.inputs.shape[1] != n * rank && n == 1)
    return (sgmv_status_t)INVALID("%s: tensors->inputs has rank %lld but weights have rank %lld", fn,
                                  (long long)t.inputs.shape[1], (long long)rank);
  if (!planes && t.inputs.shape[1] != n * rank)
    return (sgmv_status_t)INVALID("%s: tensors->inputs has %lld columns but %d slices of rank %lld need %lld", fn,
                                  (long long)t.inputs.shape[1], n, (long long)rank, (long long)(n * rank));
  if (t.output.shape[0] != tokens || t.output.shape[1] != hidden)
    return (sgmv_status_t)INVALID("%s: tensors->output must be (total_tokens, hidden) = (%lld, %lld), got (%lld, %lld)", fn,
                                  (long long)tokens, (long long)hidden, (long long)t.output.shape[0],
                                  (long long)t.output.shape[1]);
  sgmv_scales_t scales[SGMV_MAX_SLICES];
  if ((status = check_per_adapter(fn, "lora_ranks", &t.lora_ranks, SGMV_DTYPE_INT32, loras)) ||
      (status = scales_tensors(fn, "tensors", "weight_scales", t.weight_scales, n, loras, rows, scales)))
    return (sgmv_status_t)status;
  memset(a, 0, sizeof *a);
  a->struct_size = sizeof *a;
  a->inputs = t.inputs.data, a->inputs_dtype = t.inputs.dtype, a->inputs_row_stride = t.inputs.strides[planes];
  a->inputs_slice_stride = planes ? t.inputs.strides[0] : 0;
  a->weights = slices[0].weights, a->weights_dtype = t.weights.dtype, a->weights_lora_stride = slices[0].lora_stride;
  a->weights_row_stride = slices[0].row_stride;
  a->output = (void *)t.output.data, a->output_dtype = t.output.dtype, a->output_row_stride = t.output.strides[0];
  a->total_tokens = tokens, a->hidden = rows[0], a->rank = rank, a->num_loras = loras;
  a->seq_start = t.seq_start.data, a->seq_len = t.seq_len.data, a->lora_indices = t.lora_indices.data;
  a->metadata_dtype = t.seq_start.dtype, a->batches = t.batches, a->max_seq_length = t.max_seq_length;
  a->add_inputs = t.add_inputs, a->stream = t.stream;
  a->batch_plan = t.batch_plan, a->batch_plan_bytes = t.batch_plan_bytes;
  a->num_slices = t.num_slices;
  for (int s = 1; s < n; s++) a->slices[s - 1] = slices[s];
  a->lora_ranks = t.lora_ranks.data;
  memcpy(a->weight_scales, scales, sizeof scales);
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_shrink_args_from_tensors(const sgmv_shrink_tensors_t *tensors, sgmv_shrink_args_t *a) {
  const char *fn = "sgmv_shrink";
  sgmv_shrink_tensors_t t;
  if (!tensors || !a) return (sgmv_status_t)INVALID("%s: tensors or args is NULL", fn);
  int status = read_struct(fn, "sgmv_shrink_tensors_t", tensors, tensors->struct_size, SHRINK_TENSORS_V0_3, &t,
                           sizeof t);
  if (status) return (sgmv_status_t)status;
  const sgmv_tensor_t *all[6] = {&t.inputs, &t.weights, &t.output, &t.seq_start, &t.seq_len, &t.lora_indices};
  sgmv_slice_t slices[SGMV_MAX_SLICES];
  int64_t loras, rows[SGMV_MAX_SLICES], hidden;
  if ((status = check_tensors(fn, all, t.slice_weights, t.num_slices, t.batches, slices, &loras, rows, &hidden)))
    return (sgmv_status_t)status;
  int n = t.num_slices > 1 ? t.num_slices : 1;
  int64_t rank = rows[0];
  for (int s = 1; s < n; s++)
    if (rows[s] != rank)
      return (sgmv_status_t)INVALID("%s: tensors->slice_weights[%d] has rank %lld, weights rank %lld: slices share one rank",
                                    fn, s - 1, (long long)rows[s], (long long)rank);
  if (t.inputs.shape[1] != hidden)
    return (sgmv_status_t)INVALID("%s: tensors->inputs has hidden %lld but weights have hidden %lld", fn,
                                  (long long)t.inputs.shape[1], (long long)hidden);
  int planes = t.output.ndim == 3;
  if (planes && (t.output.shape[0] != n || t.output.shape[1] != t.inputs.shape[0] || t.output.shape[2] != rank))
    return (sgmv_status_t)INVALID("%s: tensors->output must be (num_slices, total_tokens, rank) = (%d, %lld, %lld), got "
                                  "(%lld, %lld, %lld)", fn, n, (long long)t.inputs.shape[0], (long long)rank,
                                  (long long)t.output.shape[0], (long long)t.output.shape[1],
                                  (long long)t.output.shape[2]);
  if (!planes && (t.output.shape[0] != t.inputs.shape[0] || t.output.shape[1] != n * rank))
    return (sgmv_status_t)INVALID("%s: tensors->output must be (total_tokens, num_slices * rank) = (%lld, %lld), got (%lld, %lld)",
                                  fn, (long long)t.inputs.shape[0], (long long)(n * rank),
                                  (long long)t.output.shape[0], (long long)t.output.shape[1]);
  const int64_t ranks[SGMV_MAX_SLICES] = {rank, rank, rank};
  sgmv_scales_t scales[SGMV_MAX_SLICES];
  if ((status = check_per_adapter(fn, "lora_ranks", &t.lora_ranks, SGMV_DTYPE_INT32, loras)) ||
      (status = check_per_adapter(fn, "lora_scales", &t.lora_scales, SGMV_DTYPE_FLOAT32, loras)) ||
      (status = scales_tensors(fn, "tensors", "weight_scales", t.weight_scales, n, loras, ranks, scales)))
    return (sgmv_status_t)status;
  sgmv_shrink_args_init(a);
  a->inputs = t.inputs.data, a->inputs_dtype = t.inputs.dtype, a->inputs_row_stride = t.inputs.strides[0];
  a->weights = slices[0].weights, a->weights_dtype = t.weights.dtype, a->weights_lora_stride = slices[0].lora_stride;
  a->weights_row_stride = slices[0].row_stride;
  a->output = (void *)t.output.data, a->output_dtype = t.output.dtype, a->output_row_stride = t.output.strides[planes];
  a->output_slice_stride = planes ? t.output.strides[0] : 0;
  a->total_tokens = t.inputs.shape[0], a->hidden = hidden, a->rank = rank, a->num_loras = loras;
  a->seq_start = t.seq_start.data, a->seq_len = t.seq_len.data, a->lora_indices = t.lora_indices.data;
  a->metadata_dtype = t.seq_start.dtype, a->batches = t.batches, a->max_seq_length = t.max_seq_length;
  a->scaling = t.scaling, a->num_slices = t.num_slices;
  for (int s = 1; s < n; s++) a->slices[s - 1] = slices[s];
  a->lora_ranks = t.lora_ranks.data, a->lora_scales = t.lora_scales.data;
  a->batch_plan = t.batch_plan, a->batch_plan_bytes = t.batch_plan_bytes;
  a->workspace = t.workspace, a->workspace_bytes = t.workspace_bytes, a->stream = t.stream;
  memcpy(a->weight_scales, scales, sizeof scales);
  return SGMV_SUCCESS;
}

/* ---- tiles and grids ----------------------------------------------------------------------- */

/* Aligned variants assume SGMV_ALIGN_BYTES-aligned base pointers, and every column count,
 * column offset and row stride a multiple of SGMV_ALIGN_BYTES in bytes of its tensor's elements:
 * that lets them use 16-byte loads and stores (aot/generate.py gives the compiler these). K is
 * a multiple of it in weight elements: a per-adapter rank's last group is read whole. */
static int is_aligned(const sgmv_call_t *c) {
  int64_t ex = SGMV_ALIGN_BYTES / dtype_size(c->x_dtype), ew = SGMV_ALIGN_BYTES / dtype_size(c->w_dtype);
  int64_t eo = SGMV_ALIGN_BYTES / dtype_size(c->out_dtype);
  uintptr_t ptrs = (uintptr_t)c->x | (uintptr_t)c->out;
  int ok = (c->x_stride | c->x_slice_step) % ex == 0 && (c->out_stride | c->out_slice_step) % eo == 0 &&
           c->K % ew == 0;
  for (int s = 0; s < c->num_slices; s++) {
    ptrs |= (uintptr_t)c->w[s].weights;
    ok = ok && c->w[s].rows % eo == 0 && (c->w[s].lora_stride | c->w[s].row_stride) % ew == 0;
  }
  return ok && ptrs % SGMV_ALIGN_BYTES == 0;
}

/* The tile rules of aot/tiles.json; returns the tile index, or -1 if the arch has none. */
static int select_tile(const sgmv_call_t *c, int arch, int grouped, int *short_path) {
  int64_t rank = c->op == SGMV_OP_EXPAND ? c->K : c->w[0].rows;
  *short_path = 0;
  if (!is_aligned(c)) return sgmv_unaligned_tile;
  if (grouped) {
    int64_t rows = cdiv(c->total_tokens, min64(c->batches, c->num_loras));
    for (int i = 0; i < sgmv_num_grouped_rules; i++) {
      const sgmv_grouped_rule_t *r = &sgmv_grouped_rules[i];
      if (r->op == c->op && r->arch == arch && r->fp8 == is_fp8(c->w_dtype) && (r->max_rows < 0 || rows <= r->max_rows) &&
          (r->max_rank < 0 || rank <= r->max_rank))
        return r->tile;
    }
    return -1;
  }
  for (int i = 0; i < sgmv_num_rules; i++) {
    const sgmv_rule_t *r = &sgmv_rules[i];
    if (r->op == c->op && r->arch == arch && r->fp8 == is_fp8(c->w_dtype) &&
        (r->max_seq < 0 || c->max_seq_length <= r->max_seq) &&
        (r->max_rank < 0 || rank <= r->max_rank)) {
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

/* Shrink's split of K over programs (flat and grouped paths): enough programs to fill the GPU,
 * with partial sums the workspace has room for, each program a whole number of BLOCK_K. */
static void choose_split(const sgmv_call_t *c, int32_t requested, sgmv_launch_config_t *cfg) {
  const sgmv_split_rule_t *r = &sgmv_split_rule;
  cfg->split = 1;
  cfg->k_split = c->K;
  if (c->op != SGMV_OP_SHRINK || (cfg->path == SGMV_PATH_ROWS && !cfg->flat) || c->total_tokens > r->max_tokens)
    return;
  int64_t programs = (int64_t)cfg->grid[0] * cfg->grid[1];
  int64_t split = requested > 0 ? requested : cdiv(r->programs, programs); /* a tuner's, or the rule's */
  int64_t room = (int64_t)(c->work_bytes / ((size_t)c->total_tokens * (size_t)c->out_cols * 4));
  split = min64(min64(split, r->max_split), min64(room, cdiv(c->K, cfg->block_k)));
  if (split < 2) return;
  int64_t k_split = cdiv(cdiv(c->K, split), cfg->block_k) * cfg->block_k;
  cfg->split = (int32_t)cdiv(c->K, k_split);
  if (cfg->split < 2) {
    cfg->split = 1;
    return;
  }
  cfg->k_split = k_split;
  cfg->steps = 2;
  cfg->grid[2] = (uint32_t)cfg->split;
}

int sgmv_decide(const sgmv_call_t *a, int arch, const sgmv_launch_config_t *want, sgmv_launch_t *out) {
  const char *fn = a->op == SGMV_OP_EXPAND ? "sgmv_expand" : "sgmv_shrink";
  memset(out, 0, sizeof *out);
  sgmv_launch_config_t *c = &out->config;
  c->struct_size = sizeof *c;
  c->steps = 1;
  c->split = 1;
  c->k_split = a->K;
  c->op = a->op;
  c->x_slice_step = a->x_slice_step;
  c->kernel = "sgmv_kernel";
  c->meta_shift = a->metadata_dtype == SGMV_DTYPE_INT64;
  c->per_token = a->per_token;
  c->noop = a->batches == 0 || a->total_tokens == 0;
  if (c->noop) return SGMV_SUCCESS;
  int status = check_arch(fn, arch);
  if (status) return status;
  if (!has_rules(a->op, arch, is_fp8(a->w_dtype))) {
    char archs[64];
    sgmv_archs_with_rules(a->op, is_fp8(a->w_dtype), archs, sizeof archs);
    return sgmv_set_error(SGMV_ERROR_UNSUPPORTED_ARCH, "%s: this build has no %s-weight variants for sm_%d (it serves "
                          "them on sm %s)", fn, dtype_name(a->w_dtype), arch, archs);
  }
  /* With a plan, adapter-grouped tiles, except for long segments of one length (uniform
   * prefill), which tile densely by segment already and gain nothing from the plan's gather. */
  const sgmv_tuning_t *tune = &sgmv_tuning;
  int uniform = a->max_seq_length >= tune->uniform_min_length &&
                a->max_seq_length <= (a->total_tokens + a->total_tokens / tune->uniform_slack) / a->batches;
  int grouped = a->plan && !uniform;
  int short_path, tile_id = select_tile(a, arch, grouped, &short_path);
  if (tile_id < 0) return sgmv_set_error(SGMV_ERROR_INTERNAL, "%s: no tile rule for sm_%d", fn, arch);
  const sgmv_tile_t *t = &sgmv_tiles[tile_id];
  sgmv_tile_t asked;
  if (want) { /* a tuner's tile (sgmv_*_config): the rules' path and grid for it */
    if (want->block_m < 1 || want->block_m > 256 || want->block_n < 16 || want->block_n > 1024 ||
        (a->op == SGMV_OP_EXPAND && want->block_n < SGMV_MIN_EXPAND_BLOCK_N) || want->block_k < 1 || want->num_warps < 1 ||
        want->num_stages < 1 || (grouped && SGMV_PLAN_ALIGN % want->block_m))
      return INVALID("%s_config: the requested tile (config->block_m, ...) %dx%dx%d (warps %d, stages %d) is out of range (with a plan, "
                     "block_m must divide %d)", fn, want->block_m, want->block_n, want->block_k, want->num_warps,
                     want->num_stages, SGMV_PLAN_ALIGN);
    asked = (sgmv_tile_t){"requested", want->block_m, want->block_n, want->block_k, want->num_warps, want->num_stages};
    t = &asked;
    short_path = !grouped && want->path == SGMV_PATH_SHORT && a->op == SGMV_OP_EXPAND;
  }
  c->tile = t->name;
  c->aligned = is_aligned(a); /* the table picks the unaligned tile exactly when not */
  c->block_m = t->block_m, c->block_n = t->block_n, c->block_k = t->block_k;
  c->num_warps = t->num_warps, c->num_stages = t->num_stages;
  /* Per-adapter ranks end expand's K early, anywhere. */
  c->even_k = a->K % t->block_k == 0 && !(a->ranks && a->op == SGMV_OP_EXPAND);
  int64_t n_tiles = 0; /* <= 65535: the slices' hidden are bounded, expand tiles >= 64 wide, shrink N <= 768 */
  for (int s = 0; s < a->num_slices; s++) n_tiles += cdiv(a->w[s].rows, t->block_n);
  int64_t x, z = 1;
  if (grouped) {
    /* Tiles of the plan's slots: every adapter's rows padded to a multiple of the alignment. */
    c->path = SGMV_PATH_GROUPED;
    c->plan_capacity = plan_capacity(a->plan_bytes, a->batches);
    int64_t slots = (cdiv(a->total_tokens, SGMV_PLAN_ALIGN) + min64(a->batches, a->num_loras)) * SGMV_PLAN_ALIGN;
    x = cdiv(min64(slots, c->plan_capacity), t->block_m);
  } else if (short_path) {
    c->path = SGMV_PATH_SHORT;
    x = cdiv(a->batches, t->block_m);
    /* Adapter slots: enough programs to fill the GPU, never more slots than adapters. */
    z = tune->short_programs / (x * n_tiles);
    z = z < 1 ? 1 : z > a->num_loras ? a->num_loras : z > GRID_MAX ? GRID_MAX : z;
  } else {
    /* By segment unless most of that grid would idle (a long segment beside many short ones). */
    int64_t flat = cdiv(a->total_tokens, t->block_m) + a->batches; /* < 2^31: validate bounds both */
    int64_t row_tiles = cdiv(a->max_seq_length, t->block_m);
    row_tiles = row_tiles < 1 ? 1 : row_tiles > GRID_MAX ? GRID_MAX : row_tiles;
    c->path = SGMV_PATH_ROWS;
    /* Flat too where shrink may split K (the by-segment grid's third axis strides rows). */
    int may_split = a->op == SGMV_OP_SHRINK && a->work_bytes && a->total_tokens <= sgmv_split_rule.max_tokens;
    c->flat = a->batches * row_tiles > 2 * flat || may_split;
    if (c->flat) x = flat;
    else x = a->batches, z = row_tiles;
  }
  c->grid[0] = (uint32_t)x, c->grid[1] = (uint32_t)n_tiles, c->grid[2] = (uint32_t)z;
  choose_split(a, want ? want->split : 0, c);
  int kernel = a->op == SGMV_OP_EXPAND ? SGMV_KERNEL_EXPAND : SGMV_KERNEL_SHRINK;
  out->key = (sgmv_variant_key_t){arch, kernel, tile_id, c->path, a->x_dtype, a->w_dtype, a->out_dtype, c->even_k};
  return SGMV_SUCCESS;
}

/* Copies a launch configuration out, as much of it as the caller's struct holds (struct_size 0:
 * the caller's is this version's). */
static void copy_config(sgmv_launch_config_t *config, const sgmv_launch_config_t *c) {
  size_t n = config->struct_size && config->struct_size < sizeof *c ? config->struct_size : sizeof *c;
  memcpy(config, c, n);
  config->struct_size = n;
}

static sgmv_status_t config_of(int (*to_call)(const void *, sgmv_call_t *), const void *args, int arch,
                               sgmv_launch_config_t *config, const char *fn) {
  sgmv_call_t call;
  sgmv_launch_t launch;
  if (!config) return (sgmv_status_t)INVALID("%s: config is NULL", fn);
  sgmv_launch_config_t want = *config;
  int status = to_call(args, &call);
  if (!status) status = sgmv_decide(&call, arch, want.block_m > 0 ? &want : NULL, &launch);
  if (!status) copy_config(config, &launch.config);
  return (sgmv_status_t)status;
}

static int expand_call(const void *a, sgmv_call_t *c) { return sgmv_expand_call(a, c); }
static int shrink_call(const void *a, sgmv_call_t *c) { return sgmv_shrink_call(a, c); }

SGMV_API sgmv_status_t sgmv_expand_config(const sgmv_expand_args_t *args, int cubin_arch, sgmv_launch_config_t *config) {
  return config_of(expand_call, args, cubin_arch, config, "sgmv_expand_config");
}

SGMV_API sgmv_status_t sgmv_shrink_config(const sgmv_shrink_args_t *args, int cubin_arch, sgmv_launch_config_t *config) {
  return config_of(shrink_call, args, cubin_arch, config, "sgmv_shrink_config");
}

/* ---- the batch plan ------------------------------------------------------------------------ */

int sgmv_decide_batch_plan(const sgmv_batch_plan_args_t *a, int per_token, int arch, sgmv_launch_t *out) {
  if (!a) return INVALID("sgmv_batch_plan_build: args is NULL");
  if (a->struct_size != sizeof *a)
    return INVALID("sgmv_batch_plan_build: args->struct_size is %zu, expected %zu: initialise it with "
                   "SGMV_BATCH_PLAN_ARGS_INIT", a->struct_size, sizeof *a);
  const sgmv_tensor_t *meta[3] = {&a->seq_start, &a->seq_len, &a->lora_indices};
  int status = check_metadata("sgmv_batch_plan_build", "args", meta, tensor_names + 3, a->batches);
  if (status) return status;
  if ((status = check_counts("sgmv_batch_plan_build", a->total_tokens, a->batches, a->num_loras))) return status;
  if (!a->plan) return INVALID("sgmv_batch_plan_build: args->plan is NULL");
  if ((status = check_aligned("sgmv_batch_plan_build", "plan", a->plan, 4, "its element size"))) return status;
  if (plan_capacity(a->plan_bytes, a->batches) < plan_slots(a->batches, a->total_tokens))
    return INVALID("sgmv_batch_plan_build: args->plan_bytes %zu is smaller than sgmv_batch_plan_bytes(%lld, %lld) = %zu",
                   a->plan_bytes, (long long)a->batches, (long long)a->total_tokens,
                   sgmv_batch_plan_bytes(a->batches, a->total_tokens));
  if (a->batches && (!a->seq_start.data || !a->seq_len.data || !a->lora_indices.data))
    return INVALID("sgmv_batch_plan_build: args->seq_start, args->seq_len and args->lora_indices must not be NULL");
  if ((status = check_arch("sgmv_batch_plan_build", arch))) return status;
  memset(out, 0, sizeof *out);
  sgmv_launch_config_t *c = &out->config;
  c->struct_size = sizeof *c;
  c->kernel = "sgmv_plan_kernel";
  c->split = 1;
  c->meta_shift = a->seq_start.dtype == SGMV_DTYPE_INT64;
  c->per_token = per_token != 0;
  c->plan_capacity = plan_capacity(a->plan_bytes, a->batches);
  /* Always launched, even for an empty batch: the plan must say it holds no rows. Two launches
   * (steps); programs of SEGS segments each, and enough per segment group to split long
   * segments' rows. */
  const sgmv_plan_size_t *size = &sgmv_plan_size;
  int64_t y = cdiv(a->total_tokens, sgmv_tuning.plan_rows_per_program);
  c->tile = "plan";
  c->steps = 2;
  c->block_b = size->segs, c->scan = size->scan, c->rows = size->rows;
  c->num_warps = size->num_warps, c->num_stages = 1;
  c->grid[0] = (uint32_t)(a->batches ? cdiv(a->batches, size->segs) : 1);
  c->grid[1] = (uint32_t)(y < 1 ? 1 : y > sgmv_tuning.plan_max_programs ? sgmv_tuning.plan_max_programs : y);
  c->grid[2] = 1;
  out->key = (sgmv_variant_key_t){arch, SGMV_KERNEL_PLAN, 0, 0, 0, 0, 0, 0};
  return SGMV_SUCCESS;
}

SGMV_API sgmv_status_t sgmv_batch_plan_config(const sgmv_batch_plan_args_t *args, int cubin_arch,
                                              sgmv_launch_config_t *config) {
  sgmv_launch_t launch;
  if (!config) return (sgmv_status_t)INVALID("sgmv_batch_plan_config: config is NULL");
  int status = sgmv_decide_batch_plan(args, 0, cubin_arch, &launch);
  if (!status) copy_config(config, &launch.config);
  return (sgmv_status_t)status;
}

/* ---- the layer call ------------------------------------------------------------------------ */

/* A layer and a step, as checked at creation: what the calls of sgmv_layer_apply are made of. */
struct sgmv_layer {
  int num_slices, w_dtype;
  int64_t num_loras, rank, hidden;
  sgmv_slice_t a[SGMV_MAX_SLICES], b[SGMV_MAX_SLICES];
  sgmv_scales_t as[SGMV_MAX_SLICES], bs[SGMV_MAX_SLICES]; /* fp8 weights' scales */
  const void *ranks, *scales;
  float scaling;
};

struct sgmv_step {
  const void *seq_start, *seq_len, *lora_indices; /* per_token: lora_indices is the token mapping */
  int metadata_dtype, per_token;
  int64_t batches; /* segments, or total_tokens with a token mapping */
  int64_t max_seq_length, total_tokens, num_loras;
  char *scratch;
  size_t scratch_bytes, plan_bytes; /* the plan at the start of the scratch; the intermediate, the workspace */
};

static size_t round_up(size_t n) { return (n + 255) / 256 * 256; }

/* The scratch's parts: plan, intermediate (weights' dtype, 2 bytes), split-K workspace. */
static size_t scratch_bytes(int64_t batches, int64_t tokens, int64_t columns, size_t *plan, size_t *mid) {
  *plan = round_up(sgmv_batch_plan_bytes(batches, tokens));
  *mid = round_up((size_t)tokens * (size_t)columns * 2);
  return *plan + *mid + sgmv_shrink_workspace_bytes(tokens > 0 ? tokens : 1, columns);
}

SGMV_API size_t sgmv_step_scratch_bytes(int64_t max_batches, int64_t max_tokens, int64_t max_columns) {
  size_t plan, mid;
  if (!sgmv_batch_plan_bytes(max_batches, max_tokens) || max_columns < 1 ||
      max_columns > SGMV_MAX_SLICES * SGMV_MAX_RANK)
    return 0;
  return scratch_bytes(max_batches, max_tokens, max_columns, &plan, &mid);
}

/* The dtype of a layer's activations and intermediate: the weights', or for fp8 weights the inputs'. */
static int activation_dtype(int w_dtype, int x_dtype) { return is_fp8(w_dtype) ? x_dtype : w_dtype; }

/* The layer's shrink (c[0]: inputs -> the step's intermediate, scaled) and expand (c[1]: the
 * intermediate -> output), before checks. Without a step: rows 0 (the weights' checks). */
static void layer_calls(const sgmv_layer_t *l, const sgmv_step_t *st, const void *x, int x_dtype, int64_t x_stride,
                        void *out, int out_dtype, int64_t out_stride, int add_inputs, sgmv_stream_t stream,
                        sgmv_call_t c[2]) {
  int n = l->num_slices;
  int64_t tokens = st ? st->total_tokens : 0, cols = n * l->rank;
  size_t mid = round_up((size_t)tokens * (size_t)cols * 2);
  char *y = st ? st->scratch + st->plan_bytes : NULL;
  int mid_dtype = activation_dtype(l->w_dtype, x_dtype);
  memset(c, 0, 2 * sizeof *c);
  for (int i = 0; i < 2; i++) {
    c[i].num_slices = n, c[i].w_dtype = l->w_dtype, c[i].num_loras = l->num_loras, c[i].total_tokens = tokens;
    c[i].ranks = l->ranks, c[i].stream = stream, c[i].scaling = 1.0f;
    if (st) {
      c[i].seq_start = st->seq_start, c[i].seq_len = st->seq_len, c[i].lora_indices = st->lora_indices;
      c[i].per_token = st->per_token, c[i].metadata_dtype = st->metadata_dtype, c[i].batches = st->batches;
      c[i].max_seq_length = st->max_seq_length, c[i].plan = st->scratch, c[i].plan_bytes = st->plan_bytes;
    }
    for (int k = 0; k < n; k++) c[i].w[k] = i ? l->b[k] : l->a[k], c[i].ws[k] = i ? l->bs[k] : l->as[k];
  }
  c[0].op = SGMV_OP_SHRINK, c[0].x = x, c[0].x_dtype = x_dtype, c[0].x_stride = x_stride, c[0].K = l->hidden;
  c[0].out = y, c[0].out_dtype = mid_dtype, c[0].out_stride = cols, c[0].out_cols = cols;
  c[0].out_slice_step = n > 1 ? l->rank : 0, c[0].scaling = l->scaling, c[0].scales = l->scales;
  if (st && st->scratch_bytes > st->plan_bytes + mid)
    c[0].work = y + mid, c[0].work_bytes = st->scratch_bytes - st->plan_bytes - mid;
  c[1].op = SGMV_OP_EXPAND, c[1].x = y, c[1].x_dtype = mid_dtype, c[1].x_stride = cols, c[1].K = l->rank;
  c[1].x_slice_step = n > 1 ? l->rank : 0, c[1].out = out, c[1].out_dtype = out_dtype, c[1].out_stride = out_stride;
  c[1].add_inputs = add_inputs != 0;
  for (int k = 0; k < n; k++) c[1].out_cols += l->b[k].rows;
}

SGMV_API sgmv_status_t sgmv_layer_create(const sgmv_layer_args_t *args, sgmv_layer_t **layer) {
  const char *fn = "sgmv_layer_create";
  if (!layer) return (sgmv_status_t)INVALID("%s: layer is NULL", fn);
  *layer = NULL;
  sgmv_layer_args_t t;
  int status = read_struct(fn, "sgmv_layer_args_t", args, args ? args->struct_size : 0, LAYER_ARGS_V0_4, &t,
                           sizeof t);
  if (!status) status = check_slices(fn, t.num_slices);
  if (status) return (sgmv_status_t)status;
  sgmv_layer_t l;
  memset(&l, 0, sizeof l);
  l.num_slices = t.num_slices > 1 ? t.num_slices : 1;
  l.w_dtype = t.lora_a[0].dtype, l.scaling = t.scaling, l.ranks = t.lora_ranks.data, l.scales = t.lora_scales.data;
  int64_t out_cols = 0;
  for (int k = 0; k < l.num_slices; k++) {
    int64_t loras[2], rows[2], cols[2];
    char name[2][32];
    for (int i = 0; i < 2; i++) {
      const sgmv_tensor_t *w = i ? &t.lora_b[k] : &t.lora_a[k];
      snprintf(name[i], sizeof name[i], "lora_%c[%d]", i ? 'b' : 'a', k);
      if (!w->data) return (sgmv_status_t)INVALID("%s: args->%s.data is NULL", fn, name[i]);
      if (w->ndim < 3 || w->ndim > 4)
        return (sgmv_status_t)INVALID("%s: args->%s must be (num_loras, %s) or (num_loras, 1, %s)", fn, name[i],
                                      i ? "hidden_s, rank" : "rank, hidden", i ? "hidden_s, rank" : "rank, hidden");
      if ((status = weight_stack(fn, name[i], w, &loras[i], &rows[i], &cols[i], i ? &l.b[k] : &l.a[k])))
        return (sgmv_status_t)status;
      if ((int)w->dtype != l.w_dtype)
        return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_UNSUPPORTED_DTYPE, "%s: args->%s is %s, lora_a[0] %s: one dtype",
                                             fn, name[i], dtype_name(w->dtype), dtype_name(l.w_dtype));
    }
    if (!k) l.num_loras = loras[0], l.rank = rows[0], l.hidden = cols[0];
    if (loras[0] != l.num_loras || rows[0] != l.rank || cols[0] != l.hidden)
      return (sgmv_status_t)INVALID("%s: args->lora_a[%d] is (%lld, %lld, %lld), lora_a[0] (%lld, %lld, %lld): slices "
                                    "share num_loras, rank and hidden", fn, k, (long long)loras[0], (long long)rows[0],
                                    (long long)cols[0], (long long)l.num_loras, (long long)l.rank, (long long)l.hidden);
    if (loras[1] != l.num_loras || cols[1] != l.rank)
      return (sgmv_status_t)INVALID("%s: args->lora_b[%d] is (%lld, %lld, %lld), but B is (num_loras, hidden_s, rank) "
                                    "with num_loras %lld and rank %lld from lora_a", fn, k, (long long)loras[1],
                                    (long long)rows[1], (long long)cols[1], (long long)l.num_loras, (long long)l.rank);
    if (rows[1] < 1 || rows[1] > SGMV_MAX_HIDDEN)
      return (sgmv_status_t)INVALID("%s: args->lora_b[%d] has %lld output columns, not in [1, %d]", fn, k,
                                    (long long)rows[1], SGMV_MAX_HIDDEN);
    out_cols += rows[1];
  }
  if (l.rank < 1 || l.rank > SGMV_MAX_RANK)
    return (sgmv_status_t)INVALID("%s: the rank (lora_a's rows) must be in [1, %d], got %lld", fn, SGMV_MAX_RANK,
                                  (long long)l.rank);
  if (l.hidden < 1 || l.hidden > SGMV_MAX_SHRINK_HIDDEN)
    return (sgmv_status_t)INVALID("%s: hidden (lora_a's columns) must be in [1, %d], got %lld", fn,
                                  SGMV_MAX_SHRINK_HIDDEN, (long long)l.hidden);
  if (out_cols > SGMV_MAX_HIDDEN - SGMV_MIN_EXPAND_BLOCK_N * (l.num_slices - 1))
    return (sgmv_status_t)INVALID("%s: the slices' output columns add up to %lld, more than %d", fn,
                                  (long long)out_cols, SGMV_MAX_HIDDEN - SGMV_MIN_EXPAND_BLOCK_N * (l.num_slices - 1));
  /* fp8 weights: checked with fp16 activations (the inputs' dtype is known at each call). */
  int act = activation_dtype(l.w_dtype, SGMV_DTYPE_FLOAT16);
  int64_t a_rows[SGMV_MAX_SLICES] = {l.rank, l.rank, l.rank}, b_rows[SGMV_MAX_SLICES];
  for (int k = 0; k < l.num_slices; k++) b_rows[k] = l.b[k].rows;
  if ((status = check_per_adapter(fn, "lora_ranks", &t.lora_ranks, SGMV_DTYPE_INT32, l.num_loras)) ||
      (status = check_per_adapter(fn, "lora_scales", &t.lora_scales, SGMV_DTYPE_FLOAT32, l.num_loras)) ||
      (status = scales_tensors(fn, "args", "lora_a_scales", t.lora_a_scales, l.num_slices, l.num_loras, a_rows, l.as)) ||
      (status = scales_tensors(fn, "args", "lora_b_scales", t.lora_b_scales, l.num_slices, l.num_loras, b_rows, l.bs)) ||
      (status = check_dtypes(fn, SGMV_OP_SHRINK, act, l.w_dtype, act, SGMV_DTYPE_INT32)))
    return (sgmv_status_t)status;
  sgmv_call_t c[2];
  layer_calls(&l, NULL, NULL, act, 0, NULL, act, 0, 0, NULL, c);
  for (int i = 0; i < 2 && !status; i++) status = check_call(fn, &c[i]); /* the weights' strides and alignment */
  if (status) return (sgmv_status_t)status;
  if (!(*layer = malloc(sizeof l))) return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_INTERNAL, "%s: out of memory", fn);
  **layer = l;
  return SGMV_SUCCESS;
}

SGMV_API void sgmv_layer_destroy(sgmv_layer_t *layer) { free(layer); }

SGMV_API sgmv_status_t sgmv_step_create(const sgmv_step_args_t *args, sgmv_step_t **step) {
  const char *fn = "sgmv_step_create";
  if (!step) return (sgmv_status_t)INVALID("%s: step is NULL", fn);
  *step = NULL;
  sgmv_step_args_t t;
  int status = read_struct(fn, "sgmv_step_args_t", args, args ? args->struct_size : 0, sizeof t, &t, sizeof t);
  if (status) return (sgmv_status_t)status;
  sgmv_step_t st;
  memset(&st, 0, sizeof st);
  st.per_token = t.token_lora_mapping.data != NULL;
  st.batches = st.per_token ? t.total_tokens : t.batches;
  st.total_tokens = t.total_tokens, st.num_loras = t.num_loras;
  st.max_seq_length = st.per_token ? 1 : t.max_seq_length;
  st.scratch = t.scratch, st.scratch_bytes = t.scratch_bytes;
  if ((status = check_counts(fn, t.total_tokens, st.batches, t.num_loras))) return (sgmv_status_t)status;
  if (st.max_seq_length < 0)
    return (sgmv_status_t)INVALID("%s: args->max_seq_length must be >= 0, got %lld", fn, (long long)t.max_seq_length);
  if (st.per_token) {
    if (t.seq_start.data || t.seq_len.data || t.lora_indices.data)
      return (sgmv_status_t)INVALID("%s: args->token_lora_mapping replaces seq_start, seq_len and lora_indices: leave "
                                    "their data NULL", fn);
    const sgmv_tensor_t *m[3] = {&t.token_lora_mapping, &t.token_lora_mapping, &t.token_lora_mapping};
    const char *const names[3] = {"token_lora_mapping", "token_lora_mapping", "token_lora_mapping"};
    status = check_metadata(fn, "args", m, names, st.batches);
  } else {
    const sgmv_tensor_t *m[3] = {&t.seq_start, &t.seq_len, &t.lora_indices};
    status = check_metadata(fn, "args", m, tensor_names + 3, st.batches);
    for (int i = 0; i < 3 && !status && st.batches; i++)
      if (!m[i]->data) status = INVALID("%s: args->%s.data is NULL", fn, tensor_names[3 + i]);
  }
  if (status) return (sgmv_status_t)status;
  st.seq_start = t.seq_start.data, st.seq_len = t.seq_len.data;
  st.lora_indices = st.per_token ? t.token_lora_mapping.data : t.lora_indices.data;
  st.metadata_dtype = st.per_token ? t.token_lora_mapping.dtype : t.seq_start.dtype;
  const void *meta[3] = {st.seq_start, st.seq_len, st.lora_indices};
  for (int i = 0; i < 3 && !status; i++)
    status = check_aligned(fn, st.per_token ? "token_lora_mapping" : tensor_names[3 + i], meta[i],
                           dtype_size(st.metadata_dtype), "its element size");
  if (!status && !st.scratch) status = INVALID("%s: args->scratch is NULL", fn);
  if (!status) status = check_aligned(fn, "scratch", st.scratch, SGMV_ALIGN_BYTES, "what the kernels assume");
  if (status) return (sgmv_status_t)status;
  st.plan_bytes = round_up(sgmv_batch_plan_bytes(st.batches, st.total_tokens));
  if (st.scratch_bytes < st.plan_bytes)
    return (sgmv_status_t)INVALID("%s: args->scratch_bytes %zu is smaller than the step's batch plan (%zu bytes): see "
                                  "sgmv_step_scratch_bytes", fn, st.scratch_bytes, st.plan_bytes);
  if (!(*step = malloc(sizeof st))) return (sgmv_status_t)sgmv_set_error(SGMV_ERROR_INTERNAL, "%s: out of memory", fn);
  **step = st;
  return SGMV_SUCCESS;
}

SGMV_API void sgmv_step_destroy(sgmv_step_t *step) { free(step); }

int sgmv_layer_calls(const sgmv_layer_t *l, const sgmv_step_t *st, const sgmv_tensor_t *x, const sgmv_tensor_t *out,
                     int add_inputs, sgmv_stream_t stream, sgmv_call_t c[2]) {
  const char *fn = "sgmv_layer_apply";
  if (!l || !st || !x || !out)
    return INVALID("%s: %s is NULL", fn, !l ? "layer" : !st ? "step" : !x ? "inputs" : "output");
  if (l->num_loras != st->num_loras)
    return INVALID("%s: the layer has num_loras %lld, the step %lld: describe both for the same adapter slots", fn,
                   (long long)l->num_loras, (long long)st->num_loras);
  int64_t cols = l->num_slices * l->rank, out_cols = 0;
  for (int k = 0; k < l->num_slices; k++) out_cols += l->b[k].rows;
  size_t plan, mid, need = scratch_bytes(st->batches, st->total_tokens, cols, &plan, &mid);
  if (st->scratch_bytes < need)
    return INVALID("%s: the step's scratch_bytes %zu is smaller than sgmv_step_scratch_bytes(%lld, %lld, %lld) = %zu, "
                   "which this layer needs", fn, st->scratch_bytes, (long long)st->batches,
                   (long long)st->total_tokens, (long long)cols, need);
  const sgmv_tensor_t *t[2] = {x, out};
  const int64_t want[2] = {l->hidden, out_cols};
  for (int i = 0; i < 2; i++) {
    if (t[i]->ndim != 2 || t[i]->shape[0] != st->total_tokens || t[i]->shape[1] != want[i])
      return INVALID("%s: %s must be (total_tokens, %s) = (%lld, %lld), got %d-D (%lld, %lld)", fn, i ? "output" : "inputs",
                     i ? "output columns" : "hidden", (long long)st->total_tokens, (long long)want[i], t[i]->ndim,
                     (long long)t[i]->shape[0], (long long)(t[i]->ndim > 1 ? t[i]->shape[1] : 0));
    if (t[i]->strides[1] != 1 && want[i] > 1)
      return INVALID("%s: %s must have unit stride in its last dimension", fn, i ? "output" : "inputs");
    if (!t[i]->data && st->total_tokens && st->batches)
      return INVALID("%s: %s->data is NULL", fn, i ? "output" : "inputs");
  }
  int act = activation_dtype(l->w_dtype, x->dtype);
  int status = check_dtypes(fn, SGMV_OP_SHRINK, x->dtype, l->w_dtype, act, st->metadata_dtype);
  if (!status) status = check_dtypes(fn, SGMV_OP_EXPAND, act, l->w_dtype, out->dtype, st->metadata_dtype);
  if (status) return status;
  layer_calls(l, st, x->data, x->dtype, x->strides[0], (void *)out->data, out->dtype, out->strides[0], add_inputs,
              stream, c);
  for (int i = 0; i < 2 && !status; i++) status = check_call(fn, &c[i]);
  return status;
}

int sgmv_step_plan_args(const sgmv_step_t *st, sgmv_stream_t stream, sgmv_batch_plan_args_t *p, int *per_token) {
  if (!st) return INVALID("sgmv_step_plan: step is NULL");
  memset(p, 0, sizeof *p);
  p->struct_size = sizeof *p;
  p->plan = st->scratch, p->plan_bytes = st->plan_bytes;
  /* With a token mapping every "segment" is a row: the kernel reads the mapping only. */
  const void *m[3] = {st->seq_start, st->seq_len, st->lora_indices};
  if (st->per_token) m[0] = m[1] = m[2];
  sgmv_tensor_t *t[3] = {&p->seq_start, &p->seq_len, &p->lora_indices};
  for (int i = 0; i < 3; i++) *t[i] = (sgmv_tensor_t){m[i], st->metadata_dtype, 1, {st->batches, 0, 0, 0}, {1, 0, 0, 0}};
  p->batches = st->batches, p->total_tokens = st->total_tokens, p->num_loras = st->num_loras, p->stream = stream;
  *per_token = st->per_token;
  return SGMV_SUCCESS;
}
