/* libsgmv: the LoRA kernels of multi-LoRA serving (SGMV shrink and expand), behind a stable C ABI.
 *
 *   shrink: y[start_b + m, :rank]   = scaling * x[start_b + m, :hidden] @ A[idx_b, :rank, :hidden]^T
 *   expand: out[start_b + m, :]   (+)= y[start_b + m, :rank] @ B[idx_b, :, :rank]^T
 *
 * for every segment b in [0, batches) whose adapter index idx_b is in [0, num_loras) and every
 * row m < seq_len_b. Products are accumulated in fp32; with add_inputs the old output value is
 * added in fp32 and the sum is rounded once. Rows of skipped segments (idx_b == -1 or outside
 * [0, num_loras), or an adapter of rank 0 in lora_ranks), zero-length segments and rows past
 * total_tokens are left untouched. Both take up to SGMV_MAX_SLICES fused slices (QKV, gate/up)
 * and per-adapter ranks, and fp16, bf16 or fp8 e4m3 weights (fp8: float32 scales per adapter or
 * per adapter and output channel, sgmv_scales_t, that multiply each output column's fp32 sum).
 *
 * This header needs no CUDA header and compiles as C99 and C++. It is also the source of the
 * Python binding's cffi declarations: keep it to declarations, enums with fixed values and
 * integer #defines.
 */
#ifndef SGMV_H
#define SGMV_H

#include <stddef.h>
#include <stdint.h>

#define SGMV_VERSION_MAJOR 0
#define SGMV_VERSION_MINOR 6
#define SGMV_VERSION_PATCH 1
/* MAJOR * 10000 + MINOR * 100 + PATCH, as returned by sgmv_version(). */
#define SGMV_VERSION 601

#if defined(_WIN32)
#define SGMV_API
#else
#define SGMV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Statuses: values are fixed forever; new ones are only ever appended. */
typedef enum {
  SGMV_SUCCESS = 0,
  SGMV_ERROR_INVALID_ARGUMENT = 1,   /* a null pointer, a size or stride out of range */
  SGMV_ERROR_UNSUPPORTED_DTYPE = 2,  /* a dtype or dtype combination the library does not serve */
  SGMV_ERROR_NO_DRIVER = 3,          /* libcuda.so.1 could not be loaded, or is too old */
  SGMV_ERROR_NO_DEVICE = 4,          /* the driver found no GPU, or no CUDA context is current */
  SGMV_ERROR_UNSUPPORTED_ARCH = 5,   /* no cubin for this GPU's compute capability */
  SGMV_ERROR_CUDA = 6,               /* a CUDA driver call failed; sgmv_last_error() names it */
  SGMV_ERROR_INTERNAL = 7
} sgmv_status_t;

/* Element types, values fixed. */
typedef enum {
  SGMV_DTYPE_FLOAT16 = 0,
  SGMV_DTYPE_BFLOAT16 = 1,
  SGMV_DTYPE_FLOAT32 = 2,
  SGMV_DTYPE_INT32 = 3,
  SGMV_DTYPE_INT64 = 4,
  /* 8-bit float e4m3 (OCP; torch.float8_e4m3fn: no infinities): weights only, with float32 scales
   * (sgmv_scales_t), on GPUs the build has fp8 variants for (sm_90 in the wheel) */
  SGMV_DTYPE_FLOAT8_E4M3FN = 5
} sgmv_dtype_t;

/* The same type as CUstream and cudaStream_t. NULL is the legacy default stream. */
typedef struct CUstream_st *sgmv_stream_t;

/* Fused slices per call: QKV has 3, gate/up 2. */
#define SGMV_MAX_SLICES 3

/* A fused slice's weight stack beyond the first: (num_loras, rows, cols), unit stride along cols,
 * the first slice's dtype. */
typedef struct {
  const void *weights;
  int64_t lora_stride;
  int64_t row_stride;
  int64_t rows;                  /* expand: the slice's hidden (output columns); shrink: rank */
} sgmv_slice_t;

/* The float32 scales of one slice's fp8 weights (weights_dtype SGMV_DTYPE_FLOAT8_E4M3FN): the
 * weight of adapter l, output channel n (expand: a hidden column of the slice; shrink: a rank
 * column) and any k stands for its stored value times scales[l * lora_stride + n * channel_stride].
 * channel_stride 0: one scale per adapter. Device memory, 4-byte aligned. The kernels multiply the
 * fp32 sums of products by the scales (the weights are converted to the inputs' dtype exactly). */
typedef struct {
  const void *scales;
  int64_t lora_stride;
  int64_t channel_stride;
} sgmv_scales_t;

/* Arguments of sgmv_expand. Initialise with SGMV_EXPAND_ARGS_INIT (or sgmv_expand_args_init), which
 * sets struct_size: fields are only ever appended, a caller built against an older header keeps
 * working (the fields it lacks take their defaults, zero), and a caller built against a newer
 * header gets SGMV_ERROR_INVALID_ARGUMENT from an older library. Strides are in elements; the
 * last dimension of every tensor has unit stride. Every pointer's address is a multiple of its
 * element size. The weights are never NULL; the other data and the metadata may be NULL in a
 * call with nothing to do (batches or total_tokens 0), the metadata also with a batch plan. */
typedef struct {
  size_t struct_size;

  const void *inputs;            /* (total_tokens, rank): fp16, bf16 or fp32 */
  sgmv_dtype_t inputs_dtype;     /* the weights' dtype, or fp32 (cast to the weights' dtype); fp8 weights: fp16 or bf16 */
  int64_t inputs_row_stride;

  const void *weights;           /* (num_loras, hidden, rank): fp16, bf16 or fp8 (with weight_scales) */
  sgmv_dtype_t weights_dtype;
  int64_t weights_lora_stride;
  int64_t weights_row_stride;

  void *output;                  /* (total_tokens, hidden), updated in place */
  sgmv_dtype_t output_dtype;     /* the weights' dtype, or fp32; fp8 weights: the inputs' dtype, or fp32 */
  int64_t output_row_stride;     /* >= hidden: the output may be a column slice */

  int64_t total_tokens;          /* 0 .. 2^30 - 1 */
  int64_t hidden;                /* 1 .. 4194240 (65535 column tiles of 64) */
  int64_t rank;                  /* 1 .. 256 */
  int64_t num_loras;             /* >= 1 */

  const void *seq_start;         /* (batches,) first row of each segment */
  const void *seq_len;           /* (batches,) rows of each segment */
  const void *lora_indices;      /* (batches,) adapter of each segment, -1: skipped */
  sgmv_dtype_t metadata_dtype;   /* int32 or int64, for all three */
  int64_t batches;               /* 0 .. 2^30 - 1; segments must not overlap */
  int64_t max_seq_length;        /* >= 0: picks the tile; any value gives correct results */

  int32_t add_inputs;            /* nonzero: out += product; zero: out = product */
  sgmv_stream_t stream;
  /* ---- end of version 0.1 ---- */

  /* A batch plan built by sgmv_batch_plan_build from these metadata and total_tokens, or NULL.
   * With a plan, programs compute dense tiles of one adapter's rows: decode, speculative and
   * mixed batches run several times faster. (Uniform long prefill still tiles by segment.) */
  const void *batch_plan;
  size_t batch_plan_bytes;
  /* ---- end of version 0.2 ---- */

  /* Fused slices: slice 0 is weights/hidden above, slice s >= 1 is slices[s - 1] (same dtype and
   * rank). Slice s reads inputs columns [s * rank, (s + 1) * rank) and writes its hidden output
   * columns right after slice s - 1's: inputs (total_tokens, num_slices * rank), output
   * (total_tokens, sum of the slices' hidden). 0 or 1: one slice. */
  int32_t num_slices;
  sgmv_slice_t slices[SGMV_MAX_SLICES - 1];
  /* Per-adapter ranks: int32 (num_loras,) in device memory, or NULL. Adapter a reads only the
   * first min(lora_ranks[a], rank) inputs columns of each slice (no padding is read); a rank of
   * 0 or less skips its segments like index -1. */
  const void *lora_ranks;
  /* ---- end of version 0.3 ---- */
  /* Elements from slice s's inputs to slice s + 1's: 0 means rank (the slices side by side in
   * each row, (total_tokens, num_slices * rank)); vLLM's (num_slices, total_tokens, rank) buffer
   * has its plane stride here and rank as inputs_row_stride. */
  int64_t inputs_slice_stride;
  /* ---- end of version 0.4 (0.5 added nothing here) ---- */
  /* fp8 weights: the scales of slice s's weights (slice 0: weights, s >= 1: slices[s - 1]), one
   * per slice the call has, all required; NULL scales for fp16 and bf16 weights. */
  sgmv_scales_t weight_scales[SGMV_MAX_SLICES];
} sgmv_expand_args_t;

#define SGMV_EXPAND_ARGS_INIT SGMV_STRUCT_INIT(sgmv_expand_args_t)
/* Zeroes *args and sets its struct_size (for callers without the macro). */
SGMV_API void sgmv_expand_args_init(sgmv_expand_args_t *args);

/* Launches SGMV expand on args->stream (asynchronous). All arguments are checked before the
 * driver is touched; on error nothing is launched and sgmv_last_error() says why. */
SGMV_API sgmv_status_t sgmv_expand(const sgmv_expand_args_t *args);

/* ---- tensors: what a binding describes (Python's sgmv.sgmv_expand goes through these) -------- */

/* An array in GPU memory: dims 1 to 4, strides in elements. */
typedef struct {
  const void *data;
  sgmv_dtype_t dtype;
  int32_t ndim;
  int64_t shape[4];
  int64_t strides[4];
} sgmv_tensor_t;

/* sgmv_expand's arguments as tensors, with the shape rules checked by the library: inputs
 * (total_tokens, rank); weights (num_loras, hidden, rank) or (num_loras, 1, hidden, rank); output
 * (total_tokens, hidden); metadata 1-D, contiguous, one integer dtype, at least batches entries. */
typedef struct {
  size_t struct_size;
  sgmv_tensor_t inputs, weights, output, seq_start, seq_len, lora_indices;
  int64_t batches;
  int64_t max_seq_length;
  int32_t add_inputs;
  sgmv_stream_t stream;
  const void *batch_plan;
  size_t batch_plan_bytes;
  /* ---- end of version 0.2 ---- */
  int32_t num_slices;                               /* 0 or 1: one slice */
  sgmv_tensor_t slice_weights[SGMV_MAX_SLICES - 1]; /* (num_loras, hidden_s, rank) or (num_loras, 1, hidden_s, rank) */
  sgmv_tensor_t lora_ranks;                         /* int32 (>= num_loras,), contiguous; data NULL: none */
  /* ---- end of version 0.3 ---- */
  /* fp8 weights: float32 scales of each slice (data NULL: none), (num_loras,) or (num_loras, 1)
   * per adapter, (num_loras, hidden_s) per adapter and output column (any strides). */
  sgmv_tensor_t weight_scales[SGMV_MAX_SLICES];
} sgmv_expand_tensors_t;

#define SGMV_EXPAND_TENSORS_INIT SGMV_STRUCT_INIT(sgmv_expand_tensors_t)

/* Checks the tensors' shapes and fills *args (struct_size set by the library). */
SGMV_API sgmv_status_t sgmv_expand_args_from_tensors(const sgmv_expand_tensors_t *tensors, sgmv_expand_args_t *args);
/* sgmv_expand_args_from_tensors, then sgmv_expand. */
SGMV_API sgmv_status_t sgmv_expand_tensors(const sgmv_expand_tensors_t *tensors);

/* ---- shrink ------------------------------------------------------------------------------- */

/* Arguments of sgmv_shrink (LoRA A):
 *   output[start_b + m, s * rank + r] = scaling * lora_scales[idx_b] * inputs[start_b + m, :] . A_s[idx_b, r, :]
 * for each slice s and r < min(lora_ranks[idx_b], rank) (all rank columns without lora_ranks).
 * The output is written, not accumulated; other elements are left untouched. Initialise with
 * SGMV_SHRINK_ARGS_INIT or sgmv_shrink_args_init (scaling 1). Few rows with a large hidden are
 * split over hidden (split-K) when a workspace is given: partial sums go to the workspace and a
 * second launch adds them in a fixed order, so results never depend on scheduling, but they
 * depend (in rounding) on the split, which the planner picks from the shapes and the workspace
 * size. The same call gives the same bits, through the library and through the JIT alike. */
typedef struct {
  size_t struct_size;

  const void *inputs;            /* (total_tokens, hidden): the weights' dtype; fp8 weights: fp16 or bf16 */
  sgmv_dtype_t inputs_dtype;
  int64_t inputs_row_stride;

  const void *weights;           /* slice 0, (num_loras, rank, hidden): fp16, bf16 or fp8 (with weight_scales) */
  sgmv_dtype_t weights_dtype;
  int64_t weights_lora_stride;
  int64_t weights_row_stride;

  void *output;                  /* (total_tokens, num_slices * rank) */
  sgmv_dtype_t output_dtype;     /* float32 or the weights' dtype (fp8 weights: the inputs' dtype) */
  int64_t output_row_stride;

  int64_t total_tokens;          /* 0 .. 2^30 - 1 */
  int64_t hidden;                /* 1 .. 2^20 */
  int64_t rank;                  /* 1 .. 256 */
  int64_t num_loras;             /* >= 1 */

  const void *seq_start;
  const void *seq_len;
  const void *lora_indices;
  sgmv_dtype_t metadata_dtype;
  int64_t batches;
  int64_t max_seq_length;

  float scaling;                 /* multiplies every product (1 from the initialiser) */
  int32_t num_slices;            /* 0 or 1: one slice; slice s >= 1 is slices[s - 1] (rows == rank) */
  sgmv_slice_t slices[SGMV_MAX_SLICES - 1];
  const void *lora_ranks;        /* int32 (num_loras,) on the device, or NULL */
  const void *lora_scales;       /* float32 (num_loras,) on the device, or NULL: adapter a's products
                                    are also multiplied by lora_scales[a] */
  const void *batch_plan;        /* as in sgmv_expand_args_t */
  size_t batch_plan_bytes;
  void *workspace;               /* device memory for split-K partial sums (16-byte aligned), or NULL (no split) */
  size_t workspace_bytes;        /* sgmv_shrink_workspace_bytes() allows every split the planner uses */
  sgmv_stream_t stream;
  /* ---- end of version 0.3 ---- */
  /* Elements from slice s's output to slice s + 1's: 0 means rank (side by side in each row);
   * vLLM's (num_slices, total_tokens, rank) buffer has its plane stride here. */
  int64_t output_slice_stride;
  /* ---- end of version 0.4 (0.5 added nothing here) ---- */
  /* fp8 weights: the scales of slice s's weights (output channel: the rank column), one per
   * slice, all required; NULL for fp16 and bf16 weights. They multiply with scaling and
   * lora_scales (the LoRA alpha, a different thing). */
  sgmv_scales_t weight_scales[SGMV_MAX_SLICES];
} sgmv_shrink_args_t;

#define SGMV_SHRINK_ARGS_INIT SGMV_SHRINK_INIT_
/* Zeroes *args, sets its struct_size and scaling = 1. */
SGMV_API void sgmv_shrink_args_init(sgmv_shrink_args_t *args);

/* Launches SGMV shrink on args->stream (one launch, or two with split-K). Checks as sgmv_expand. */
SGMV_API sgmv_status_t sgmv_shrink(const sgmv_shrink_args_t *args);

/* Workspace bytes that let every shrink call of up to max_tokens rows and output_columns
 * (num_slices * rank) columns split over hidden as the planner likes (calls of many rows never
 * split: the bytes stop growing there); 0 on bad sizes. */
SGMV_API size_t sgmv_shrink_workspace_bytes(int64_t max_tokens, int64_t output_columns);
/* The split rule for one call: the workspace bytes that let a shrink call of total_tokens rows
 * and output_columns columns split as the planner likes, or 0 when a call of that many rows never
 * splits (then it needs no workspace); 0 on bad sizes too. */
SGMV_API size_t sgmv_shrink_call_workspace_bytes(int64_t total_tokens, int64_t output_columns);

/* sgmv_shrink's arguments as tensors: inputs (total_tokens, hidden); weights (num_loras, rank,
 * hidden) or (num_loras, 1, rank, hidden), likewise each slice_weights; output (total_tokens,
 * num_slices * rank); metadata as for expand; lora_ranks int32, lora_scales float32, each 1-D,
 * contiguous, >= num_loras entries (data NULL: none). */
typedef struct {
  size_t struct_size;
  sgmv_tensor_t inputs, weights, output, seq_start, seq_len, lora_indices;
  int64_t batches;
  int64_t max_seq_length;
  float scaling;
  int32_t num_slices;
  sgmv_tensor_t slice_weights[SGMV_MAX_SLICES - 1];
  sgmv_tensor_t lora_ranks, lora_scales;
  sgmv_stream_t stream;
  const void *batch_plan;
  size_t batch_plan_bytes;
  void *workspace;
  size_t workspace_bytes;
  /* ---- end of version 0.3 ---- */
  sgmv_tensor_t weight_scales[SGMV_MAX_SLICES]; /* as in sgmv_expand_tensors_t (channels: rank) */
} sgmv_shrink_tensors_t;

#define SGMV_SHRINK_TENSORS_INIT SGMV_SHRINK_TENSORS_INIT_
SGMV_API sgmv_status_t sgmv_shrink_args_from_tensors(const sgmv_shrink_tensors_t *tensors, sgmv_shrink_args_t *args);
SGMV_API sgmv_status_t sgmv_shrink_tensors(const sgmv_shrink_tensors_t *tensors);

/* ---- the per-step batch plan ----------------------------------------------------------------- */

/* Device bytes of a plan for up to max_batches segments and max_tokens rows (about 4 bytes a row
 * and 272 a segment); 0 if either is out of range. One plan serves every expand call of a step. */
SGMV_API size_t sgmv_batch_plan_bytes(int64_t max_batches, int64_t max_tokens);

typedef struct {
  size_t struct_size;
  void *plan;                    /* device memory the caller owns, 4-byte aligned */
  size_t plan_bytes;             /* >= sgmv_batch_plan_bytes(batches, total_tokens) */
  sgmv_tensor_t seq_start, seq_len, lora_indices;  /* 1-D, contiguous, one integer dtype */
  int64_t batches;               /* 0 .. 2^30 - 1 */
  int64_t total_tokens;
  int64_t num_loras;
  sgmv_stream_t stream;
} sgmv_batch_plan_args_t;

#define SGMV_BATCH_PLAN_ARGS_INIT SGMV_STRUCT_INIT(sgmv_batch_plan_args_t)

/* Builds the plan on args->stream: two small launches, no allocation, no host synchronisation,
 * so it can be captured in a CUDA graph with the expand calls that use it. The plan reads the
 * metadata when it runs; rebuild it when they change. Expand calls that use it pass the same
 * metadata, batches and total_tokens. */
SGMV_API sgmv_status_t sgmv_batch_plan_build(const sgmv_batch_plan_args_t *args);

/* ---- launch configuration: the planner, without the driver ---------------------------------- */

/* The kernel's paths (kernels/sgmv.py PATH_*; the build asserts the values agree): ROWS tiles
 * segment by segment (by segment or, with flat, over all segments' row tiles), SHORT takes row j
 * of block_m segments (decode), both without a plan; GROUPED computes tiles of one adapter's rows
 * listed by a batch plan. */
typedef enum { SGMV_PATH_ROWS = 0, SGMV_PATH_SHORT = 1, SGMV_PATH_GROUPED = 2 } sgmv_path_t;

/* Everything a launch of one of the library's kernels needs beyond the arguments themselves.
 * sgmv_expand launches exactly this; the Triton JIT path launches the same. */
typedef struct {
  size_t struct_size;
  int32_t noop;                  /* 1: nothing to launch (no rows) */
  const char *kernel;            /* "sgmv_kernel" (shrink and expand) or "sgmv_plan_kernel" */
  const char *tile;              /* name in the tile table (aot/tiles.json) */
  int32_t steps;                 /* launches, with the plan kernel's step = 0 .. steps - 1 */
  int32_t block_m, block_n, block_k, num_warps, num_stages;
  int32_t even_k;
  int32_t block_b, scan, rows;   /* the plan kernel's constexprs (SEGS, SCAN, ROWS) */
  int32_t path;                  /* sgmv_path_t, the PATH constexpr */
  int32_t flat;                  /* SGMV_PATH_ROWS: 1 over all segments' row tiles, 0 by segment */
  int32_t meta_shift;            /* 0: int32 metadata, 1: int64 */
  int64_t plan_capacity;         /* row slots of the batch plan */
  uint32_t grid[3];
  /* ---- end of version 0.2 ---- */
  int32_t split;                 /* shrink: programs along hidden (then grid[2]); 1: none */
  int64_t k_split;               /* hidden per split program, a multiple of block_k (no split: hidden) */
  int32_t op;                    /* 0 expand, 1 shrink: the kernel's SHRINK constexpr */
  int64_t x_slice_step;          /* inputs elements between fused slices (expand with slices) */
  /* ---- end of version 0.3 ---- */
  int32_t per_token;             /* 1: the metadata is a per-row adapter array (a step's token mapping) */
  int32_t aligned;               /* 1: sizes, strides and pointers 16 bytes aligned (the ALIGNED constexpr) */
  /* ---- end of version 0.4 ---- */
  int32_t gdc;                   /* always 0 since 0.6.1: no cubin uses grid dependency control (0.5 to 0.6.0's
                                  * sm_90 cubins did; measured slower: benchmarks/NOTES.md round 9) */
} sgmv_launch_config_t;

/* The launch sgmv_expand would make on a GPU of cubin family cubin_arch (80, 90, 100, 120),
 * after the same checks (same statuses and messages). Zero *config first. A tuner may instead
 * set block_m, block_n, block_k, num_warps, num_stages (and path SGMV_PATH_SHORT to ask for the
 * short path, split for a shrink's split of hidden) to get the launch of that tile; sgmv_expand
 * and sgmv_shrink themselves only run tiles of their table. */
SGMV_API sgmv_status_t sgmv_expand_config(const sgmv_expand_args_t *args, int cubin_arch, sgmv_launch_config_t *config);
/* Likewise for sgmv_shrink and sgmv_batch_plan_build. */
SGMV_API sgmv_status_t sgmv_shrink_config(const sgmv_shrink_args_t *args, int cubin_arch, sgmv_launch_config_t *config);
SGMV_API sgmv_status_t sgmv_batch_plan_config(const sgmv_batch_plan_args_t *args, int cubin_arch,
                                              sgmv_launch_config_t *config);

/* ---- launch description: every argument of every launch ------------------------------------ */

/* What a call launches, argument by argument: what sgmv_expand, sgmv_shrink and
 * sgmv_batch_plan_build pass to the driver, for a launcher of the same kernel source (the
 * library's Triton JIT path launches exactly this). Names are the parameters of the kernels in
 * the kernels/ folder of the same build; the list may change between builds. */
typedef enum {
  SGMV_ARG_POINTER = 0,          /* value: a device address (0: NULL, never read), of elements dtype */
  SGMV_ARG_INT = 1,              /* value, of dtype int32 or int64 */
  SGMV_ARG_FLOAT = 2,            /* fvalue, a float32 */
  SGMV_ARG_CONSTEXPR = 3         /* value: a compile-time constant of the kernel */
} sgmv_arg_kind_t;

typedef struct {
  const char *name;
  int32_t kind;                  /* sgmv_arg_kind_t */
  int32_t dtype;                 /* sgmv_dtype_t of a pointer's elements or of a scalar; -1 for a constexpr */
  int64_t value;
  double fvalue;
} sgmv_kernel_arg_t;

#define SGMV_MAX_KERNEL_ARGS 64
#define SGMV_MAX_LAUNCHES 4

typedef struct {
  const char *kernel;            /* the kernel's name: "sgmv_kernel", "sgmv_plan_kernel" */
  const char *variant;           /* the AOT variant this launch runs ("" for a requested tile) */
  uint32_t grid[3];
  int32_t num_warps, num_stages;
  int32_t num_args;
  sgmv_kernel_arg_t args[SGMV_MAX_KERNEL_ARGS];
  /* Always 0 since 0.6.1: every launch is a plain one, in stream order (0.5 to 0.6.0 launched the
   * layer call's expand with programmatic dependent launch on sm_90; measured slower). */
  int32_t programmatic;
} sgmv_kernel_launch_t;

typedef struct {
  size_t struct_size;
  int32_t num_launches;          /* in stream order; 0: nothing to launch */
  sgmv_kernel_launch_t launches[SGMV_MAX_LAUNCHES];
} sgmv_launches_t;

#define SGMV_LAUNCHES_INIT SGMV_STRUCT_INIT(sgmv_launches_t)

/* The launches sgmv_expand / sgmv_shrink / sgmv_batch_plan_build would make on a GPU of cubin
 * family cubin_arch, after the same checks (same statuses and messages), without a driver.
 * out->struct_size must be set (SGMV_LAUNCHES_INIT). want: NULL for the tile table's choice, or
 * a tuner's tile as for sgmv_expand_config (its block_m > 0). */
SGMV_API sgmv_status_t sgmv_expand_launches(const sgmv_expand_args_t *args, int cubin_arch,
                                            const sgmv_launch_config_t *want, sgmv_launches_t *out);
SGMV_API sgmv_status_t sgmv_shrink_launches(const sgmv_shrink_args_t *args, int cubin_arch,
                                            const sgmv_launch_config_t *want, sgmv_launches_t *out);
SGMV_API sgmv_status_t sgmv_batch_plan_launches(const sgmv_batch_plan_args_t *args, int cubin_arch,
                                                sgmv_launches_t *out);

/* ---- the layer call: a step described once, a layer described once, one call per layer ----- */

/* A serving step applies LoRA to every adapted projection of every layer. Describe the step
 * (its metadata, the plan, the intermediate buffer) once per step, each layer's weights once at
 * model load, and make one call per layer application:
 *
 *   out (+)= B_s[idx] (scaling * lora_scales[idx] * A_s[idx] x)   for each slice s of the layer
 *
 * sgmv_layer_apply launches the shrink into the step's intermediate buffer and the expand from
 * it (the same kernels and rules as sgmv_shrink and sgmv_expand, with the step's plan). */

/* A layer's adapters: slice s's A is lora_a[s], (num_loras, rank, hidden) or (num_loras, 1, rank,
 * hidden), and its B is lora_b[s], (num_loras, hidden_s, rank) or (num_loras, 1, hidden_s, rank):
 * unit stride along the last dimension, all of one dtype (float16, bfloat16, or fp8 e4m3 with
 * scales for every A and B: then the inputs' dtype, fp16 or bf16, is the activations' dtype). */
typedef struct {
  size_t struct_size;
  int32_t num_slices;            /* 1 to SGMV_MAX_SLICES (0: 1) */
  sgmv_tensor_t lora_a[SGMV_MAX_SLICES];
  sgmv_tensor_t lora_b[SGMV_MAX_SLICES];
  sgmv_tensor_t lora_ranks;      /* int32 (>= num_loras,), contiguous, or data NULL: as sgmv_shrink's */
  sgmv_tensor_t lora_scales;     /* float32 (>= num_loras,), contiguous, or data NULL */
  float scaling;                 /* 1 from the initialiser */
  /* ---- end of version 0.4 ---- */
  /* fp8 weights: float32 scales of lora_a[s] (channels: rank) and lora_b[s] (channels: hidden_s),
   * shaped as sgmv_expand_tensors_t's weight_scales; data NULL for fp16 and bf16 weights. */
  sgmv_tensor_t lora_a_scales[SGMV_MAX_SLICES];
  sgmv_tensor_t lora_b_scales[SGMV_MAX_SLICES];
} sgmv_layer_args_t;

#define SGMV_LAYER_ARGS_INIT SGMV_LAYER_INIT_

typedef struct sgmv_layer sgmv_layer_t;
typedef struct sgmv_step sgmv_step_t;

/* Checks the layer's description and keeps a copy (the weights stay the caller's: keep them
 * alive and in place while the layer is used). *layer is NULL on error. */
SGMV_API sgmv_status_t sgmv_layer_create(const sgmv_layer_args_t *args, sgmv_layer_t **layer);
SGMV_API void sgmv_layer_destroy(sgmv_layer_t *layer);

/* A step's rows: segments (seq_start, seq_len, lora_indices, at least batches entries each, as
 * for sgmv_expand) or, with token_lora_mapping, one adapter index per row (vLLM's token mapping,
 * at least total_tokens entries; the three segment tensors' data NULL). 1-D, contiguous, device
 * memory, one integer dtype. The scratch buffer (device memory the caller owns, 16-byte
 * aligned) holds the step's batch plan, the intermediate (total_tokens, num_slices * rank) of
 * each layer call in the weights' dtype (fp8 weights: the inputs', 16-bit too), and the shrink's
 * split-K workspace. */
typedef struct {
  size_t struct_size;
  sgmv_tensor_t seq_start, seq_len, lora_indices;
  sgmv_tensor_t token_lora_mapping;
  int64_t batches;               /* segments (0 .. 2^30 - 1); ignored with token_lora_mapping */
  int64_t max_seq_length;        /* as for sgmv_expand (picks tiles); ignored with token_lora_mapping */
  int64_t total_tokens;          /* 0 .. 2^30 - 1 */
  int64_t num_loras;             /* the layers' num_loras */
  void *scratch;
  size_t scratch_bytes;          /* >= sgmv_step_scratch_bytes(batches, total_tokens, columns) */
} sgmv_step_args_t;

#define SGMV_STEP_ARGS_INIT SGMV_STRUCT_INIT(sgmv_step_args_t)

/* Scratch bytes of a step of up to max_batches segments (with a token mapping: max_tokens) and
 * max_tokens rows, for layers of up to max_columns = num_slices * rank; 0 on bad sizes. */
SGMV_API size_t sgmv_step_scratch_bytes(int64_t max_batches, int64_t max_tokens, int64_t max_columns);

/* Checks the step's description and keeps a copy; no launch. In a CUDA graph: describe the step
 * once with the captured sizes, capture sgmv_step_plan with the layer calls, and change the
 * metadata in place between replays. *step is NULL on error. */
SGMV_API sgmv_status_t sgmv_step_create(const sgmv_step_args_t *args, sgmv_step_t **step);
SGMV_API void sgmv_step_destroy(sgmv_step_t *step);

/* Builds the step's batch plan from its metadata on `stream` (two small launches): once per
 * step, after the metadata are written and before the step's layer calls. */
SGMV_API sgmv_status_t sgmv_step_plan(const sgmv_step_t *step, sgmv_stream_t stream);

/* The layer's whole LoRA delta for the step's rows: inputs (total_tokens, hidden) in the weights'
 * dtype (fp8 weights: fp16 or bf16, the dtype of the intermediate and of "the weights' dtype"
 * here); output (total_tokens, sum of hidden_s) in the weights' dtype or float32, unit stride
 * along columns (it may be a column slice), updated in place on the rows of valid segments
 * (add_inputs nonzero: out += delta; zero: out = delta). Launches the shrink and the expand on
 * `stream` after checking everything. */
SGMV_API sgmv_status_t sgmv_layer_apply(const sgmv_layer_t *layer, const sgmv_step_t *step,
                                        const sgmv_tensor_t *inputs, const sgmv_tensor_t *output, int32_t add_inputs,
                                        sgmv_stream_t stream);

/* The launches of sgmv_step_plan and sgmv_layer_apply on cubin_arch, after the same checks (as
 * sgmv_expand_launches describes sgmv_expand's). */
SGMV_API sgmv_status_t sgmv_step_plan_launches(const sgmv_step_t *step, int cubin_arch, sgmv_launches_t *out);
SGMV_API sgmv_status_t sgmv_layer_apply_launches(const sgmv_layer_t *layer, const sgmv_step_t *step,
                                                 const sgmv_tensor_t *inputs, const sgmv_tensor_t *output,
                                                 int32_t add_inputs, int cubin_arch, sgmv_launches_t *out);

/* SGMV_VERSION of the loaded library. */
SGMV_API int sgmv_version(void);
/* The build, as "key=value" items separated by ';': triton (the Triton version that compiled the
 * cubins; the JIT path gives the same bits only with that version); fp8_archs (the archs with
 * variants for fp8 weights, "90", or "none"). More items may follow. */
SGMV_API const char *sgmv_build_info(void);
/* A fixed description of a status. */
SGMV_API const char *sgmv_status_string(sgmv_status_t status);
/* The message of this thread's last failed call ("" if none). Valid until this thread's next call. */
SGMV_API const char *sgmv_last_error(void);

/* Inventory: the archs the library holds cubins for ("80,90,100,120"), and its variant count. */
SGMV_API const char *sgmv_archs(void);
SGMV_API int sgmv_num_variants(void);
/* Number of CUDA devices the driver sees. Loads the driver if needed. */
SGMV_API sgmv_status_t sgmv_device_count(int *count);
/* Device `device`'s compute capability (major * 10 + minor) and the cubin family the library
 * uses on it (80, 90, 100 or 120; 0 if none fits: sgmv_expand then returns
 * SGMV_ERROR_UNSUPPORTED_ARCH). */
SGMV_API sgmv_status_t sgmv_device_arch(int device, int *compute_capability, int *cubin_arch);
/* The cubin family this build uses for a compute capability (major * 10 + minor); 0 if none. */
SGMV_API int sgmv_cubin_arch(int compute_capability);

#ifdef __cplusplus
}
#endif

/* SGMV_STRUCT_INIT(T): a T with every field zero but struct_size = sizeof(T) (and a shrink's
 * scaling 1). */
#ifdef __cplusplus
template <typename T> inline T sgmv_struct_init() { T t = T(); t.struct_size = sizeof(T); return t; }
template <typename T> inline T sgmv_scaled_init() { T t = sgmv_struct_init<T>(); t.scaling = 1.0f; return t; }
#define SGMV_STRUCT_INIT(T) sgmv_struct_init<T>()
#define SGMV_SHRINK_INIT_ sgmv_scaled_init<sgmv_shrink_args_t>()
#define SGMV_SHRINK_TENSORS_INIT_ sgmv_scaled_init<sgmv_shrink_tensors_t>()
#define SGMV_LAYER_INIT_ sgmv_scaled_init<sgmv_layer_args_t>()
#endif
#ifndef __cplusplus
#define SGMV_STRUCT_INIT(T) {.struct_size = sizeof(T)}
#define SGMV_SHRINK_INIT_ {.struct_size = sizeof(sgmv_shrink_args_t), .scaling = 1.0f}
#define SGMV_SHRINK_TENSORS_INIT_ {.struct_size = sizeof(sgmv_shrink_tensors_t), .scaling = 1.0f}
#define SGMV_LAYER_INIT_ {.struct_size = sizeof(sgmv_layer_args_t), .scaling = 1.0f}
#endif

#endif /* SGMV_H */
